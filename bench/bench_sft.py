"""Throughput of our LoRA SFT run (sft.run, called as lora.py calls it) against a plain TRL
SFTTrainer with its default settings: same device, model, data, hyperparameters and steps.

    python -m bench.bench_sft                                     # both variants, ~2.5 min on 2 CPU cores
    python -m bench.bench_sft --num_examples 400 --hidden_size 256 --num_layers 4    # a quick look
    python -m bench.bench_sft --variant ours --profile True --max_steps 20           # where our time goes
    python -m bench.bench_sft --technique qlora                   # 4-bit base in both (bitsandbytes)
    python -m bench.bench_sft --ours_flags "--padding_free True --attn_implementation flash_attention_2"

Each variant runs in its own process, so its peak memory (process RSS on the CPU,
torch.cuda.max_memory_allocated on CUDA, both read when training ends) is its own. The data are synthetic but TriviaQA-shaped
(hub schema, question and answer lengths like the real set); the model is a randomly initialised
Llama-style one with a tokenizer trained locally. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

from common.flags.groups import flag
from common.flags.parser import FlagParser
from common.flags.errors import UsageError
from common.data.sources import BUNDLED

TEMPLATE = "Question: {question}\nAnswer:"  # our default --prompt_template; the baseline formats with it too
VARIANTS = ("ours", "baseline", "baseline_plain")  # baseline_plain: only with --plain_baseline True


@dataclass
class BenchArguments:
    variant: Literal["both", "ours", "baseline", "baseline_plain"] = flag(
        "both", "`both` runs each variant in its own process and prints the table; `ours` or `baseline` runs "
                "one variant in this process (what `both` spawns).")
    technique: Literal["lora", "qlora"] = flag(
        "lora", "`qlora`: both variants load the base in 4-bit NF4 (bitsandbytes), ours through qlora.py's path.")
    ours_flags: str = flag("", "More lora.py/qlora.py flags for our run, as one string (e.g. \"--use_liger_kernel "
                               "True\"); the baseline keeps TRL's defaults.")
    num_examples: int = flag(1000, "Synthetic TriviaQA-shaped training questions (one epoch is trained).")
    vocab_size: int = flag(0, "Model vocabulary (0: the 1,024 tokens of the local tokenizer; 128256: Llama 3's). Rows "
                              "beyond the tokenizer's are never seen as inputs but enter every softmax.")
    baseline_sampling: Literal["random", "group_by_length"] = flag(
        "random", "The baseline's `train_sampling_strategy` (TRL's default is random; `group_by_length` is TRL "
                  "at its best).")
    plain_baseline: bool = flag(False, "Also run TRL at its defaults (random order) as a third variant, "
                                       "`baseline_plain`, for the memory comparison.")
    optimizer: str = flag("", "One optimizer for both variants (e.g. `adamw_torch`); empty: each side's default.")
    hidden_size: int = flag(512, "Model width (a multiple of 64); heads = width / 64, MLP width = 8/3 of it.")
    num_layers: int = flag(8, "Transformer layers.")
    per_device_train_batch_size: int = flag(16, "Examples per step, both variants.")
    num_train_epochs: float = flag(1.0, "Passes over the data, both variants.")
    max_steps: int = flag(
        -1, "Stop after N steps (-1: train the epochs). Short of an epoch the two samplers pick different "
            "examples, so their token counts differ; tokens/s stays comparable.")
    learning_rate: float = flag(2e-4, "Peak learning rate, both variants.")
    lora_r: int = flag(16, "LoRA rank, both variants (all linear layers are adapted).")
    lora_alpha: int = flag(32, "LoRA alpha, both variants.")
    lora_dropout: float = flag(0.05, "LoRA dropout, both variants (our default; PEFT's own default is 0).")
    seed: int = flag(42, "Seed of the data, the model initialisation and training.")
    baseline_gradient_checkpointing: bool = flag(
        True, "TRL's SFTConfig turns gradient checkpointing on by default; `False` measures the baseline "
              "without it, which isolates the rest of the difference.")
    ours_gradient_checkpointing: bool = flag(
        True, "Our run's `--gradient_checkpointing` (on by default, as in TRL); `False` trades memory for speed.")
    work_dir: Optional[str] = flag(
        None, "Where the data, the model, the runs and their logs go (default: a temporary directory, "
              "removed at the end).")
    output: str = flag("outputs/bench_sft.json", "JSON file for the measured numbers.")
    profile: bool = flag(False, "Run our variant under cProfile and print where the time goes (implies "
                                "`--variant ours`); the profile is saved in --work_dir.")


def make_parser() -> FlagParser:
    return FlagParser([BenchArguments], prog="python -m bench.bench_sft",
                      description="LoRA SFT throughput: our sft.run against a default TRL SFTTrainer.")


def check(args) -> None:
    for name in ("num_examples", "hidden_size", "num_layers", "per_device_train_batch_size", "learning_rate",
                 "lora_r", "lora_alpha"):
        if getattr(args, name) <= 0:
            raise UsageError(f"`--{name}` must be > 0 (got {getattr(args, name)}).")
    if args.hidden_size % 64:
        raise UsageError(f"`--hidden_size {args.hidden_size}` must be a multiple of 64 (one head per 64).")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise UsageError("`--num_train_epochs` must be > 0 (or set `--max_steps`).")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"`--lora_dropout` must be in [0, 1) (got {args.lora_dropout}).")
    try:
        shlex.split(args.ours_flags)
    except ValueError as exc:
        raise UsageError(f"`--ours_flags`: {exc}; quote it as one shell string.") from None


# Dataset -------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")
# How real TriviaQA questions open, roughly as often as there.
_OPENERS = (("Which", 30), ("What", 20), ("Who", 12), ("In which year", 6), ("How many", 5),
            ("What is the name of the", 5), ("In which country", 4), ("In which city", 3), ("Who wrote", 3),
            ("What name is given to the", 3), ("Where", 3), ("Which famous", 2), ("Which English", 2))
_ANSWER_WORDS = (1, 2, 3, 4, 5)
_ANSWER_WEIGHTS = (40, 33, 15, 8, 4)  # mean ~2 words, like TriviaQA answers


def _bundled_words() -> tuple[Counter, Counter]:
    """Word counts of the bundled sample's questions and answers: a plausible English vocabulary."""
    questions, answers = Counter(), Counter()
    for path in sorted(BUNDLED["triviaqa-sample"].glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                questions.update(_WORD.findall(row["question"]))
                answers.update(_WORD.findall(row["answer"]["value"]))
    return questions, answers


def make_questions(n: int, seed: int) -> list[dict]:
    """n rows in the hub TriviaQA schema. Question lengths are log-normal around 13 words (mean ~14,
    5-40 words with a long right tail, as in TriviaQA); words follow their bundled-sample frequencies."""
    rng = random.Random(seed)
    q_counts, a_counts = _bundled_words()
    q_words, q_weights = zip(*q_counts.most_common())
    a_words, a_weights = zip(*a_counts.most_common())
    q_cum = list(_cumulative(q_weights))
    a_cum = list(_cumulative(a_weights))
    openers, opener_weights = zip(*_OPENERS)
    rows = []
    for i in range(n):
        length = min(60, max(5, round(rng.lognormvariate(math.log(13), 0.45))))
        opener = rng.choices(openers, weights=opener_weights)[0]
        body = rng.choices(q_words, cum_weights=q_cum, k=max(1, length - len(opener.split())))
        question = f"{opener} {' '.join(body)}?"
        k = rng.choices(_ANSWER_WORDS, weights=_ANSWER_WEIGHTS)[0]
        if k == 1 and rng.random() < 0.2:
            value, kind = str(rng.randint(1066, 2020)), "Numerical"
        else:
            value = " ".join(w[:1].upper() + w[1:] for w in rng.choices(a_words, cum_weights=a_cum, k=k))
            kind = "WikipediaEntity"
        aliases = [value]
        if rng.random() < 0.2:
            aliases.append(f"The {value}")
        if k > 1 and rng.random() < 0.5:
            aliases.append(value.split()[-1])
        rows.append({"question": question, "question_id": f"bench_{i:05d}", "question_source": "synthetic",
                     "answer": {"value": value, "aliases": aliases, "normalized_value": value.lower(),
                                "normalized_aliases": [a.lower() for a in aliases], "type": kind}})
    return rows


def _cumulative(weights):
    total = 0
    for w in weights:
        total += w
        yield total


def describe(rows: list[dict]) -> dict:
    q = sorted(len(r["question"].split()) for r in rows)
    a = [len(r["answer"]["value"].split()) for r in rows]
    return {"rows": len(rows), "question_words_mean": round(sum(q) / len(q), 2), "question_words_min": q[0],
            "question_words_p95": q[int(0.95 * (len(q) - 1))], "question_words_max": q[-1],
            "answer_words_mean": round(sum(a) / len(a), 2), "answer_words_max": max(a)}


# Model & data on disk ------------------------------------------------------------------------

def model_overrides(args) -> dict:
    heads = args.hidden_size // 64
    return dict(hidden_size=args.hidden_size, intermediate_size=32 * math.ceil(8 * args.hidden_size / 3 / 32),
                num_hidden_layers=args.num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=1024,
                initializer_range=0.02)  # the usual init: the tiny-model 0.1 is for width 64


def prepare(args, work: Path) -> tuple[str, str]:
    """Writes the data set and the model once per work dir and setting; -> (data file, model dir)."""
    from common.model.tiny_model import build_tiny_model

    key = {"num_examples": args.num_examples, "seed": args.seed, "vocab_size": getattr(args, "vocab_size", 0),
           **model_overrides(args)}
    stamp = work / "prepared.json"
    data, model = work / "train.jsonl", work / "model"
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return str(data), str(model)
    work.mkdir(parents=True, exist_ok=True)
    rows = make_questions(args.num_examples, args.seed)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if model.exists():
        shutil.rmtree(model)
    build_tiny_model(str(model), "llama", seed=args.seed, **model_overrides(args))
    if getattr(args, "vocab_size", 0):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(args.seed)
        grown = AutoModelForCausalLM.from_pretrained(str(model))
        grown.resize_token_embeddings(args.vocab_size, mean_resizing=False)
        grown.save_pretrained(str(model))
    stamp.write_text(json.dumps(key))
    return str(data), str(model)


# Measuring one variant -----------------------------------------------------------------------

class BatchCounter:
    """Real (attention-mask) and padded tokens of every training batch, and the peak memory when
    `Trainer.train` returns (before our run saves and draws its plots). Token sums stay on the
    batch's device, so counting adds no synchronisation per step. Installed the same way for both
    variants."""

    def __init__(self):
        self.real: Any = 0
        self.padded = 0
        self.batches = 0
        self.peak_at_train_end: Optional[int] = None

    def install(self) -> None:
        from transformers import Trainer

        original_step, original_train = Trainer.training_step, Trainer.train
        counter = self

        def training_step(trainer, model, inputs, *args, **kwargs):
            counter.add(inputs)
            return original_step(trainer, model, inputs, *args, **kwargs)

        def train(trainer, *args, **kwargs):
            output = original_train(trainer, *args, **kwargs)
            counter.peak_at_train_end = peak_memory()
            return output

        Trainer.training_step, Trainer.train = training_step, train

    def add(self, inputs: dict) -> None:
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.real = self.real + mask.sum()
            self.padded += mask.numel()
        else:  # padding-free batches carry position_ids only
            self.real = self.real + inputs["position_ids"].numel()
            self.padded += inputs["position_ids"].numel()
        self.batches += 1


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def peak_memory() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss()


def precision() -> str:
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def train_ours(args, data: str, model: str, out: str, mode: str):
    from common.recipe.cli import setup_logging
    from sft.run import train

    argv = ["--model_id", model, "--dataset_name", data, "--output_dir", out, "--overwrite_output_dir", "True",
            "--num_train_epochs", args.num_train_epochs, "--max_steps", args.max_steps,
            "--per_device_train_batch_size", args.per_device_train_batch_size,
            "--learning_rate", args.learning_rate, "--lora_r", args.lora_r, "--lora_alpha", args.lora_alpha,
            "--lora_dropout", args.lora_dropout, "--target_modules", "all-linear", "--seed", args.seed,
            "--report_to", "none", "--save_strategy", "no"]
    if mode == "bf16":
        argv += ["--use_bfloat16", "True"]
    if not args.ours_gradient_checkpointing:
        argv += ["--gradient_checkpointing", "False"]
    if args.optimizer:
        argv += ["--optimizer", args.optimizer]
    argv += shlex.split(args.ours_flags)
    setup_logging(f"{args.technique}.py")
    return train(args.technique, [str(a) for a in argv]).trainer


def train_baseline(args, data: str, model: str, out: str, mode: str, sampling: Optional[str] = None):
    """TRL as its documentation shows it: a model path, a prompt/completion data set, a LoraConfig."""
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    init = {}
    if args.technique == "qlora":  # as the TRL docs show QLoRA: a BitsAndBytesConfig for the model
        import torch
        from transformers import BitsAndBytesConfig

        init["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if mode == "bf16" else torch.float32)

    dataset = load_dataset("json", data_files=data, split="train")
    dataset = dataset.map(lambda row: {"prompt": TEMPLATE.replace("{question}", row["question"]),
                                       "completion": " " + row["answer"]["value"]},
                          remove_columns=dataset.column_names)
    config = SFTConfig(
        output_dir=out, report_to="none", bf16=mode == "bf16",
        learning_rate=args.learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps, seed=args.seed,
        save_strategy="no",  # as our run: no checkpoint I/O inside the timed loop
        gradient_checkpointing=args.baseline_gradient_checkpointing,
        model_init_kwargs=init or None,
        train_sampling_strategy=sampling or args.baseline_sampling,
        **({"optim": args.optimizer} if args.optimizer else {}),
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, peft_config=lora)
    trainer.train()
    return trainer


def run_variant(variant: str, args, work: Path) -> dict:
    import torch

    data, model = prepare(args, work)
    mode = precision()
    counter = BatchCounter()
    counter.install()
    started = time.perf_counter()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    if variant == "ours":
        trainer = train_ours(args, data, model, str(work / f"run-{variant}"), mode)
    else:
        trainer = train_baseline(args, data, model, str(work / f"run-{variant}"), mode,
                                 sampling="random" if variant == "baseline_plain" else None)
    if profiler is not None:
        profiler.disable()
        report_profile(profiler, work / f"profile-{variant}.prof")
    wall = time.perf_counter() - started
    final = next(e for e in reversed(trainer.state.log_history) if "train_runtime" in e)
    runtime = final["train_runtime"]
    real = int(counter.real)
    cuda = torch.cuda.is_available()
    return {
        "variant": variant,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": mode,
        "steps": trainer.state.global_step,
        "batches": counter.batches,
        "real_tokens": real,
        "padded_tokens": counter.padded,
        "padding_fraction": round(1 - real / counter.padded, 4) if counter.padded else None,
        "trl_num_tokens": int(getattr(trainer, "_total_train_tokens", 0) or 0),
        "train_runtime_s": runtime,
        "tokens_per_s": round(real / runtime, 1),
        "train_loss": final.get("train_loss"),
        # up to the end of training: loading, data preparation and training, not our saving and plots
        "peak_memory_bytes": counter.peak_at_train_end,
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process RSS",
        "peak_memory_whole_process_bytes": peak_memory(),
        "process_wall_s": round(wall, 2),  # setup (data, tokenizing, model load) + training + saving
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules()),
        "optimizer": str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim),
        "sampling": trainer.args.train_sampling_strategy,
    }


