"""Model & tokenizer loading: hub id, local model dir or adapter dir; precision; bitsandbytes."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from common import network
from common.args import UsageError

log = logging.getLogger("finetune")


@dataclass
class ModelSource:
    base: str  # hub id or local dir of the base model
    adapter_dir: Optional[str] = None  # set when --model_id is an adapter written by one of our scripts
    adapter_config: Optional[dict] = None

    @property
    def adapter_type(self) -> Optional[str]:
        return (self.adapter_config or {}).get("peft_type")


def resolve_model(model_id: str) -> ModelSource:
    """--model_id -> where the base model and the adapter (if any) are. No heavy imports."""
    path = os.path.expanduser(model_id)
    if os.path.isdir(path):
        adapter_cfg = os.path.join(path, "adapter_config.json")
        if os.path.isfile(adapter_cfg):
            with open(adapter_cfg, encoding="utf-8") as fh:
                config = json.load(fh)
            base = config.get("base_model_name_or_path")
            if not base:
                raise UsageError(f"`--model_id` {model_id}: adapter_config.json names no base model "
                                 f"(`base_model_name_or_path`); fix the file or pass the base model.")
            # A relative base path is relative to where the run was launched; try the adapter's
            # own location too so that moved run directories still load.
            if not os.path.isabs(base) and not os.path.isdir(base) and os.path.isdir(os.path.join(path, base)):
                base = os.path.join(path, base)
            if (base.startswith((".", "/", "~")) or base.count("/") > 1) and not os.path.isdir(os.path.expanduser(base)):
                raise UsageError(f"`--model_id` {model_id}: its base model {base!r} is not there any more; "
                                 f"edit `base_model_name_or_path` in adapter_config.json.")
            source = ModelSource(base=os.path.expanduser(base), adapter_dir=path, adapter_config=config)
            if not os.path.isdir(source.base):
                network.need_hub(f"`--model_id` {model_id}: its base model {base!r} is not a local directory", base,
                                 "model")
            return source
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource(base=path)
        raise UsageError(f"`--model_id` {model_id}: directory holds neither a model (config.json) nor an adapter "
                         f"(adapter_config.json).")
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:  # hub ids are `name` or `owner/name`
        raise UsageError(f"`--model_id` {model_id}: no such directory; give a local model dir or a hub id.")
    network.need_hub(f"`--model_id` {model_id}: not a local directory", model_id, "model")
    return ModelSource(base=model_id)


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
# README "Performance". 10M is above the slow case on both.
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
        # the training dtype (an explicit compute dtype may differ from it).
        bnb_4bit_quant_storage=precision.torch_dtype if fsdp_enabled() else compute_dtype,
    )


def fsdp_enabled() -> bool:
    """`accelerate launch` with an FSDP config (ours: configs/accelerate/fsdp.yaml) sets this."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def _device_map(quantized: bool):
    """Each process of a multi-process launch loads onto its own device."""
    if not quantized or fsdp_enabled():
        return None  # the Trainer places (or FSDP shards) the model
    import torch

    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def _hub_error(model_id: str, exc: Exception) -> UsageError:
    text = str(exc)
    if "trust_remote_code" in text:
        return UsageError(f"`--model_id` {model_id} ships its own Python code; pass `--trust_remote_code True` "
                          f"only if you trust that repository.")
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    if type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError") or "is not a valid model identifier" in text:
        return UsageError(f"`--model_id` {model_id}: not a local directory, and the hub has no such model (or it is "
                          f"private or gated: log in with `hf auth login`); check the name.")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return UsageError(f"`--model_id` {model_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                          f"({first}); pass a local model directory, or download it on a machine with network.")
    return UsageError(f"`--model_id` {model_id}: could not load ({first}). Without network, use a local model "
                      f"directory or set HF_HUB_OFFLINE=1 to use the local cache.")


# Tokenizer -----------------------------------------------------------------------------------

def load_tokenizer(source: ModelSource, args):
    from transformers import AutoTokenizer

    # An adapter dir written by our scripts also holds the tokenizer it was trained with.
    where = source.adapter_dir if source.adapter_dir and os.path.isfile(
        os.path.join(source.adapter_dir, "tokenizer_config.json")) else source.base
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, revision=None if where != source.base else args.revision,
                                                  trust_remote_code=args.trust_remote_code)
    except Exception as exc:  # OSError (missing), ValueError (remote code), network errors
        raise _hub_error(args.model_id, exc) from None
    ensure_eos_token(tokenizer, args.model_id)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_eos_token(tokenizer, model_id: str) -> None:
    """Every answer is trained to end with EOS and generation stops there. BERT-style tokenizers
    have none: their SEP token, which closes every sequence they encode, takes its place."""
    if tokenizer.eos_token is not None:
        return
    if tokenizer.sep_token is not None:
        log.warning("`--model_id` %s: the tokenizer has no EOS token; its SEP token %s ends answers instead.",
                    model_id, tokenizer.sep_token)
        tokenizer.eos_token = tokenizer.sep_token
        return
    raise UsageError(f"`--model_id` {model_id}: the tokenizer has neither an EOS nor a SEP token to end answers "
                     f"with; set `eos_token` to a token of its vocabulary in the model's tokenizer_config.json.")


