"""Where a model comes from: a hub id, a local model dir, or an output dir of these scripts (base
model + adapter), and the prompt settings an adapter's run_config.json carries to the next run."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

from common.flags.errors import UsageError
from common.hub import network
from common.model import files

log = logging.getLogger("finetune")


@dataclass
class ModelSource:
    base: str  # hub id or local dir of the base model
    adapter_dir: Optional[str] = None  # set when --model_id is an adapter written by one of our scripts
    adapter_config: Optional[dict] = None

    @property
    def adapter_type(self) -> Optional[str]:
        return (self.adapter_config or {}).get("peft_type")


def resolve_model(model_id: str, flag: str = "model_id") -> ModelSource:
    """--model_id (or the `flag` that names a model) -> where the base model and the adapter (if any)
    are, their files checked (common.model.files). No heavy imports."""
    path = os.path.expanduser(model_id)
    subject = f"`--{flag}` {model_id}"
    if os.path.isdir(path):
        adapter_cfg = os.path.join(path, "adapter_config.json")
        if os.path.isfile(adapter_cfg):
            config = files.read_adapter_config(path, subject)
            base = config.get("base_model_name_or_path")
            if not base:
                raise UsageError(f"{subject}: adapter_config.json names no base model "
                                 f"(`base_model_name_or_path`); fix the file or pass the base model.")
            # A relative base path is relative to where the run was launched; try the adapter's
            # own location too so that moved run directories still load.
            if not os.path.isabs(base) and not os.path.isdir(base) and os.path.isdir(os.path.join(path, base)):
                base = os.path.join(path, base)
            if (base.startswith((".", "/", "~")) or base.count("/") > 1) and not os.path.isdir(os.path.expanduser(base)):
                raise UsageError(f"{subject}: its base model {base!r} is not there any more; "
                                 f"edit `base_model_name_or_path` in adapter_config.json.")
            source = ModelSource(base=os.path.expanduser(base), adapter_dir=path, adapter_config=config)
            if not os.path.isdir(source.base):
                network.need_hub(f"{subject}: its base model {base!r} is not a local directory", base, "model")
            elif os.path.isfile(os.path.join(source.base, "config.json")):
                files.check_model_dir(source.base, f"{subject}: its base model")
            files.check_adapter_weights(path, subject)
            return source
        if os.path.isfile(os.path.join(path, "config.json")):
            files.check_model_dir(path, subject)
            return ModelSource(base=path)
        raise UsageError(f"{subject}: directory holds neither a model (config.json) nor an adapter "
                         f"(adapter_config.json).")
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:  # hub ids are `name` or `owner/name`
        raise UsageError(f"{subject}: no such directory; give a local model dir or a hub id.")
    network.need_hub(f"{subject}: not a local directory", model_id, "model")
    return ModelSource(base=model_id)


def saved_run_config(source: ModelSource) -> dict:
    """run_config.json of the run that wrote an adapter dir, one of its checkpoint-N folders (older
    checkpoints without their own copy take their run's), or a model merged by merge.py; {} for
    anything else (a hub model, a model of someone else's)."""
    folder = source.adapter_dir or (source.base if os.path.isdir(source.base) else None)
    if not folder:
        return {}
    candidates = [os.path.join(folder, "run_config.json")]
    if re.fullmatch(r"checkpoint-\d+", os.path.basename(os.path.normpath(folder))):
        candidates.append(os.path.join(os.path.dirname(os.path.normpath(folder)), "run_config.json"))
    for path in candidates:
        if os.path.isfile(path):
            # Unreadable, it would silently change the prompt format the adapter was trained with.
            return files.read_json(path, f"the run that wrote {folder}",
                                   "its training settings (prompt format, quantization) cannot be taken over; "
                                   "restore the file or remove it and pass those flags yourself.")
    return {}


# Settings an adapter dir's own run fixes: the base must be loaded the same way (4-bit stays
# 4-bit) and prompts must be formatted as in training. Taken over unless given explicitly.
# A merged model records only the prompt flags (its weights are no longer quantized).
PROMPT_FLAGS = ("prompt_template", "use_chat_template", "system_prompt", "system_message")

INHERITED_FLAGS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                   *PROMPT_FLAGS)


def inherit_from_adapter(args, source: ModelSource, names=INHERITED_FLAGS) -> None:
    trained = saved_run_config(source).get("flags", {})
    taken = []
    for name in names:
        if name in trained and name not in args.explicit:
            try:
                current = getattr(args, name)
            except AttributeError:
                continue
            if current != trained[name]:
                args.set(name, trained[name])
                taken.append(f"--{name} {trained[name]!r}")
    if taken:
        log.info("from the run that wrote %s: %s", source.adapter_dir or source.base, ", ".join(taken))
