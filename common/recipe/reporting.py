"""--report_to: TensorBoard and wandb (offline without credentials or network; never a prompt)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from common.flags.checks import reporters
from common.flags.errors import UsageError
from common.flags.parser import ParsedArgs

log = logging.getLogger("finetune")


# Reporting -----------------------------------------------------------------------------------

def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def setup_reporting(args: ParsedArgs, out: str) -> list[str]:
    """-> `report_to` for the trainer. wandb without credentials or network runs offline, never prompts."""
    if args.hub_token:
        os.environ["HF_TOKEN"] = args.hub_token
    chosen = [r for r in reporters(args.report_to) if r != "none"]
    if "wandb" in chosen:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("`--report_to wandb`: the wandb package is not installed; `pip install wandb`.") from None
        os.environ.setdefault("WANDB_DIR", os.path.abspath(out))  # absolute: the wandb service has its own cwd
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode not in ("offline", "disabled", "dryrun"):
            if not _wandb_credentials():
                os.environ["WANDB_MODE"] = "offline"
                log.warning("wandb: no credentials (WANDB_API_KEY or `wandb login`); logging offline to %s/wandb. "
                            "Upload later with `wandb sync %s/wandb/offline-run-*`.", out, out)
            elif not _reachable("api.wandb.ai"):
                os.environ["WANDB_MODE"] = "offline"
                log.warning("wandb: api.wandb.ai is unreachable; logging offline to %s/wandb. Upload later with "
                            "`wandb sync %s/wandb/offline-run-*`.", out, out)
        elif mode in ("offline", "dryrun"):
            log.info("wandb: offline mode; runs are written to %s/wandb.", out)
    return chosen or ["none"]


def finish_reporting(report_to: list[str]) -> None:
    """Close the wandb run so that the next run in this process (tests, chained runs) starts its own."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()  # settings (WANDB_DIR, mode) are read again by the next run