def ensure_pad_token(tokenizer) -> None:
    """Pick a pad token distinct from EOS where the vocabulary has one.

    Reusing EOS for padding is what makes fine-tuned models never stop when a collator masks
    labels by token id; our collator masks by length, and a distinct pad token keeps the
    EOS label intact with any collator.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    candidates = [t for t in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|reserved_special_token_0|>")
                  if t in vocab]
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        candidates.append(tokenizer.unk_token)
    if candidates:
        tokenizer.pad_token = candidates[0]
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# Model ---------------------------------------------------------------------------------------

def load_model(source: ModelSource, args, precision: Precision, training: bool = True):
    """The base model (without the adapter), quantized if asked, ready for PEFT."""
    from transformers import AutoModelForCausalLM

    quant = get_quantization_config(args, precision)
    kwargs: dict[str, Any] = {
        # fp32 QLoRA loads the checkpoint's dtype (PEFT casts to fp32 later), except under FSDP, where
        # every weight must have the 4-bit storage dtype.
        "dtype": precision.torch_dtype if quant is None or precision.mode != "fp32" or fsdp_enabled() else None,
        "trust_remote_code": args.trust_remote_code,
        "revision": args.revision,
        "device_map": _device_map(quant is not None),
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if _encoder_only(source, args):
        # BERT-style models attend both ways unless told they are decoders; a causal LM trained that
        # way sees the answer it is asked to predict, and generates from a context it never had.
        log.warning("`--model_id` %s is an encoder model; it is loaded with causal attention "
                    "(is_decoder=True), as next-token training needs.", args.model_id)
        kwargs["is_decoder"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.base, **{k: v for k, v in kwargs.items() if v is not None})
    except ImportError as exc:
        raise UsageError(f"loading {source.base}: {str(exc).splitlines()[0][:300]}") from None
    except Exception as exc:
        raise _hub_error(args.model_id, exc) from None

    use_cache = args.use_cache
    if training and args.gradient_checkpointing:
        use_cache = False
    elif use_cache is None:
        use_cache = not training
    model.config.use_cache = use_cache
    if training and quant is not None:
        model = prepare_kbit_training(model, args.gradient_checkpointing)
    return model


def prepare_kbit_training(model, gradient_checkpointing: bool):
    """PEFT's preparation of a quantized model for training, except under FSDP: there it would cast
    embeddings and norms to float32 next to 4-bit weights stored in the training dtype, and FSDP
    refuses to flatten mixed dtypes (TRL skips it for sharded QLoRA too). Frozen base either way."""
    gc_kwargs = {"use_reentrant": False}
    if not fsdp_enabled():
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs=gc_kwargs)
    for param in model.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        enable_checkpointing(model, gc_kwargs)
    return model


def enable_checkpointing(model, kwargs: dict) -> None:
    """Gradient checkpointing on a transformers model, under the name transformers 5.24 uses (its old
    name, `gradient_checkpointing_enable`, prints a deprecation warning)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_float32_trainables(model, precision: Precision) -> None:
    """TRL's trainers cast a quantized model's trainable parameters to bf16 (the QLoRA paper's advice).
    Without bf16 training (CPU, T4) keep them in float32: a bf16 reward head cannot multiply the float32
    hidden states, and small updates to bf16 adapters round away. Call after the trainer is built."""
    if not is_quantized(model) or precision.mode == "bf16":
        return
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def shardable(model):
    """Under FSDP, a 4-bit model with its adapter attached: every parameter in the 4-bit storage dtype
    (PEFT creates adapters in float32 or the compute dtype). FSDP keeps float32 copies of the trainable
    ones under mixed precision (accelerate upcasts them); elsewhere nothing changes."""
    if not (fsdp_enabled() and getattr(model, "is_loaded_in_4bit", False)):
        return model
    storage = model.hf_quantizer.quantization_config.bnb_4bit_quant_storage
    for param in model.parameters():
        if param.__class__.__name__ != "Params4bit" and param.is_floating_point() and param.dtype != storage:
            param.data = param.data.to(storage)
    return model


def _encoder_only(source: ModelSource, args) -> bool:
    """True for configs with an `is_decoder` switch that is off (BERT, RoBERTa, ELECTRA...). Decoder-only
    configs have no such attribute."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.base, revision=args.revision, trust_remote_code=args.trust_remote_code)
    except Exception:
        return False  # from_pretrained below reports the real problem
    return getattr(config, "is_decoder", None) is False and not getattr(config, "is_encoder_decoder", False)


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting 4-bit weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_for_inference(args, precision: Precision):
    """(model, tokenizer, source) for generation: base model, plus the adapter if --model_id is one."""
    source = resolve_model(args.model_id)
    tokenizer = load_tokenizer(source, args)
    model = load_model(source, args, precision, training=False)
    if source.adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter_dir)
    if not is_quantized(model):
        import torch

        if torch.cuda.is_available():  # each process of a multi-process launch on its own GPU
            model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}")
    model.eval()
    return model, tokenizer, source


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
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
    return {}


# Settings an adapter dir's own run fixes: the base must be loaded the same way (4-bit stays
# 4-bit) and prompts must be formatted as in training. Taken over unless given explicitly.
# A merged model records only the prompt flags (its weights are no longer quantized).
PROMPT_FLAGS = ("prompt_template", "use_chat_template", "system_prompt")
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
