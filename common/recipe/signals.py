"""Ctrl-C and SIGTERM: finish the step, save a checkpoint, say how to resume, exit 128 + signal."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from common.flags.parser import ParsedArgs
from common.recipe.dist import is_main_process, world_size
from common.recipe.lock import mark_stopping
from common.recipe.notebook import leave_terminal
from common.recipe.progress import say

log = logging.getLogger("finetune")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was saved; the script exits with
    128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int = 2):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Set by the first SIGINT or SIGTERM: the run stops after its current step, with a checkpoint."""

    signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _signal_name(signum: int) -> str:
    import signal

    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


@contextlib.contextmanager
def stop_requests():
    """While training: the first SIGINT (Ctrl-C) or SIGTERM (a notebook's stop button, a batch
    scheduler's pre-emption) asks for a checkpoint after the current step; the same signal again
    stops at once. torchrun answers Ctrl-C with a SIGTERM to its workers, which is not "again"."""
    import signal
    import threading

    request = StopRequest()

    def handler(signum, frame):
        if request.signum == signum:
            raise KeyboardInterrupt
        if request.signum is None:
            request.signum = signum
            leave_terminal()  # in a notebook, the cell that showed this run may be gone (common/recipe/notebook.py)
            mark_stopping()  # a run started into the same directory now waits for this one
            log.warning("%s: saving a checkpoint after this step; %s again to stop at once without one.",
                        _signal_name(signum), "press Ctrl-C" if signum == signal.SIGINT else "send it")

    # Only the main thread may set signal handlers; elsewhere signals keep their usual effect.
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def announce_stop(args: ParsedArgs, step: int, checkpoint: Path, request: StopRequest) -> None:
    """After the stop checkpoint is written: say where and how to resume, then raise Interrupted."""
    if is_main_process():
        say(f"{args.script}: stopped at step {step}; checkpoint saved in {checkpoint}. Resume with: "
            f"{resume_command(args)}")
    raise Interrupted(request.signum or 2)


@contextlib.contextmanager
def save_on_interrupt(trainer, args: ParsedArgs):
    """Around trainer.train(): the first Ctrl-C (or SIGTERM) lets the current step finish, saves a
    checkpoint (output_dir/checkpoint-<step> with the trainer state, which `--resume_from_checkpoint
    auto` picks), prints the command that resumes and raises Interrupted. A second one stops at once."""
    from transformers import TrainerCallback

    class StopAfterStep(TrainerCallback):
        stopped_at: Optional[int] = None

        def __init__(self, request: StopRequest):
            self.request = request

        def on_step_end(self, targs, state, control, **kwargs):
            if on_any_process(self.request.requested, targs.device):  # every process stops at the same step
                self.stopped_at = state.global_step
                control.should_log = control.should_save = control.should_training_stop = True

    with stop_requests() as request:
        stop = StopAfterStep(request)
        trainer.add_callback(stop)
        try:
            yield
        finally:
            trainer.remove_callback(stop)
    if stop.stopped_at is not None:
        announce_stop(args, stop.stopped_at, Path(trainer.args.output_dir) / f"checkpoint-{stop.stopped_at}",
                      request)


def on_any_process(flag: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def resume_command(args: ParsedArgs) -> str:
    """This run's command line with `--resume_from_checkpoint auto` (secret flags and
    `--overwrite_output_dir`, which contradicts resuming, left out)."""
    drop = {"resume_from_checkpoint", "overwrite_output_dir", *args.secret_fields()}
    if Path(sys.argv[0]).name == args.script:  # run from the command line: keep the user's spelling
        script, rest, argv, i = sys.argv[0], sys.argv[1:], [], 0
        while i < len(rest):
            token, i = rest[i], i + 1
            if token.startswith("--") and token[2:].split("=", 1)[0] in drop:
                if "=" not in token and i < len(rest) and not rest[i].startswith("--"):
                    i += 1  # its value
                continue
            argv.append(token)
        if args.overwrite_output_dir and not any(t.startswith("--overwrite_output_dir") for t in rest):
            argv += ["--overwrite_output_dir", "False"]  # it came from --config; the command line wins
    else:  # called as main(argv): rebuild from the flags that were set
        flags = args.to_dict()
        script, argv = args.script, [x for n in sorted(args.explicit - drop) for x in (f"--{n}", str(flags[n]))]
    return shlex.join([*_launcher(), script, *argv, "--resume_from_checkpoint", "auto"])


def _launcher() -> list[str]:
    """`python`, or a torchrun line with this run's process count when several processes run
    (torchrun and `accelerate launch` both set these variables; on several nodes, add the
    rendezvous flags you launched with)."""
    world = world_size()
    if world <= 1:
        return ["python"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    nodes = [f"--nnodes={world // local}"] if world > local else []
    return ["torchrun", *nodes, f"--nproc_per_node={local}"]