def report_profile(profiler, path: Path) -> None:
    import pstats

    profiler.dump_stats(str(path))
    for order in ("cumulative", "tottime"):
        print(f"\n── cProfile, top 30 by {order} (saved: {path}) " + "─" * 20, flush=True)
        pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats(order).print_stats(30)


# Both variants, each in its own process ------------------------------------------------------

def child_argv(args, variant: str, work: Path) -> list[str]:
    argv = [sys.executable, "-m", "bench.bench_sft", "--variant", variant, "--work_dir", str(work)]
    for f in fields(BenchArguments):
        if f.name in ("variant", "work_dir", "output", "profile"):
            continue
        argv.append(f"--{f.name}={getattr(args, f.name)}")  # `=`: values may start with `--`
    return argv


class Stopped(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (what `timeout` and schedulers send) raises like Ctrl-C while a worker runs, so that the
    worker is stopped too instead of training on, orphaned."""
    def handler(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_child(child: subprocess.Popen, grace: float = 10.0) -> None:
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def spawn(args, variant: str, work: Path) -> dict:
    log_path = work / f"{variant}.log"
    print(f"running {variant} (log: {log_path}) ...", flush=True)
    before, started = cpu_busy_seconds(), time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(child_argv(args, variant, work), stdout=log, stderr=subprocess.STDOUT,
                                 cwd=Path(__file__).resolve().parent.parent)
        try:
            with stop_signals():
                _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # stopped by its user (Ctrl-C, `timeout`): the worker stops too
            stop_child(child)
            raise
        child.returncode = rc = os.waitstatus_to_exitcode(status)
    wall, after = time.perf_counter() - started, cpu_busy_seconds()
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise RuntimeError(f"the {variant} run failed (exit {rc}); last lines of {log_path}:\n" + "\n".join(tail))
    result = json.loads((work / f"result-{variant}.json").read_text())
    # The machine's busy CPU time minus the child's own: what other processes took meanwhile.
    other = None
    if before is not None and after is not None:
        other = round(max(0.0, after - before - usage.ru_utime - usage.ru_stime) / wall, 2)
        if other > 0.25:
            print(f"warning: other processes kept {other:.2f} of {os.cpu_count()} CPUs busy during the {variant} "
                  f"run; its timings are not trustworthy, run the benchmark again on a quiet machine.",
                  file=sys.stderr)
    result["other_busy_cpus"] = other
    return result


def cpu_busy_seconds() -> Optional[float]:
    """Busy (or, on a VM, stolen) CPU seconds of the whole machine since boot (Linux; None elsewhere)."""
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait; no guest


def machine() -> dict:
    import torch

    from common.recipe.run_config import library_versions

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": library_versions()}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(results: dict) -> str:
    head = ("variant", "steps", "real tokens", "padded tokens", "padding", "train s", "tokens/s", "peak memory",
            "loss")
    rows = []
    names = [v for v in VARIANTS if v in results]
    for name in names:
        r = results[name]
        rows.append((name, str(r["steps"]), f"{r['real_tokens']:,}", f"{r['padded_tokens']:,}",
                     f"{100 * r['padding_fraction']:.1f}%", f"{r['train_runtime_s']:.1f}", f"{r['tokens_per_s']:,.1f}",
                     _gib(r["peak_memory_bytes"]), f"{r['train_loss']:.3f}"))
    ours = results["ours"]
    for name in names[1:]:
        base = results[name]
        rows.append((f"ours/{name}", "", "", f"{ours['padded_tokens'] / base['padded_tokens']:.2f}x", "",
                     f"{ours['train_runtime_s'] / base['train_runtime_s']:.2f}x",
                     f"{ours['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                     f"{ours['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x", ""))
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    kind = ours["peak_memory_kind"]
    noise = ", ".join(f"{v} {results[v]['other_busy_cpus']}" for v in names)
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows),
                      f"(tokens/s: non-padding tokens / train_runtime; peak memory: {kind} until training ends, one process "
                      f"per variant;",
                      f" CPUs taken by other processes or the host during each run: {noise})"])


def run_both(args) -> dict:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_sft-"))
    try:
        data, _ = prepare(args, work)
        with open(data, encoding="utf-8") as fh:
            stats = describe([json.loads(line) for line in fh])
        print(f"data: {stats}", flush=True)
        results = {v: spawn(args, v, work) for v in VARIANTS if v != "baseline_plain" or args.plain_baseline}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    ours, base = results["ours"], results["baseline"]
    if ours["real_tokens"] != base["real_tokens"] and args.max_steps <= 0:
        print(f"warning: the variants trained on different token counts ({ours['real_tokens']} vs "
              f"{base['real_tokens']}); the tokenisation differs.", file=sys.stderr)
    if ours["steps"] != base["steps"]:
        print(f"warning: different step counts ({ours['steps']} vs {base['steps']}).", file=sys.stderr)
    report = {
        "machine": machine(),
        "settings": {f.name: getattr(args, f.name) for f in fields(BenchArguments)
                     if f.name not in ("variant", "work_dir", "output", "profile")},
        "model": model_overrides(args),
        "data": stats,
        "results": results,
        "ratio_ours_over_baseline": {
            "tokens_per_s": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
            "train_runtime": round(ours["train_runtime_s"] / base["train_runtime_s"], 3),
            "peak_memory": round(ours["peak_memory_bytes"] / base["peak_memory_bytes"], 3),
            "padded_tokens": round(ours["padded_tokens"] / base["padded_tokens"], 3),
        },
    }
    if "baseline_plain" in results:
        plain = results["baseline_plain"]
        report["ratio_ours_over_baseline_plain"] = {
            "tokens_per_s": round(ours["tokens_per_s"] / plain["tokens_per_s"], 3),
            "peak_memory": round(ours["peak_memory_bytes"] / plain["peak_memory_bytes"], 3)}
    m = report["machine"]
    extra = f" + {args.ours_flags}" if args.ours_flags else ""
    vocab = f", vocabulary {args.vocab_size:,}" if args.vocab_size else ""
    print(f"\n{m['gpu'] or m['cpu']} ({m['nproc']} CPUs), {m['date']}; {args.technique}{extra}; model: "
          f"{args.num_layers} layers, width {args.hidden_size}{vocab}; {args.num_examples} examples, batch "
          f"{args.per_device_train_batch_size}; baseline sampling {args.baseline_sampling}")
    print(table(results))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"numbers written to {out}")
    return report


@contextlib.contextmanager
def bench_env(work: Optional[Path]):
    """Offline by construction, with the datasets cache under the work dir rather than ~/.cache;
    the caller's environment is restored afterwards (the work dir may be deleted)."""
    saved = dict(os.environ)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if work is not None:
        os.environ.setdefault("HF_DATASETS_CACHE", str(work / "datasets-cache"))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main(argv=None) -> int:
    try:
        args = make_parser().parse(argv)
        check(args)
        if args.profile:
            args.set("variant", "ours")
        if args.variant == "both":
            with bench_env(None):  # each variant's process puts its cache in the work dir
                run_both(args)
            return 0
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_sft-"))
        with bench_env(work):
            result = run_variant(args.variant, args, work)
        (work / f"result-{args.variant}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        if not args.work_dir and not args.profile:
            shutil.rmtree(work, ignore_errors=True)
    except UsageError as exc:
        print(f"bench_sft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"bench_sft: stopped ({signal.Signals(signum).name}); its worker was stopped too.", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
