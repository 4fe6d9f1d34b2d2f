"""A notebook's stop button must leave a checkpoint: IPython answers it by sending Ctrl-C to a
`!python ...` command and killing the command 0.2 s later (SIGHUP, SIGINT, then SIGKILL), far
sooner than a training step ends or a checkpoint is written. So, in a notebook, a training script
runs its training in a child process in a session of its own, which that kill does not reach: the
process the cell started only relays the first stop to it and waits. A stopped child finishes its
step, saves its checkpoint and exits on its own, writing what it still has to say to a log file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from common.recipe.progress import in_notebook, say

DETACHED_VAR = "FINETUNE_DETACHED"  # set in the child: train here, do not detach again
STOP_LOG_VAR = "FINETUNE_STOP_LOG"  # where the child writes once it has been asked to stop


def should_detach(script: str) -> bool:
    """In a notebook, for a script run from the command line by a single process (torchrun and
    `accelerate launch` keep their own process groups)."""
    return (in_notebook() and os.environ.get(DETACHED_VAR) != "1" and Path(sys.argv[0]).name == script
            and "WORLD_SIZE" not in os.environ and hasattr(os, "setsid")
            and threading.current_thread() is threading.main_thread())


def run_detached(script: str) -> int:
    """Run this command again in a new session and wait for it. The first SIGINT or SIGTERM is passed
    on to it, later ones are not (IPython sends SIGHUP, SIGINT and SIGKILL while killing the cell's
    command after the stop button's Ctrl-C). A SIGHUP that comes first (the kernel shut down or
    restarted, closing the terminal) is passed on as SIGTERM: the run saves and exits rather than
    train on unseen. -> the child's exit code."""
    fd, stop_log = tempfile.mkstemp(prefix=f"{Path(script).stem}-stop-", suffix=".log")
    os.close(fd)
    env = {**os.environ, DETACHED_VAR: "1", STOP_LOG_VAR: stop_log}
    child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    relayed = []

    def relay(signum, frame):
        if relayed:
            return
        relayed.append(signum)
        os.kill(child.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)
        with_suppressed_oserror(  # the terminal may be gone already
            say, f"{script}: stopping: the run finishes its current step and saves a checkpoint, in process "
                 f"{child.pid}, which goes on if this cell is killed; its last lines go to {stop_log}. Then resume "
                 f"with the same command and `--resume_from_checkpoint auto`.")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, relay)
    code = child.wait()
    # Still here: the child's last lines were not seen; show them.
    text = Path(stop_log).read_text(errors="replace") if os.path.exists(stop_log) else ""
    if text:
        with_suppressed_oserror(sys.stderr.write, text)
        with_suppressed_oserror(sys.stderr.flush)
    with_suppressed_oserror(os.remove, stop_log)
    return 128 - code if code < 0 else code


def leave_terminal() -> None:
    """In the child, once asked to stop: the cell may be gone, so what remains goes to the stop log."""
    path = os.environ.get(STOP_LOG_VAR)
    if os.environ.get(DETACHED_VAR) != "1" or not path:
        return
    for stream in (sys.stdout, sys.stderr):
        with_suppressed_oserror(stream.flush)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def with_suppressed_oserror(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
