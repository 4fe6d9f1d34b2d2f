"""`--push_to_hub`: credentials checked before anything loads; the upload runs after the result is
saved locally, so a failed upload never costs the run (exit code UPLOAD_FAILED, with the command
that uploads it later)."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Optional

from common.flags.errors import UsageError, first_line
from common.hub import network

log = logging.getLogger("finetune")


UPLOAD_FAILED = 3  # exit code: the run finished and is saved locally; only the upload failed

IGNORE = ["checkpoint-*/**", "wandb/**", "runs/**", "*.lock", ".*"]


class UploadFailed(Exception):
    """The finished run is saved locally; its upload did not go through. str() is the one line to print."""


def token(args=None) -> Optional[str]:
    """The Hugging Face token as huggingface_hub finds it: --hub_token, HF_TOKEN (or the older
    HUGGING_FACE_HUB_TOKEN), then the file `hf auth login` writes. Read here, at call time."""
    if args is not None and getattr(args, "hub_token", None):
        return args.hub_token
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    path = Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(hf_home, "token")).expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def check_push(args) -> None:
    """Before any model loads: --push_to_hub needs credentials and must not contradict HF_HUB_OFFLINE."""
    if not getattr(args, "push_to_hub", False):
        return
    if not token(args):
        raise UsageError("`--push_to_hub True` needs Hugging Face credentials: set HF_TOKEN or run `hf auth login` "
                         "(or leave `--push_to_hub` off and upload later with `hf upload`).")
    if network.user_wants_offline():
        raise UsageError("`--push_to_hub True` needs the hub, but HF_HUB_OFFLINE is set; unset it, or leave "
                         "`--push_to_hub` off and upload later with `hf upload`.")


def upload_command(repo: str, out: str) -> str:
    return f"hf upload {shlex.quote(repo)} {shlex.quote(str(out))} . --exclude 'checkpoint-*/**'"


def push_result(args, out: str) -> str:
    """Upload the finished output dir; -> the hub repo id. Raises UploadFailed (never loses `out`)."""
    repo = args.hub_model_id or Path(out).resolve().name
    later = upload_command(repo, out)
    host, _ = network.endpoint()
    network.go_online()
    if not network.hub_reachable():
        raise UploadFailed(f"the run is saved in {out}, but the hub ({host}) could not be reached to upload it; "
                           f"upload it later with: {later}")
    try:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo, token=token(args), exist_ok=True).repo_id
        log.info("uploading %s to the hub as %s ...", out, repo_id)  # the upload's own bar is not drawn in a log
        upload_folder(repo_id=repo_id, folder_path=out, token=token(args), ignore_patterns=IGNORE,
                      commit_message=f"Upload {Path(out).name}")
    except Exception as exc:  # network, permissions, quota: the local result stays as it is
        raise UploadFailed(f"the run is saved in {out}, but the upload to {repo!r} failed ({first_line(exc)}); "
                           f"upload it later with: {later}") from None
    return repo_id
