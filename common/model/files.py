"""Checks of a local model or adapter directory's files before anything loads: transformers and PEFT
report a broken file late (after the base model loaded), as a hub look-up that failed, or as a raw
safetensors or JSON error. Each check reads only JSON files and safetensors headers."""

from __future__ import annotations

import json
import os
import struct
from typing import Optional

from common.flags.errors import UsageError

# config.json sizes that must be positive for any model to be built.
_SIZES = ("num_hidden_layers", "n_layer", "num_layers", "hidden_size", "n_embd", "d_model", "num_attention_heads",
          "n_head", "intermediate_size", "vocab_size")


def read_json(path: str, subject: str, fix: str) -> dict:
    """A JSON object from `path`, or one line naming the file (subject: what points at it)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{subject}: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{subject}: {path} is not UTF-8 text; {fix}") from None
    except OSError as exc:
        raise UsageError(f"{subject}: {path} cannot be read ({exc.strerror}); {fix}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{subject}: {path} holds no JSON object; {fix}")
    return data


def safetensors_problem(path: str) -> Optional[str]:
    """What is wrong with a .safetensors file (cut off, not safetensors), or None. Reads the header only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "it is empty or cut off"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return "it is cut off (its header runs past the end of the file)"
            header = json.loads(fh.read(length))
    except (OSError, ValueError, UnicodeDecodeError):
        return "it is not a safetensors file"
    if not isinstance(header, dict):
        return "it is not a safetensors file"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if ends and 8 + length + max(ends) > size:
        return f"it is cut off ({size} bytes of the {8 + length + max(ends)} its header lists)"
    return None


def check_weights(folder: str, names: list[str], subject: str) -> None:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem:
                raise UsageError(f"{subject}: {path} is damaged: {problem}; copy or save it again.")


def check_model_dir(path: str, subject: str) -> None:
    """A local model directory: config.json readable with positive sizes, weight files whole."""
    config = read_json(os.path.join(path, "config.json"), subject, "fix or replace the file.")
    texts = [config, *(v for v in config.values() if isinstance(v, dict))]  # text_config of multimodal models
    for cfg in texts:
        for key in _SIZES:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise UsageError(f"{subject}: {os.path.join(path, 'config.json')} has `{key}: {value}`; it must be "
                                 f"a positive number.")
    check_weights(path, sorted(n for n in os.listdir(path) if n.endswith(".safetensors")), subject)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter_config(path: str, subject: str) -> dict:
    return read_json(os.path.join(path, "adapter_config.json"), subject,
                     "save the adapter again, or restore the file from its training run.")


def check_adapter_weights(path: str, subject: str) -> None:
    """An adapter directory's weights: there and whole."""
    if not any(os.path.isfile(os.path.join(path, n)) for n in ADAPTER_WEIGHTS):
        raise UsageError(f"{subject}: the adapter directory {path} has no adapter_model.safetensors (its weights); "
                         f"copy it from the training run's output dir or a checkpoint.")
    check_weights(path, list(ADAPTER_WEIGHTS), subject)
