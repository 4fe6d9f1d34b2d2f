"""Our LM head and LoRA dropout against the library paths they replace, timed in LoRA SFT runs:

    python -m bench.bench_gpu_paths                        # on a GPU: a ~1B-parameter random model
    python -m bench.bench_gpu_paths --hidden_size 256 --num_layers 2 --vocab_size 0 --max_steps 3   # a quick look

`common/model/loss.py` replaces TRL's fused LM head (`--lm_head_impl trl` switches back) and
`common/model/dropout.py` replaces PEFT's dropout (`--lora_dropout_impl peft`). Both are checked
against the libraries on the CPU, where they are faster; on a GPU that is to be measured, which is
what this does: our run as lora.py runs it (bench/bench_sft.py's `ours` variant, each variant in its
own process), then the same with each library path, with the loss on the answer only and on the
whole sequence. Prints tokens/s and peak memory per variant and which path is faster; writes JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.flags.errors import UsageError
from common.flags.groups import flag
from common.flags.parser import FlagParser

VARIANTS = {"ours": "", "trl_lm_head": "--lm_head_impl trl", "peft_dropout": "--lora_dropout_impl peft"}
LOSSES = {"completion_only": "", "full_sequence": "--completion_only_loss False"}


@dataclass
class PathArguments:
    hidden_size: int = flag(2048, "Model width: 2048 with 16 layers and a 32,000-token vocabulary is ~1B parameters.")
    num_layers: int = flag(16, "Transformer layers.")
    vocab_size: int = flag(32000, "Vocabulary (0: the local tokenizer's 1,024 tokens).")
    max_steps: int = flag(30, "Optimizer steps per variant.")
    per_device_train_batch_size: int = flag(16, "Examples per step.")
    bf16: bool = flag(True, "Train in bfloat16 where the device supports it (`--use_bfloat16 True`).")
    output: str = flag("outputs/bench_gpu_paths.json", "JSON file for the measured numbers.")


def make_parser() -> FlagParser:
    return FlagParser([PathArguments], prog="python -m bench.bench_gpu_paths",
                      description="Our LM head and LoRA dropout against TRL's head and PEFT's dropout.")


def run_variant(args, extra: str, work: Path) -> dict:
    import torch

    precision = "--use_bfloat16 True" if args.bf16 and torch.cuda.is_available() and \
        torch.cuda.is_bf16_supported() else ""
    cmd = [sys.executable, "-m", "bench.bench_sft", "--variant", "ours", "--work_dir", str(work),
           "--hidden_size", str(args.hidden_size), "--num_layers", str(args.num_layers),
           "--vocab_size", str(args.vocab_size), "--max_steps", str(args.max_steps),
           "--per_device_train_batch_size", str(args.per_device_train_batch_size),
           "--ours_flags", " ".join(f for f in (extra, precision) if f)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads((work / "result-ours.json").read_text())


def main(argv=None) -> int:
    try:
        args = make_parser().parse(argv)
    except UsageError as exc:
        print(f"bench_gpu_paths: error: {exc}", file=sys.stderr)
        return 2
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_paths-") as tmp:
        for loss, loss_flags in LOSSES.items():
            for name, flags in VARIANTS.items():
                work = Path(tmp) / f"{loss}-{name}"
                r = run_variant(args, " ".join(f for f in (loss_flags, flags) if f), work)
                results.setdefault(loss, {})[name] = {k: r[k] for k in ("tokens_per_s", "peak_memory_bytes",
                                                                         "peak_memory_kind", "train_loss")}
                print(f"{loss:16s} {name:13s} {r['tokens_per_s']:>10,.1f} tokens/s  "
                      f"{r['peak_memory_bytes'] / 2**30:6.2f} GiB  loss {r['train_loss']:.4f}", flush=True)
    verdicts = []
    for loss, by in results.items():
        ours = by["ours"]
        for name in ("trl_lm_head", "peft_dropout"):
            lib = by[name]
            speed = ours["tokens_per_s"] / lib["tokens_per_s"]
            memory = ours["peak_memory_bytes"] / lib["peak_memory_bytes"]
            faster = "ours" if speed > 1 else "the library's"
            verdicts.append(f"{loss}: ours vs {name}: {speed:.2f}x the tokens/s, {memory:.2f}x the peak memory "
                            f"-> {faster} is faster")
    print("\n".join(verdicts))
    from bench.bench_sft import machine

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "flags": args.to_dict(),
                               "results": results, "verdicts": verdicts}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
