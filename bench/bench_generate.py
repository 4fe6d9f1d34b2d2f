"""Generation speed of evaluate.py's greedy answering (common/evaluation/generation.py) against the previous
implementation (transformers' `generate()` with `stop_strings=["\\n"]`, prompts sorted by
character length), on a tiny model trained until it stops after its answers.

    python -m bench.bench_generate                 # ~1.5 min on 2 CPU cores; numbers in outputs/bench_generate.json
    python -m bench.bench_generate --batch_size 64 --repeats 3

Both variants answer the same questions (the bundled sample's 360) at the same batch size, in
the same process, one after the other, timed over `--repeats` passes after one untimed warm-up
pass; the variants alternate within each pass, and the best pass of each counts. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def previous_generate_answers(model, tokenizer, questions, fmt, batch_size, max_new_tokens):
    """The implementation this replaced, kept here as the baseline: HF generate() with the KV cache,
    stop_strings for the newline, prompts sorted by character length."""
    import torch

    from common.data.prompts import generation_prompt
    from common.evaluation.answers import stop_token_ids
    from common.evaluation.metrics import extract_answer

    prompts = [generation_prompt(q, fmt, tokenizer) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=not fmt.use_chat)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer),
                                     stop_strings=["\n"], tokenizer=tokenizer)
            for i, text in zip(idx, tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                           skip_special_tokens=True)):
                answers[i] = extract_answer(text)
    finally:
        tokenizer.padding_side = side
    return answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=16, help="evaluate.py's default.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed passes per variant (after one warm-up).")
    parser.add_argument("--train_epochs", type=float, default=3.0, help="LoRA SFT epochs before measuring.")
    parser.add_argument("--output", default="outputs/bench_generate.json")
    parser.add_argument("--work_dir", default=None, help="Keep the tiny model and its adapter here; reused if there.")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel

    from common.data.sources import BUNDLED
    from common.data.prompts import PromptFormat
    from common.evaluation.answers import generate_answers, generate_ids
    from common.model.loading import ensure_pad_token
    from common.model.tiny_model import build_tiny_model
    import lora

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_generate-"))
    base, run = str(work / "tiny"), work / "lora"
    t0 = time.perf_counter()
    if not (run / "adapter_config.json").is_file():
        build_tiny_model(base, "llama", hidden_size=128, intermediate_size=256)
        assert lora.main(["--model_id", base, "--dataset_name", "triviaqa-sample", "--output_dir", str(run),
                          "--num_train_epochs", str(args.train_epochs), "--per_device_train_batch_size", "16",
                          "--learning_rate", "5e-3", "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0",
                          "--logging_steps", "100", "--save_strategy", "no", "--report_to", "none"]) == 0
    train_s = time.perf_counter() - t0

    questions = []
    for split in ("train", "validation"):
        for line in (BUNDLED["triviaqa-sample"] / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            questions.append(json.loads(line)["question"])
    tokenizer = AutoTokenizer.from_pretrained(run)
    ensure_pad_token(tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run).eval()
    fmt = PromptFormat()

    variants = {
        "previous (HF generate, stop_strings)": lambda: previous_generate_answers(
            model, tokenizer, questions, fmt, args.batch_size, args.max_new_tokens),
        "current (common/evaluation/generation.py)": lambda: generate_answers(
            model, tokenizer, questions, fmt, args.batch_size, args.max_new_tokens),
        # The same decoder fed batches in input order (each call sorts only within its one batch).
        "current, batches in input order": lambda: [
            a for start in range(0, len(questions), args.batch_size)
            for a in generate_answers(model, tokenizer, questions[start:start + args.batch_size], fmt,
                                      args.batch_size, args.max_new_tokens)],
    }
    # Variants alternate within each repeat, so that load from other processes hits all of them alike.
    answers = {name: fn() for name, fn in variants.items()}  # warm-up
    times: dict[str, list] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    results = {name: {"best_s": round(min(ts), 3), "samples_per_s": round(len(questions) / min(ts), 1),
                      "median_s": round(sorted(ts)[len(ts) // 2], 3)} for name, ts in times.items()}
    names = list(variants)
    speedup = results[names[1]]["samples_per_s"] / results[names[0]]["samples_per_s"]
    finished = sum(1 for a in answers[names[1]] if a) / len(questions)
    generated = generate_ids(model, tokenizer, questions, fmt, args.batch_size, args.max_new_tokens)
    stopped = sum(1 for ids in generated if ids and ids[-1] == tokenizer.eos_token_id) / len(questions)
    report = {
        "cpu": _cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "questions": len(questions), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "train_epochs": args.train_epochs, "train_s": round(train_s, 1), "variants": results,
        "speedup": round(speedup, 2), "same_answers": all(answers[n] == answers[names[0]] for n in names),
        "non_empty_answers": round(finished, 3), "ended_with_eos": round(stopped, 3),
        "mean_new_tokens": round(sum(map(len, generated)) / len(generated), 2),
    }
    print(f"\n{report['cpu']} ({report['threads']} threads), {len(questions)} questions, batch {args.batch_size}")
    for name in names:
        print(f"  {name:36s} {results[name]['samples_per_s']:8.1f} samples/s  (best of {args.repeats}: "
              f"{results[name]['best_s']:.2f} s)")
    print(f"  speed-up of current over previous {speedup:.2f}x; identical answers: {report['same_answers']}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
