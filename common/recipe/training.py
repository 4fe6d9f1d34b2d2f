"""Training under guard (resume, Ctrl-C, a non-finite loss, a full disk) and the end of every
Trainer-based run: the final outputs, the summary and the upload."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Optional

from common.flags.errors import UsageError
from common.flags.parser import ParsedArgs
from common.recipe.callbacks import NonFiniteLoss, check_finite_weights, run_config_callback, timed_save_callback
from common.recipe.dist import is_main_process
from common.recipe.outputs import (
    disk_full_error,
    is_disk_full,
    resolve_resume,
    save_final,
)
from common.recipe.patches import exact_resume, one_tensorboard_run, whole_run_loss
from common.recipe.progress import readable_progress
from common.recipe.reporting import finish_reporting
from common.recipe.run_config import run_config
from common.recipe.signals import resume_command, save_on_interrupt
from common.recipe.summary import Timer, print_summary, summary, write_plots

log = logging.getLogger("finetune")


def train_guarded(trainer, args: ParsedArgs, out: str,
                  technique: Optional[str] = None) -> tuple[dict[str, Any], float]:
    """trainer.train(), resuming as `--resume_from_checkpoint` asks, with a checkpoint on Ctrl-C or
    SIGTERM and a non-finite loss turned into a one-line error; every checkpoint carries
    run_config.json; -> (metrics, wall seconds)."""
    trainer.add_callback(run_config_callback(args, technique or Path(args.script).stem))
    if args.save_minutes:
        trainer.add_callback(timed_save_callback(args.save_minutes))
    resume = resolve_resume(args, out)
    exact_resume(trainer, resume)
    one_tensorboard_run(trainer)
    readable_progress(trainer)  # one readable line per logging step instead of raw dicts
    with Timer() as timer, save_on_interrupt(trainer, args), disk_full_exits(args, out):
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except NonFiniteLoss as exc:
            raise UsageError(str(exc)) from None
    metrics = dict(result.metrics)
    whole_run_loss(trainer, metrics)
    return metrics, timer.elapsed


def finish_run(trainer, tokenizer, args: ParsedArgs, out: str, technique: str, metrics: dict[str, Any],
               wall: float, extra: dict[str, Any], report_to: list[str], drop_adapters: tuple = (),
               more_summary: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The end of every Trainer-based run: metrics and trainer state, the final outputs written
    atomically with run_config.json (`extra` plus the summary), reporters closed, plots, summary."""
    try:
        check_finite_weights(trainer.model, trainer.state.global_step, trainer.args.device)
    except NonFiniteLoss as exc:
        raise UsageError(str(exc)) from None
    info = {**summary(trainer, metrics, out, wall), **(more_summary or {})}
    with disk_full_exits(args, out):
        trainer.save_metrics("all", metrics)
        trainer.save_state()
        save_final(trainer, tokenizer, out, run_config(args, technique, {**extra, "summary": info}),
                   drop_adapters=drop_adapters)
    finish_reporting(report_to)
    write_plots(out)
    print_summary(info)
    push_when_asked(args, out)
    return info


@contextlib.contextmanager
def disk_full_exits(args: ParsedArgs, out: str):
    """Any save inside (a checkpoint, by the Trainer or ppo.py, or the final outputs) that runs out of
    space ends in one line naming the last complete checkpoint, with the command that finishes the run."""
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:
        if is_disk_full(exc, out):
            raise disk_full_error(out, resume_command(args)) from None
        raise


def push_when_asked(args: ParsedArgs, out: str) -> None:
    """`--push_to_hub`: upload the finished output directory, from the main process only."""
    if args.push_to_hub and is_main_process():
        from common.hub.upload import push_result

        repo = push_result(args, out)  # UploadFailed: run_cli says so and exits with hub.UPLOAD_FAILED
        log.info("uploaded to the hub: %s", repo)
