"""When the Hugging Face libraries may use the network.

A run starts offline: huggingface_hub, transformers and datasets make no request (no hub
look-up, no download counter, no telemetry) unless a hub id is actually given. A hub id turns
the hub back on once a quick connection check (a few seconds at most, no retries) shows the hub
is reachable; an unreachable hub with no cached copy is one clear line, not minutes of retries.

The libraries read HF_HUB_OFFLINE and friends once, when they are imported, so the switch sets
both the environment (for modules imported later and for child processes) and the constants of
modules already imported.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from common.flags.errors import UsageError

log = logging.getLogger("finetune")


_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")

_TRUE = ("1", "true", "yes", "on")

CONNECT_TIMEOUT_S = 3.0


_state: dict = {"user": None, "online": None, "reachable": None}


def _is_true(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in _TRUE


def user_wants_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set by the user, before any run of ours changed it."""
    user = _state["user"] if _state["user"] is not None else {k: os.environ.get(k) for k in
                                                               (*_VARS, "TRANSFORMERS_OFFLINE")}
    return _is_true(user.get("HF_HUB_OFFLINE")) or _is_true(user.get("TRANSFORMERS_OFFLINE"))


def _apply(offline: bool) -> None:
    """Set the environment and the import-time constants of the libraries already loaded."""
    import sys

    user = _state["user"] or {}
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"  # never wanted: these scripts report nothing home
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if offline:
            os.environ[name] = "1"
        elif user.get(name) is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = user[name]
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = offline
        hub.HF_HUB_DISABLE_TELEMETRY = True
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = offline
        ds.HF_DATASETS_OFFLINE = offline
    _state["online"] = not offline


def start_offline() -> None:
    """At the start of every run: no network until a hub id asks for it (see `need_hub`)."""
    _state["user"] = {k: os.environ.get(k) for k in (*_VARS, "TRANSFORMERS_OFFLINE")}
    _state["reachable"] = None
    _apply(offline=True)


def go_online() -> None:
    """The hub on for this run (an upload), unless the user set HF_HUB_OFFLINE."""
    if not user_wants_offline():
        _apply(offline=False)


def endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """One TCP connection to the hub, DNS included, bounded by `timeout` seconds; remembered per run."""
    if _state["reachable"] is None:
        host, port = endpoint()
        result = [False]

        def probe() -> None:
            try:
                with socket.create_connection((host, port), timeout=timeout):
                    result[0] = True
            except OSError:
                pass

        thread = threading.Thread(target=probe, daemon=True)  # a hanging DNS look-up cannot hold us
        thread.start()
        thread.join(timeout)
        _state["reachable"] = result[0]
    return _state["reachable"]


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
                / "huggingface").expanduser()


def is_cached(repo: str, kind: str) -> bool:
    """Whether the Hugging Face cache holds a copy of hub repo `repo` (kind: 'model' or 'dataset')."""
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                     or _hf_home() / "hub").expanduser()
    folder = hub_cache / f"{kind}s--{repo.replace('/', '--')}" / "snapshots"
    if folder.is_dir() and any(folder.iterdir()):
        return True
    if kind == "dataset":  # datasets' own prepared cache
        ds_cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()
        return (ds_cache / repo.replace("/", "___")).is_dir()
    return False


def in_run() -> bool:
    return _state["user"] is not None


def end_run() -> None:
    _state["user"] = None


def need_hub(subject: str, repo: str, kind: str) -> None:
    """A script's input is hub repo `repo` (kind 'model' or 'dataset'), not a local path. Turn the hub on
    if it answers within a few seconds; else use the cached copy, or stop with one line (UsageError).
    `subject` starts that line, e.g. "`--model_id models/tiny_llama`: not a local directory".
    Outside a script's run (library use, unit tests) the libraries' own settings apply."""
    if not in_run():
        return
    if user_wants_offline():
        if is_cached(repo, kind):
            return
        raise UsageError(f"{subject}, and HF_HUB_OFFLINE is set while the hub {kind} {repo!r} is not in the local "
                         f"cache; check the name, or unset HF_HUB_OFFLINE on a machine with network.")
    if _state["online"]:
        return
    host, _ = endpoint()
    if hub_reachable():
        _apply(offline=False)
        return
    if is_cached(repo, kind):
        log.info("the hub (%s) could not be reached; using the cached copy of %s %r.", host, kind, repo)
        return
    raise UsageError(f"{subject}, and the hub ({host}) could not be reached to look up {kind} {repo!r}; check the "
                     f"name, or the network.")
