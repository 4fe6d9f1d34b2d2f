"""Training precision (bf16/fp16/fp32, chosen per device) and the bitsandbytes quantization config."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

from common.flags.errors import UsageError
from common.model.source import resolve_model

log = logging.getLogger("finetune")

# Precision -----------------------------------------------------------------------------------


@dataclass
class Precision:
    mode: str  # "bf16" | "fp16" | "fp32"
    cpu_autocast: bool = False  # bf16 on a CPU: float32 weights, bf16 matmuls under the Trainer's autocast

    @property
    def torch_dtype(self):
        import torch

        if self.cpu_autocast:
            return torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.mode]


# CPU bf16 autocast pays only where the matrix products outweigh the casts around them. Issue #17
# measured, on a CPU with bf16 instructions, a 3M-parameter Llama 1.3x slower under autocast and an
# 80M one 2.3x faster; below this size `--use_bfloat16` stays in float32 on the CPU. On our AMD EPYC
# (AVX512-BF16), bench/bench_bf16.py saw autocast win from ~1M parameters, on a loaded machine:
# docs/performance.md. 10M is above the slow case on both.
CPU_BF16_MIN_PARAMETERS = 10_000_000


def cpu_bf16_flags() -> list[str]:
    """The CPU's bfloat16 instructions, from /proc/cpuinfo (x86: AMX, AVX512-BF16; Arm: BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = set()
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:  # not Linux: no bf16 detection, so float32
        return []
    return sorted(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def estimate_parameters(model_id: str) -> Optional[int]:
    """Parameters of a decoder from its config.json (local dir or the hub cache; no network). None if unknown."""
    path = os.path.join(os.path.expanduser(model_id), "config.json")
    try:
        if not os.path.isfile(path):
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(model_id, "config.json")
            if not isinstance(path, str):
                return None
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
        config = config.get("text_config", config)
        width = config.get("hidden_size") or config.get("n_embd") or config["d_model"]
        layers = config.get("num_hidden_layers") or config["n_layer"]
        inner = config.get("intermediate_size") or config.get("n_inner") or 4 * width
        embeddings = config["vocab_size"] * width * (1 if config.get("tie_word_embeddings", True) else 2)
        return int(embeddings + layers * (4 * width * width + 3 * width * inner))
    except Exception:  # an adapter dir, an unusual config: size unknown
        return None


def select_precision(args, warn=log.warning) -> Precision:
    """From the flags; under `accelerate launch` the launcher's mixed precision must agree with them
    (the shipped configs say "no" and leave it to the flags), and is then set to what the flags chose."""
    precision = _precision_from_flags(args, warn)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher is None:
        return precision
    chosen = "no" if precision.mode == "fp32" else precision.mode
    if launcher.lower() not in ("no", chosen):
        given = {"use_bfloat16", "fp16"} & set(getattr(args, "explicit", ()))
        import torch

        usable = torch.cuda.is_available() and (launcher.lower() != "bf16" or torch.cuda.is_bf16_supported())
        if given or not usable:
            flags = " and ".join(f"`--{n} {getattr(args, n)}`" for n in sorted(given)) or "the flags"
            raise UsageError(f"the accelerate config sets `mixed_precision: {launcher}`, but {flags} give "
                             f"{precision.mode}{'' if usable else ' on this machine'}; set `mixed_precision: \"no\"` "
                             f"in the config (the flags then decide) or pass the matching flag.")
        log.info("precision %s, as the accelerate config sets (`mixed_precision: %s`).", launcher, launcher)
        precision, chosen = Precision(launcher.lower()), launcher.lower()
    os.environ["ACCELERATE_MIXED_PRECISION"] = chosen  # what the Trainer's accelerator (and DeepSpeed) use
    return precision


def _precision_from_flags(args, warn) -> Precision:
    import torch

    if args.use_bfloat16:
        if torch.cuda.is_available():
            if torch.cuda.is_bf16_supported():
                return Precision("bf16")
            warn("`--use_bfloat16`: this GPU has no bfloat16 support (e.g. T4); training in float16 instead.")
            return Precision("fp16")
        return _cpu_bf16(args, warn)
    if args.fp16:
        if torch.cuda.is_available():
            return Precision("fp16")
        warn("`--fp16`: no CUDA GPU; training in float32 on the CPU.")
    return Precision("fp32")


def _cpu_bf16(args, warn) -> Precision:
    """bf16 autocast on a CPU with bf16 instructions and a model big enough to gain; float32 elsewhere."""
    flags = cpu_bf16_flags()
    if not flags:
        warn("`--use_bfloat16`: no CUDA GPU, and this CPU has no bfloat16 instructions (AMX or AVX512-BF16); "
             "training in float32 on the CPU.")
        return Precision("fp32")
    model_id = args.model_id
    if os.path.isdir(os.path.expanduser(model_id)):  # a local model or adapter dir; hub ids: the cache only
        try:
            model_id = resolve_model(model_id).base
        except UsageError:  # reported where the model is loaded
            pass
    size = estimate_parameters(model_id)
    if size is not None and size < CPU_BF16_MIN_PARAMETERS:
        warn(f"`--use_bfloat16`: this CPU has bfloat16 ({', '.join(flags)}), but at ~{size / 1e6:.1f}M parameters "
             f"the casts cost more than bf16 saves (it pays from ~{CPU_BF16_MIN_PARAMETERS / 1e6:.0f}M); training in "
             f"float32 on the CPU.")
        return Precision("fp32")
    log.info("precision: bf16 autocast on the CPU (%s), weights in float32.", ", ".join(flags))
    return Precision("bf16", cpu_autocast=True)


# Quantization --------------------------------------------------------------------------------

def get_quantization_config(args, precision: Precision):
    """-> BitsAndBytesConfig, or None when the model is loaded unquantized."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = args.bnb_4bit_compute_dtype
    compute_dtype = precision.torch_dtype if compute == "auto" else getattr(torch, compute)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP flattens the 4-bit weights with the layer's other parameters, which must share one dtype:
        # the training dtype (an explicit compute dtype may differ from it). ZeRO-3 partitions them as
        # it partitions the other weights of that dtype.
        bnb_4bit_quant_storage=precision.torch_dtype if sharded_model() else compute_dtype,
    )


def fsdp_enabled() -> bool:
    """`accelerate launch` with an FSDP config (ours: configs/accelerate/fsdp.yaml) sets this."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def deepspeed_launch() -> bool:
    """`accelerate launch` with a DeepSpeed config (ours: configs/accelerate/deepspeed_zero*.yaml) sets this."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def zero3_enabled() -> bool:
    """DeepSpeed ZeRO-3, as transformers knows it once the trainer configuration (or ppo.py's
    accelerator) exists; the recipe builds those before the model."""
    import sys

    if "transformers" not in sys.modules:
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def sharded_model() -> bool:
    """The weights are split across processes (FSDP or ZeRO-3): a 4-bit model is then loaded without
    a device map and stored in the training dtype."""
    return fsdp_enabled() or zero3_enabled()
