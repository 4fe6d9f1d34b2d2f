"""Model & tokenizer loading for training and inference: device placement, pad/EOS tokens,
k-bit preparation, gradient checkpointing."""

from __future__ import annotations

import logging
import os
from typing import Any

from common.flags.errors import UsageError, first_line
from common.model.precision import Precision, get_quantization_config, sharded_model, zero3_enabled
from common.model.source import ModelSource, resolve_model

log = logging.getLogger("finetune")


def device_map_for(quantized: bool):
    """Each process of a multi-process launch loads onto its own device."""
    if not quantized or sharded_model():
        return None  # the Trainer places (or FSDP / ZeRO-3 shards) the model
    import torch

    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def hub_error(model_id: str, exc: Exception, what: str = "model") -> UsageError:
    """A failed from_pretrained as one line: for a local directory, what is wrong with it; for a hub id,
    whether the cache, the network or the name is to blame."""
    from common.hub import network

    text = str(exc)
    if "trust_remote_code" in text:
        return UsageError(f"`--model_id` {model_id} ships its own Python code; pass `--trust_remote_code True` "
                          f"only if you trust that repository.")
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    if "attn_implementation" in text:
        return UsageError(f"`--attn_implementation`: the model refuses it ({first}).")
    if os.path.isdir(os.path.expanduser(model_id)):
        if what == "tokenizer":
            return UsageError(f"`--model_id` {model_id}: no usable tokenizer there (tokenizer.json, "
                              f"tokenizer_config.json and the like are missing or broken: {first}); copy the "
                              f"tokenizer files of its base model into the directory.")
        return UsageError(f"`--model_id` {model_id}: the local {what} could not be loaded ({first}); fix or replace "
                          f"the directory's files.")
    if type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError") or "is not a valid model identifier" in text:
        return UsageError(f"`--model_id` {model_id}: not a local directory, and the hub has no such model (or it is "
                          f"private or gated: log in with `hf auth login`); check the name.")
    if network.user_wants_offline() or (not network.in_run() and os.environ.get("HF_HUB_OFFLINE", "").lower() in
                                        ("1", "true", "yes")):
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
    require_tokenizer_files(where, args.model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, revision=None if where != source.base else args.revision,
                                                  trust_remote_code=args.trust_remote_code)
    except Exception as exc:  # OSError (missing), ValueError (remote code), network errors
        local = where if os.path.isdir(where) else args.model_id
        raise hub_error(local, exc, "tokenizer") from None
    ensure_eos_token(tokenizer, args.model_id)
    ensure_pad_token(tokenizer)
    return tokenizer


# What transformers' tokenizers are loaded from; a directory with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def require_tokenizer_files(where: str, model_id: str) -> None:
    """A local model directory saved without its tokenizer (only `model.save_pretrained`) is named as
    such, not as a model missing from the hub's cache."""
    if os.path.isdir(where) and not any(os.path.isfile(os.path.join(where, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"`--model_id` {model_id}: {where} has no tokenizer files (none of "
                         f"{', '.join(TOKENIZER_FILES[:4])}, ...); save the tokenizer of the model it came from "
                         f"into it (`tokenizer.save_pretrained(\"{where}\")`).")


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
        # fp32 QLoRA loads the checkpoint's dtype (PEFT casts to fp32 later), except under FSDP and ZeRO-3,
        # where every weight must have the 4-bit storage dtype.
        "dtype": precision.torch_dtype if quant is None or precision.mode != "fp32" or sharded_model() else None,
        "trust_remote_code": args.trust_remote_code,
        "revision": args.revision,
        "device_map": device_map_for(quant is not None),
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        if zero3_enabled():
            log.info("ZeRO-3 cannot partition %d-bit weights as they load: each process loads the whole "
                     "quantized model first, and DeepSpeed splits it when training starts.",
                     8 if args.load_in_8bit else 4)
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
        raise UsageError(f"loading {source.base}: {first_line(exc, 300)}") from None
    except Exception as exc:
        raise hub_error(args.model_id, exc) from None

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
    """PEFT's preparation of a quantized model for training, except under FSDP or ZeRO-3: there it would cast
    embeddings and norms to float32 next to 4-bit weights stored in the training dtype, and FSDP
    refuses to flatten mixed dtypes (TRL skips it for sharded QLoRA too). Frozen base either way."""
    gc_kwargs = {"use_reentrant": False}
    if not sharded_model():
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


def load_adapter(model, adapter_dir: str, flag: str, **kwargs):
    """PeftModel.from_pretrained, with an adapter made for another base (another width, other layer
    names) reported as one line naming the adapter dir instead of a state-dict traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir, **kwargs)
    except (RuntimeError, ValueError, KeyError) as exc:
        text = str(exc)
        if "size mismatch" in text:
            why = "its weights have other shapes than the base model's layers (a base of another width or depth)"
        elif "not found in the base model" in text or "Target modules" in text:
            why = "the layers it adapts are not in the base model (a base of another architecture)"
        else:
            why = text.splitlines()[0][:200] if text else type(exc).__name__
        base = getattr(getattr(model, "config", None), "_name_or_path", "the base model")
        raise UsageError(f"{flag} {adapter_dir}: the adapter does not fit {base}: {why}; use the base it was "
                         f"trained on (`base_model_name_or_path` in its adapter_config.json).") from None


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
    """Under FSDP or ZeRO-3, a 4-bit model with its adapter attached: every parameter in the 4-bit storage dtype
    (PEFT creates adapters in float32 or the compute dtype). FSDP keeps float32 copies of the trainable
    ones under mixed precision (accelerate upcasts them); elsewhere nothing changes."""
    if not (sharded_model() and getattr(model, "is_loaded_in_4bit", False)):
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
        model = load_adapter(model, source.adapter_dir, "`--model_id`")
    if not is_quantized(model):
        import torch

        if torch.cuda.is_available():  # each process of a multi-process launch on its own GPU
            model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}")
    model.eval()
    return model, tokenizer, source
