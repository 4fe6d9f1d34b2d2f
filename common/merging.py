"""Merge a LoRA/DoRA/QLoRA adapter into its base model and save a plain model."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from common.args import FlagParser, MergeArguments, UsageError


def make_parser() -> FlagParser:
    return FlagParser([MergeArguments], prog="merge.py",
                      description="Merge a LoRA, DoRA or QLoRA adapter into its base model; saves safetensors "
                                  "and the tokenizer.")


def run_merge(args) -> Path:
    import torch

    from common.model import resolve_model, saved_run_config

    if not args.adapter:
        raise UsageError("`--adapter` is required: an adapter dir written by lora.py, dora.py or qlora.py.")
    if not args.output_dir:
        raise UsageError("`--output_dir` is required: where the merged model goes.")
    source = resolve_model(args.adapter)
    if not source.adapter_dir:
        raise UsageError(f"`--adapter` {args.adapter}: no adapter_config.json there; that is already a plain model.")
    if source.adapter_type != "LORA":
        raise UsageError(f"`--adapter` {args.adapter}: a {source.adapter_type} adapter (prompt learning) adds "
                         f"virtual tokens and cannot be merged into the weights; load it with its base instead "
                         f"(evaluate.py --model_id {args.adapter}).")
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise UsageError(f"`--output_dir` {out} is not empty; pass `--overwrite_output_dir True` or choose another.")

    from common.training import is_main_process

    if not is_main_process():  # launched on several processes: merging is one process's job
        return out

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trained = saved_run_config(source)
    quantized = bool(trained.get("model", {}).get("quantized")) or trained.get("flags", {}).get("load_in_4bit")
    if args.merge_dtype == "auto":
        config = AutoConfig.from_pretrained(source.base, trust_remote_code=args.trust_remote_code)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if quantized and dtype == torch.float32 and torch.cuda.is_available():
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = getattr(torch, args.merge_dtype)
    if quantized:
        print(f"merge.py: note: {args.adapter} was trained on a 4-bit base; it is merged into the base reloaded in "
              f"{str(dtype).replace('torch.', '')} (not 4-bit), so the merged model differs slightly from the "
              f"quantized one it was trained with.", file=sys.stderr)
    base = AutoModelForCausalLM.from_pretrained(source.base, dtype=dtype, trust_remote_code=args.trust_remote_code)
    merged = PeftModel.from_pretrained(base, source.adapter_dir).merge_and_unload()
    tokenizer_dir = source.adapter_dir if os.path.isfile(os.path.join(source.adapter_dir, "tokenizer_config.json")) \
        else source.base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=args.trust_remote_code)

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    print(f"merged {args.adapter} into {source.base}; plain model written to {out.resolve()}")
    return out


def main(argv=None) -> int:
    from common.training import run_cli

    return run_cli("merge.py", lambda: run_merge(make_parser().parse(argv)))
