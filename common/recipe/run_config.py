"""run_config.json: the flags of a run (secrets redacted), library versions and results."""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Any

from common.flags.parser import ParsedArgs

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")

_SECRET_KEY = re.compile(r"(^|_)(token|api_key|apikey|secret|password)$", re.IGNORECASE)


# Saving --------------------------------------------------------------------------------------

def redact(value: Any, secret_keys: set[str]) -> Any:
    secrets = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]

    def scrub(v: Any, key: str = "") -> Any:
        if isinstance(v, dict):
            return {k: scrub(x, k) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [scrub(x, key) for x in v]
        if v is not None and (key in secret_keys or _SECRET_KEY.search(key)):
            return "***"
        if isinstance(v, str):
            for s in secrets:
                if s and s in v:
                    v = v.replace(s, "***")
        return v

    return scrub(value)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_config(args: ParsedArgs, technique: str, extra: dict[str, Any]) -> dict[str, Any]:
    argv = [a for a in sys.argv]
    return redact({
        "script": args.script,
        "technique": technique,
        "flags": args.to_dict(),
        "explicit_flags": sorted(args.explicit),
        "command": argv,
        "versions": library_versions(),
        **extra,
    }, args.secret_fields())
