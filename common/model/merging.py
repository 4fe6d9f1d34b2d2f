"""Merge a LoRA/DoRA/QLoRA adapter into its base model and save a plain model; `--export gguf`
also writes it as a GGUF file with an Ollama Modelfile (common/model/gguf_export.py)."""

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
                                  "and the tokenizer, and with `--export gguf` one GGUF file and an Ollama "
                                  "Modelfile.")


def check_merge_flags(args) -> None:
    """The flag combinations, before any file is read."""
    if args.model and args.adapter:
        raise UsageError("`--model` and `--adapter` cannot both be set: `--adapter` merges an adapter, `--model` "
                         "exports a model that needs no merging.")
    if "gguf_type" in args.explicit and not args.export:
        raise UsageError("`--gguf_type` applies to the GGUF file; add `--export gguf`.")
    if args.model and not args.export:
        raise UsageError(f"`--model` {args.model}: a plain model has nothing to merge; add `--export gguf` to "
                         f"export it, or pass an adapter dir as `--adapter`.")
    if not args.adapter and not args.model:
        raise UsageError("`--adapter` is required: an adapter dir written by lora.py, dora.py or qlora.py.")
    if not args.output_dir:
        raise UsageError("`--output_dir` is required: where the merged model goes.")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def run_merge(args) -> Path:
    from common.flags.checks import check_creatable
    from common.model.source import resolve_model, saved_run_config

    check_merge_flags(args)
    check_creatable(args.output_dir, "--output_dir")
    if args.export:
        from common.model.gguf_export import require_gguf

        require_gguf()
    source = resolve_model(args.adapter or args.model, flag="adapter" if args.adapter else "model")
    if args.model and source.adapter_dir:
        raise UsageError(f"`--model` {args.model} is an adapter dir; pass it as `--adapter` to merge and export it.")
    if args.adapter and not source.adapter_dir:
        raise UsageError(f"`--adapter` {args.adapter}: no adapter_config.json there; that is already a plain model "
                         f"(export it with `--model {args.adapter} --export gguf`).")
    if args.adapter and source.adapter_type != "LORA":
        raise UsageError(f"`--adapter` {args.adapter}: a {source.adapter_type} adapter (prompt learning) adds "
                         f"virtual tokens and cannot be merged into the weights; load it with its base instead "
                         f"(evaluate.py --model_id {args.adapter}).")
    out = Path(args.output_dir)
    for path in (source.adapter_dir, source.base):
        # --overwrite_output_dir replaces the output dir at the end: never the model it reads
        if path and os.path.isdir(path) and _inside(Path(path), out):
            raise UsageError(f"`--output_dir` {out} holds {path}, which this merge reads; choose another directory.")
    if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise UsageError(f"`--output_dir` {out} is not empty; pass `--overwrite_output_dir True` or choose another.")

    from common.recipe.dist import is_main_process

    if not is_main_process():  # launched on several processes: merging is one process's job
        return out

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = source.adapter_dir if source.adapter_dir and os.path.isfile(
        os.path.join(source.adapter_dir, "tokenizer_config.json")) else source.base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=args.trust_remote_code)
    if args.export:
        from common.model.gguf_export import check_exportable

        config = AutoConfig.from_pretrained(source.base, trust_remote_code=args.trust_remote_code)
        check_exportable(config, tokenizer, args.adapter and f"the base model of {args.adapter}" or args.model)
    trained = saved_run_config(source)
    if not trained:
        log.warning("%s has no run_config.json (not written by these scripts?): the merged model carries no prompt "
                    "format; pass the training run's `--prompt_template`/`--system_prompt` wherever you use it%s.",
                    args.adapter or args.model,
                    " (the GGUF and Modelfile get the default prompt format)" if args.export else "")
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(source.base, dtype=merge_dtype(args, source, trained, False),
                                                     trust_remote_code=args.trust_remote_code)
        record = exported_run_config(args, source, trained)
    else:
        model, record = merged_model(args, source, trained)

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        gguf_path = write_outputs(args, model, tokenizer, record, staging, out.name)
    except BaseException:  # a stopped or failed write leaves nothing that looks like a model
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    if args.adapter:
        print(f"wrote the merged model to {out.resolve()} (base {source.base} + adapter {args.adapter}; both "
              f"unchanged)")
    if args.export:
        print(f"wrote {out.resolve() / gguf_path.name} ({args.gguf_type}) and its Ollama Modelfile: "
              f"ollama create NAME -f {out / 'Modelfile'}")
    return out


def write_outputs(args, model, tokenizer, record: dict, staging: Path, name: str):
    """Into the staging folder: the merged model (safetensors) and tokenizer, the GGUF and Modelfile
    where asked, run_config.json. -> the GGUF's path or None."""
    from common.recipe.outputs import RUN_CONFIG, write_json

    staging.mkdir(parents=True)
    gguf_path = None
    if args.adapter:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    if args.export:
        from common.model.gguf_export import export_files

        gguf_path, notes = export_files(model, tokenizer, record, staging, args.gguf_type, name)
        for note in notes:
            print(f"merge.py: note: {note}.", file=sys.stderr)
        record["export"] = {"format": "gguf", "gguf_type": args.gguf_type, "file": gguf_path.name,
                            "modelfile": "Modelfile"}
    write_json(staging / RUN_CONFIG, record)
    return gguf_path


def merged_model(args, source, trained: dict):
    """-> (the base with the adapter merged in, the merged model's run_config)."""
    from transformers import AutoModelForCausalLM

    from common.model.loading import load_adapter

    flags = trained.get("flags", {})
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
    return merged, merged_run_config(args, source, trained, quantized, dtype)


def exported_run_config(args, source, trained: dict) -> dict:
    """run_config.json next to the GGUF of a model exported as it was: its prompt format, as a merged
    model's run_config.json records it."""
    from common.model.source import PROMPT_FLAGS

    flags = trained.get("flags", {})
    return {"script": "merge.py", "technique": "exported",
            "flags": {name: flags[name] for name in PROMPT_FLAGS if name in flags},
            "command": list(sys.argv), "model": {"base": source.base}, "data": trained.get("data", {}),
            "source_run": trained}


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
