"""Throughput of ppo.py: rollouts per second and where a PPO step's time goes (sampling answers,
scoring them: log-probs, reference, values and reward, and the PPO optimisation epochs).

    python -m bench.bench_ppo                                   # ~1.5 min on 2 CPU cores
    python -m bench.bench_ppo --response_length 32 --steps 4    # longer answers
    python -m bench.bench_ppo --ppo_flags "--load_in_4bit True"   # any ppo.py flags on top (e.g. on a GPU)

Same synthetic TriviaQA-shaped prompts and randomly initialised Llama-style model as
bench_sft.py; the reward is `triviaqa_f1` against the gold answers. A random model rarely emits
EOS, so every answer runs to `--response_length`: the most generation work a step can take.

`--compare_trl112 True` also runs TRL 1.12's PPOTrainer (`trl.experimental.ppo`, the last TRL
that ships one) on the same model, prompts, rollouts per step, response length and epochs, in its
own virtual environment, which the benchmark builds on first use with the versions pinned in
`TRL112_PINS` (from PyPI; torch is shared with this environment, see `trl112_python`):

    python -m bench.bench_ppo --compare_trl112 True    # + ~3 min to build the environment once

The two sides draw their prompts in different orders, and a step that meets a long prompt takes
about twice the time and memory of the others. For figures that compare, let the timed steps be
one pass over the prompts on both sides (32 rollouts a step x 4 steps = 128 prompts):

    python -m bench.bench_ppo --compare_trl112 True --num_prompts 128 --steps 4    # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from bench.bench_sft import bench_env
from common.flags.groups import flag
from common.flags.parser import FlagParser
from common.flags.errors import UsageError


@dataclass
class PPOBenchArguments:
    num_prompts: int = flag(512, "Synthetic TriviaQA-shaped questions to draw prompts from.")
    hidden_size: int = flag(512, "Model width (a multiple of 64), as in bench_sft.py.")
    num_layers: int = flag(8, "Transformer layers.")
    steps: int = flag(8, "PPO steps to time (after one untimed warm-up step).")
    per_device_train_batch_size: int = flag(16, "Micro-batch of the PPO updates.")
    num_mini_batches: int = flag(2, "Mini-batches per step: rollouts per step = batch x mini-batches.")
    ppo_epochs: int = flag(4, "Optimisation epochs over each step's rollouts.")
    response_length: int = flag(16, "Tokens sampled per answer.")
    seed: int = flag(42, "Seed of the data, the model and training.")
    ppo_flags: str = flag("", "More ppo.py flags, as one string (e.g. \"--load_in_4bit True\").")
    gradient_checkpointing: bool = flag(True, "Gradient checkpointing in the PPO updates (ppo.py's default), both sides.")
    compare_trl112: bool = flag(False, "Also run TRL 1.12's PPOTrainer side by side, in its own virtual environment "
                                       "(built on first use from PyPI; needs network once).")
    trl112_venv: str = flag("~/.cache/finetune-bench/trl-1.12", "Where that virtual environment is built and kept.")
    work_dir: Optional[str] = flag(None, "Where the data, the model and the run go (default: a temporary "
                                         "directory, removed at the end).")
    output: str = flag("outputs/bench_ppo.json", "JSON file for the measured numbers.")


def make_parser() -> FlagParser:
    return FlagParser([PPOBenchArguments], prog="python -m bench.bench_ppo",
                      description="ppo.py throughput: rollouts/s and the generation/optimisation split.")


def check(args) -> None:
    for name in ("num_prompts", "hidden_size", "num_layers", "steps", "per_device_train_batch_size",
                 "num_mini_batches", "ppo_epochs", "response_length"):
        if getattr(args, name) <= 0:
            raise UsageError(f"`--{name}` must be > 0 (got {getattr(args, name)}).")
    if args.hidden_size % 64:
        raise UsageError(f"`--hidden_size {args.hidden_size}` must be a multiple of 64 (one head per 64).")
    try:
        shlex.split(args.ppo_flags)
    except ValueError as exc:
        raise UsageError(f"`--ppo_flags`: {exc}; quote it as one shell string.") from None


def run(args, work: Path) -> dict:
    from bench import bench_sft
    from common.recipe.cli import setup_logging
    from rlhf.ppo import train

    rollouts = args.per_device_train_batch_size * args.num_mini_batches
    if args.num_prompts < rollouts:
        raise UsageError(f"`--num_prompts {args.num_prompts}` is fewer than the {rollouts} rollouts of one step.")
    shape = SimpleNamespace(num_examples=args.num_prompts, seed=args.seed, hidden_size=args.hidden_size,
                            num_layers=args.num_layers)
    data, model = bench_sft.prepare(shape, work)
    base = ["--model_id", model, "--dataset_name", data, "--reward_function", "triviaqa_f1",
            "--per_device_train_batch_size", args.per_device_train_batch_size, "--num_mini_batches",
            args.num_mini_batches, "--ppo_epochs", args.ppo_epochs, "--response_length", args.response_length,
            "--seed", args.seed, "--report_to", "none", "--save_strategy", "no", "--overwrite_output_dir", "True",
            "--gradient_checkpointing", args.gradient_checkpointing, *shlex.split(args.ppo_flags)]
    setup_logging("ppo.py")
    # One untimed step first: the first generate() call pays one-off set-up costs.
    train([str(a) for a in base + ["--max_steps", 1, "--output_dir", work / "warm-up"]])
    started = time.perf_counter()
    result = train([str(a) for a in base + ["--max_steps", args.steps, "--output_dir", work / "run"]])
    wall = time.perf_counter() - started
    s = result.summary
    timed = s["time_sampling_s"] + s["time_scoring_s"] + s["time_optimisation_s"]
    return {
        "steps": s["steps"], "rollouts": s["rollouts"], "runtime_s": s["runtime_s"],
        "rollouts_per_s": s["rollouts_per_s"],
        "sampled_tokens_per_s": round(s["rollouts"] * args.response_length / s["time_sampling_s"], 1),
        "time_sampling_s": s["time_sampling_s"], "time_scoring_s": s["time_scoring_s"],
        "time_generation_s": s["time_generation_s"], "time_optimisation_s": s["time_optimisation_s"],
        "share": {k: round(s[f"time_{k}_s"] / timed, 3) for k in ("sampling", "scoring", "optimisation")},
        "peak_memory_bytes": bench_sft.peak_memory(),
        "peak_memory_kind": "cuda max_memory_allocated" if _cuda() else "process RSS",
        "process_wall_s": round(wall, 2),
        "mean_response_length": sum(e["response_length"] for e in result.history) / len(result.history),
    }


# TRL 1.12 and the newest releases of its dependencies that it knows of (its code checks
# transformers up to 5.8, accelerate 1.12, PEFT below 0.20).
TRL112_PINS = ("trl==1.12.0", "transformers==5.8.1", "accelerate==1.12.0", "peft==0.20.0", "datasets==4.8.5")


def trl112_python(venv: Path) -> str:
    """The Python of a virtual environment with TRL 1.12, built once. torch is not installed there but
    shared with this environment through a .pth file: PyPI's Linux torch wheels bring about 3 GB of
    CUDA libraries, and both sides should run the same torch anyway."""
    python = venv / "bin" / "python"
    stamp = venv / "finetune-pins.json"
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == list(TRL112_PINS):
        return str(python)
    import torch

    print(f"building the TRL 1.12 environment in {venv} ({', '.join(TRL112_PINS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shared = venv / "shared-torch"
    shared.mkdir(exist_ok=True)
    origin = Path(torch.__file__).resolve().parent.parent
    for entry in origin.iterdir():
        if entry.name in ("torch", "torchgen", "functorch") or (entry.name.startswith("torch-")
                                                                  and entry.name.endswith(".dist-info")):
            os.symlink(entry, shared / entry.name)
    (site / "finetune_shared_torch.pth").write_text(f"{shared}\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *TRL112_PINS],
                   check=True)
    stamp.write_text(json.dumps(list(TRL112_PINS)))
    return str(python)


def run_trl112(args, work: Path) -> dict:
    """TRL 1.12's PPOTrainer in its own process and environment (bench/trl112_ppo_worker.py)."""
    from bench import bench_sft
    from common.flags.groups import LoraArguments

    python = trl112_python(Path(os.path.expanduser(args.trl112_venv)))
    shape = SimpleNamespace(num_examples=args.num_prompts, seed=args.seed, hidden_size=args.hidden_size,
                            num_layers=args.num_layers)
    data, model = bench_sft.prepare(shape, work)
    lora = {f: getattr(LoraArguments, f) for f in ("lora_r", "lora_alpha", "lora_dropout")}  # ppo.py's defaults
    settings = {"model": model, "data": data, "template": bench_sft.TEMPLATE, "seed": args.seed,
                "work": str(work / "trl112"), "output": str(work / "trl112.json"), "steps": args.steps,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "num_mini_batches": args.num_mini_batches, "ppo_epochs": args.ppo_epochs,
                "response_length": args.response_length, "learning_rate": 1e-4,  # ppo.py's default
                "gradient_checkpointing": args.gradient_checkpointing, **lora}
    (work / "trl112-settings.json").write_text(json.dumps(settings))
    log = work / "trl112.log"
    print(f"running TRL 1.12's PPOTrainer (log: {log}) ...", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    with open(log, "w", encoding="utf-8") as fh:
        done = subprocess.run([python, str(Path(__file__).with_name("trl112_ppo_worker.py")),
                               str(work / "trl112-settings.json")], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise RuntimeError(f"TRL 1.12's PPO run failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    return json.loads((work / "trl112.json").read_text())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def report(args, result: dict) -> str:
    from bench.bench_sft import _gib, machine

    m = machine()
    rollouts = args.per_device_train_batch_size * args.num_mini_batches
    share = result["share"]
    lines = [
        f"{m['gpu'] or m['cpu']} ({m['nproc']} CPUs), {m['date']}; model: {args.num_layers} layers, width "
        f"{args.hidden_size}; {rollouts} rollouts a step, {args.response_length}-token answers, "
        f"{args.ppo_epochs} PPO epochs",
        f"  steps timed        {result['steps']} ({result['rollouts']} rollouts in {result['runtime_s']:.1f} s)",
        f"  rollouts/s         {result['rollouts_per_s']}",
        f"  sampling           {result['time_sampling_s']:.1f} s ({100 * share['sampling']:.0f}%), "
        f"{result['sampled_tokens_per_s']:,.0f} sampled tokens/s",
        f"  scoring            {result['time_scoring_s']:.1f} s ({100 * share['scoring']:.0f}%): policy and "
        f"reference log-probs, values, reward",
        f"  optimisation       {result['time_optimisation_s']:.1f} s ({100 * share['optimisation']:.0f}%)",
        f"  peak memory        {_gib(result['peak_memory_bytes'])} ({result['peak_memory_kind']})",
    ]
    trl = result.get("trl112")
    if trl:
        lines += [
            f"  TRL {trl['trl']} PPOTrainer (transformers {trl['transformers']}, torch {trl['torch']}; policy LoRA, "
            f"separate value and reward models):",
            f"    rollouts/s       {trl['rollouts_per_s']} ({trl['rollouts']} rollouts in {trl['runtime_s']:.1f} s)",
            f"    peak memory      {_gib(trl['peak_memory_bytes'])} ({trl['peak_memory_kind']})",
            f"  ours/TRL 1.12      rollouts/s {result['rollouts_per_s'] / trl['rollouts_per_s']:.2f}x, peak memory "
            f"{result['peak_memory_bytes'] / trl['peak_memory_bytes']:.2f}x",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = make_parser().parse(argv)
        check(args)
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_ppo-"))
        try:
            with bench_env(work):
                result = run(args, work)
            if args.compare_trl112:  # after ours: ours' peak memory is read when its run ends
                result["trl112"] = run_trl112(args, work)
        finally:
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)
    except UsageError as exc:
        print(f"bench_ppo: error: {exc}", file=sys.stderr)
        return 2
    from bench.bench_sft import machine

    text = report(args, result)
    print("\n" + text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "settings": args.to_dict(), "result": result}, indent=2)
                   + "\n", encoding="utf-8")
    print(f"numbers written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
