"""Merge a LoRA/DoRA/QLoRA adapter into its base model and save a plain model."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from common.flags.errors import UsageError
from common.flags.groups import MergeArguments
from common.flags.parser import FlagParser

log = logging.getLogger("finetune")


def make_parser() -> FlagParser:
    return FlagParser([MergeArguments], prog="merge.py",
                      description="Merge a LoRA, DoRA or QLoRA adapter into its base model; saves safetensors "
                                  "and the tokenizer.")


def run_merge(args) -> Path:
    from common.model.source import resolve_model, saved_run_config

    if not args.adapter:
        raise UsageError("`--adapter` is required: an adapter dir written by lora.py, dora.py or qlora.py.")
    if not args.output_dir:
        raise UsageError("`--output_dir` is required: where the merged model goes.")
    from common.flags.checks import check_creatable

    check_creatable(args.output_dir, "--output_dir")
    source = resolve_model(args.adapter, flag="adapter")
    if not source.adapter_dir:
        raise UsageError(f"`--adapter` {args.adapter}: no adapter_config.json there; that is already a plain model.")
    if source.adapter_type != "LORA":
        raise UsageError(f"`--adapter` {args.adapter}: a {source.adapter_type} adapter (prompt learning) adds "
                         f"virtual tokens and cannot be merged into the weights; load it with its base instead "
                         f"(evaluate.py --model_id {args.adapter}).")
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise UsageError(f"`--output_dir` {out} is not empty; pass `--overwrite_output_dir True` or choose another.")

    from common.recipe.dist import is_main_process

    if not is_main_process():  # launched on several processes: merging is one process's job
        return out

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.model.loading import load_adapter

    from common.recipe.outputs import RUN_CONFIG, write_json

    trained = saved_run_config(source)
    flags = trained.get("flags", {})
    if not trained:
        log.warning("%s has no run_config.json (not written by these scripts?): the merged model carries no prompt "
                    "format; pass the training run's `--prompt_template`/`--system_prompt` wherever you use it.",
                    args.adapter)
    quantized = bool(trained.get("model", {}).get("quantized") or flags.get("load_in_4bit")
                     or flags.get("load_in_8bit"))
    dtype = merge_dtype(args, source, trained, quantized)
    if quantized:
        bits = "8-bit" if flags.get("load_in_8bit") else "4-bit"
        print(f"merge.py: note: {args.adapter} was trained on a {bits} base; the adapter is merged into those "
              f"{bits} weights dequantized to {str(dtype).replace('torch.', '')} (the weights it was trained "
              f"against), not into the original full-precision ones.", file=sys.stderr)
        base = dequantized_base(source, flags, dtype, args.trust_remote_code)
    else:
        base = AutoModelForCausalLM.from_pretrained(source.base, dtype=dtype, trust_remote_code=args.trust_remote_code)
    merged = load_adapter(base, source.adapter_dir, "`--adapter`").merge_and_unload()
    tokenizer_dir = source.adapter_dir if os.path.isfile(os.path.join(source.adapter_dir, "tokenizer_config.json")) \
        else source.base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=args.trust_remote_code)

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    write_json(staging / RUN_CONFIG, merged_run_config(args, source, trained, quantized, dtype))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    print(f"wrote the merged model to {out.resolve()} (base {source.base} + adapter {args.adapter}; both unchanged)")
    return out


def merge_dtype(args, source, trained: dict, quantized: bool):
    """`--merge_dtype auto`: the base model's own 16/32-bit dtype; for a quantized run, the compute
    dtype its adapter was trained in on a GPU (fp32 on the CPU, where bitsandbytes computes in fp32)."""
    import torch
    from transformers import AutoConfig

    if args.merge_dtype != "auto":
        return getattr(torch, args.merge_dtype)
    if quantized:
        if not torch.cuda.is_available():
            return torch.float32
        compute = trained.get("flags", {}).get("bnb_4bit_compute_dtype", "auto")
        if compute and compute != "auto":
            return getattr(torch, compute)
        precision = trained.get("model", {}).get("precision")
        if precision in ("bf16", "fp16", "fp32"):
            return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = AutoConfig.from_pretrained(source.base, trust_remote_code=args.trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def dequantized_base(source, flags: dict, dtype, trust_remote_code: bool):
    """The base as a QLoRA (or 8-bit LoRA) adapter saw it: quantized with the run's own settings
    (quantization is deterministic, so these are the very weights of training), then every
    quantized layer turned back into a plain Linear holding its dequantized weight in `dtype`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    from common.model.loading import device_map_for

    if flags.get("load_in_8bit"):
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=flags.get("bnb_4bit_quant_type", "nf4"),
                                   bnb_4bit_use_double_quant=flags.get("bnb_4bit_use_double_quant", True),
                                   bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(source.base, dtype=dtype, quantization_config=quant,
                                                 device_map=device_map_for(True), trust_remote_code=trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "dequantized in ... and casted to ...": said by our own note already
    try:
        model = model.dequantize(dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def merged_run_config(args, source, trained: dict, quantized: bool, dtype) -> dict:
    """run_config.json of a merged model: the prompt format of the run that trained the adapter,
    which evaluate.py and runs chained on the merged model take over (its quantization flags are
    not: the merged weights are plain ones). The adapter run's whole record is kept under `adapter_run`."""
    from common.model.source import PROMPT_FLAGS

    flags = trained.get("flags", {})
    return {"script": "merge.py", "technique": "merged",
            "flags": {name: flags[name] for name in PROMPT_FLAGS if name in flags},
            "command": list(sys.argv),
            "model": {"base": source.base, "merged_adapter": os.path.abspath(source.adapter_dir),
                      "dtype": str(dtype).replace("torch.", ""), "quantized": False,
                      "merged_into_dequantized_base": quantized},
            "data": trained.get("data", {}),
            "adapter_run": trained}


def main(argv=None) -> int:
    from common.recipe.cli import run_cli

    return run_cli("merge.py", lambda: run_merge(make_parser().parse(argv)))
