"""The end of a run: the summary printed and saved, peak memory, training-curve plots."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Any

from common.recipe.dist import is_main_process
from common.recipe.outputs import RUN_CONFIG

log = logging.getLogger("finetune")


def write_plots(out: str) -> None:
    """Training curves into out/plots; a plotting problem never fails a finished run."""
    if not is_main_process():
        return
    try:
        from common.recipe.plotting import plot_run

        paths = plot_run(out)
        if paths:
            log.info("plots: %s", ", ".join(str(p) for p in paths))
    except Exception as exc:  # matplotlib missing or a backend problem
        log.warning("could not draw the training curves (%s); `python -m common.recipe.plotting %s` retries.", exc, out)


# Summary -------------------------------------------------------------------------------------

def peak_memory_gib() -> tuple[float, str]:
    """(GiB, what was measured): this process's peak allocated GPU memory, or its peak RSS on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU (allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return rss_bytes / 2**30, "process RSS"


def peak_memory() -> str:
    gib, kind = peak_memory_gib()
    return f"{gib:.2f} GiB {kind}"


def summary(trainer, metrics: dict[str, Any], out: str, wall: float) -> dict[str, Any]:
    tokens = getattr(trainer, "_total_train_tokens", 0) or 0
    runtime = metrics.get("train_runtime") or wall
    info = {
        "steps": trainer.state.global_step,
        "train_loss": metrics.get("train_loss"),
        "runtime_s": round(runtime, 2),
        "tokens_trained": int(tokens) or None,  # None: this trainer does not count them (ORPO, SimPO)
        "tokens_per_s": round(tokens / runtime, 1) if runtime and tokens else None,
        "peak_memory": peak_memory(),
        "peak_memory_gib": round(peak_memory_gib()[0], 3),  # the same figure as a number (compare.py)
        "output_dir": os.path.abspath(out),
    }
    return info


def print_summary(info: dict[str, Any]) -> None:
    if not is_main_process():
        return
    loss = info.get("train_loss")
    lines = [
        "",
        "── run summary " + "─" * 40,
        f"  steps        {info['steps']}",
        f"  train loss   {loss:.4f}" if isinstance(loss, float) else "  train loss   n/a",
        f"  runtime      {info['runtime_s']:.1f} s",
        f"  tokens/s     {info['tokens_per_s']} ({info['tokens_trained']} non-padding tokens)" if info.get(
            "tokens_trained") else "  tokens/s     not counted by this trainer",
        f"  peak memory  {info['peak_memory']}",
        f"  written to   {info['output_dir']}  (adapter, tokenizer, {RUN_CONFIG}, metrics)",
    ]
    print("\n".join(lines), flush=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.start
