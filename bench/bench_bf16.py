"""Where CPU bf16 autocast starts to pay: one forward and backward pass of randomly initialised
Llama-style models of growing size, in float32 and under `torch.autocast("cpu", torch.bfloat16)`.

    python -m bench.bench_bf16                      # ~3 min on 2 CPU cores; numbers in outputs/bench_bf16.json
    python -m bench.bench_bf16 --sizes 256x4,512x8  # width x layers

The measured crossover is what `common.model.precision.CPU_BF16_MIN_PARAMETERS` should be on this CPU;
`--use_bfloat16 True` on a CPU uses autocast only above it (and only where the CPU has bf16
instructions).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _model(width: int, layers: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=32 * -(-8 * width // 96),
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def step_seconds(model, batch, seq, bf16: bool, repeats: int) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> int:
    from common.model.precision import cpu_bf16_flags

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64x2,128x4,256x4,384x6,512x8,768x12", help="width x layers, comma-separated")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="outputs/bench_bf16.json")
    args = parser.parse_args(argv)
    from bench.bench_sft import machine

    rows = []
    print(f"CPU bf16 flags: {cpu_bf16_flags() or 'none'}; batch {args.batch} x {args.seq} tokens, vocab {args.vocab}")
    print(f"{'model':>10} {'parameters':>12} {'fp32 s':>8} {'bf16 s':>8} {'bf16 speed-up':>14}")
    for size in args.sizes.split(","):
        width, layers = map(int, size.lower().split("x"))
        model = _model(width, layers, args.vocab)
        n = sum(p.numel() for p in model.parameters())
        fp32 = step_seconds(model, args.batch, args.seq, False, args.repeats)
        bf16 = step_seconds(model, args.batch, args.seq, True, args.repeats)
        rows.append({"width": width, "layers": layers, "parameters": n, "fp32_s": round(fp32, 4),
                     "bf16_s": round(bf16, 4), "speedup": round(fp32 / bf16, 3)})
        print(f"{size:>10} {n:>12,} {fp32:>8.3f} {bf16:>8.3f} {fp32 / bf16:>13.2f}x", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "cpu_bf16_flags": cpu_bf16_flags(), "settings": vars(args),
                               "results": rows}, indent=2) + "\n")
    print(f"numbers written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
