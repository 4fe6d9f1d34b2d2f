"""One run per output directory: a lock file naming its holder; a stale lock is taken over."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from common.flags.errors import UsageError
from common.recipe.dist import is_main_process

log = logging.getLogger("finetune")

# One run per output directory ----------------------------------------------------------------

LOCK = ".lock"

_held: dict[Path, bool] = {}  # lock file -> whether this process created the directory for it



def lock_output_dir(out: str) -> None:
    """The main process holds `out/.lock` (its pid and host) until it exits: a second run into the
    same directory stops at once naming the holder; a lock whose process is gone is taken over."""
    if not is_main_process():
        return
    folder = Path(out)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    # Written whole to a private file, then linked into place: the link fails if a lock exists, so two
    # runs starting together cannot both win, and a lock is never seen half-written.
    tmp = folder / f".lock.{me['pid']}.tmp"
    tmp.write_text(json.dumps(me) + "\n", encoding="utf-8")
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                holder = _lock_holder(lock)
                if holder is None:
                    continue  # removed meanwhile
                if holder == me:  # this process again (runs called one after another in one Python)
                    break
                pid, host = holder.get("pid"), holder.get("host")
                if host != me["host"]:
                    raise UsageError(f"`--output_dir` {out} is in use by process {pid} on {host}; choose another "
                                     f"directory, or delete {lock} if that run is gone.") from None
                if _alive(pid):
                    raise UsageError(f"`--output_dir` {out} is in use by another run (process {pid}); wait for it "
                                     f"to finish or choose another directory.") from None
                log.warning("`--output_dir` %s: taking over the lock of process %s, which is no longer running.",
                            out, pid)
                lock.unlink(missing_ok=True)
        else:
            raise UsageError(f"`--output_dir` {out}: could not take its lock {lock}; delete it if no run is using "
                             f"the directory.")
    finally:
        tmp.unlink(missing_ok=True)
    if lock not in _held:
        _held[lock] = created
    atexit.register(release_output_locks)



def _lock_holder(lock: Path) -> Optional[dict]:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": "unknown", "host": "unknown"}  # unreadable: never guess it is stale
    return holder if isinstance(holder, dict) else {"pid": "unknown", "host": "unknown"}



def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or a pid we cannot judge
    return True



def release_output_locks() -> None:
    """Drop this process's locks; a directory this run created and left empty goes too."""
    for lock, created in list(_held.items()):
        holder = _lock_holder(lock)
        if holder is not None and holder.get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                lock.parent.rmdir()  # only if empty
        del _held[lock]

