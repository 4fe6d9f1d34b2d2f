"""filelock neither names a lock's holder (pid, host) nor says when a dead run's lock is taken over; we add both."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from filelock import FileLock, Timeout

from common.flags.errors import UsageError
from common.recipe.dist import is_main_process

log = logging.getLogger("finetune")

# One run per output directory ----------------------------------------------------------------

LOCK = ".lock"
# A run asked to stop (a notebook's stop button) saves its checkpoint, then exits; the same cell run
# again with `--resume_from_checkpoint auto` waits this long for it rather than stop.
STOPPING_WAIT_S = 600

# lock file -> (its lock, whether this process created the directory for it). Runs called one after
# another in one Python reuse the lock they hold: a second flock of the same file would refuse them.
_held: dict[Path, tuple[FileLock, bool]] = {}


def lock_output_dir(out: str) -> None:
    """The main process holds `out/.lock` until it exits: a second run into the same directory stops at
    once naming the holder. The kernel frees the lock of a run that died, so its file is taken over."""
    if not is_main_process():
        return
    folder = Path(out)
    lock = folder / LOCK
    if lock in _held:
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(lock, blocking=False, thread_local=False, on_acquired=lambda fd: _claim(fd, out))
    try:
        try:
            file_lock.acquire()
        except Timeout:
            holder = _holder(lock)
            if not (holder and holder.get("stopping")):
                raise
            log.info("`--output_dir` %s: waiting for %s to save its last checkpoint and exit.", out, _name(holder))
            file_lock.acquire(timeout=STOPPING_WAIT_S, blocking=True)
    except Timeout:
        raise UsageError(f"`--output_dir` {out} is in use by another run ({_name(_holder(lock))}); wait for it to "
                         f"finish or choose another directory.") from None
    except OSError as exc:  # a file system without flock (some network and FUSE mounts)
        raise UsageError(f"`--output_dir` {out}: cannot lock {lock} ({exc}); choose a directory on a local "
                         f"disk.") from None
    _held[lock] = (file_lock, created)
    atexit.register(release_output_locks)


def _claim(fd: int, out: str) -> None:
    """Called by filelock with the lock held: whoever the file still names died holding it (a clean exit
    removes the file); then this process writes its own name for the runs it refuses."""
    before = os.pread(fd, 4096, 0)
    if before and not _is_me(_parse(before)):
        log.warning("`--output_dir` %s: taking over the lock of %s, which is no longer running.", out,
                    _name(_parse(before)))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _is_me(holder: Optional[dict]) -> bool:
    return holder is not None and {k: holder.get(k) for k in ("pid", "host")} == _me()


def mark_stopping() -> None:
    """This run was asked to stop and is saving its last checkpoint: say so in its lock files, so that
    a run started into the same directory meanwhile waits for it instead of stopping."""
    for lock in _held:
        with contextlib.suppress(OSError):
            lock.write_text(json.dumps({**_me(), "stopping": True}) + "\n")


def _holder(lock: Path) -> Optional[dict]:
    try:
        return _parse(lock.read_bytes())
    except OSError:  # removed meanwhile
        return None


def _parse(data: bytes) -> Optional[dict]:
    with contextlib.suppress(ValueError):
        holder = json.loads(data)
        if isinstance(holder, dict) and "pid" in holder:
            return holder
    return None


def _name(holder: Optional[dict]) -> str:
    """'process 123', with its host when that is another machine; a file that names no one was being
    written when its holder was asked, or is not ours."""
    if holder is None:
        return "a process that left no readable name"
    host = holder.get("host")
    return f"process {holder['pid']}" + ("" if host == socket.gethostname() else f" on {host}")


def release_output_locks() -> None:
    """Drop this process's locks; a directory this run created and left empty goes too."""
    for lock, (file_lock, created) in list(_held.items()):
        # Removed while still held and only if it names us: a run that opened the old file meanwhile sees
        # it unlinked (filelock checks) and tries again on a new one.
        if _is_me(_holder(lock)):
            lock.unlink(missing_ok=True)
        file_lock.release(force=True)
        if created:
            with contextlib.suppress(OSError):
                lock.parent.rmdir()  # only if empty
        del _held[lock]
