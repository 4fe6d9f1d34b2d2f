"""PEFT configs built from flags. `build_peft_config(technique, args, model)` is pure: it reads
the model's structure and returns a PeftConfig; nothing is attached here."""

from __future__ import annotations

import logging
from typing import Any

from common.flags.errors import UsageError

log = logging.getLogger("finetune")


LORA_FAMILY = ("lora", "dora", "qlora")

PROMPT_LEARNING = ("prefix_tuning", "p_tuning", "prompt_tuning")

PEFT_TYPES = {"PREFIX_TUNING": "prefix_tuning", "P_TUNING": "p_tuning", "PROMPT_TUNING": "prompt_tuning",
              "LORA": "lora"}


# One attention-input projection under its different names: fused q/k/v or split.
_QKV_FUSED = ("query_key_value", "c_attn", "qkv_proj", "Wqkv", "qkv")

_QKV_SPLIT = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v")


def linear_module_names(model) -> list[str]:
    """Leaf names of the layers LoRA can adapt (Linear, GPT-2's Conv1D, bitsandbytes layers)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in ("lm_head", "score") and "lora_" not in full:
                names.add(leaf)
    return sorted(names)


def resolve_target_modules(model, requested: str, warn=log.warning) -> Any:
    """`--target_modules` -> what LoraConfig gets, translating fused/split q/k/v names."""
    if requested.strip() == "all-linear":
        return "all-linear"
    wanted = [n.strip() for n in requested.split(",") if n.strip()]
    present = linear_module_names(model)
    out: list[str] = []
    missing: list[str] = []
    translated: list[str] = []
    for name in wanted:
        if name in present:
            out.append(name)
            continue
        fused = [n for n in _QKV_FUSED if n in present]
        split = [n for n in ("q_proj", "k_proj", "v_proj", "query", "key", "value") if n in present]
        mapped = (fused[:1] or split) if name in _QKV_FUSED + _QKV_SPLIT else []
        if not mapped:
            missing.append(name)
            continue
        translated.append(name)
        out.extend(m for m in mapped if m not in out)
    if translated and not missing:
        attention = [m for m in out if m in _QKV_FUSED + _QKV_SPLIT]
        warn(f"`--target_modules`: this model has no {', '.join(translated)}; using its attention projection(s) "
             f"{', '.join(attention)} instead.")
    if missing:
        raise UsageError(f"`--target_modules`: {', '.join(missing)} not in this model; its linear modules are: "
                         f"{', '.join(present)} (or use `all-linear`).")
    return out


def model_dims(model) -> dict[str, int]:
    """token_dim / num_layers / num_attention_heads / num_transformer_submodules of a causal LM."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()

    def first(*keys):
        for key in keys:
            value = getattr(cfg, key, None)
            if value is not None:
                return value
        return None

    return {
        "token_dim": first("hidden_size", "n_embd", "d_model"),
        "num_layers": first("num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": first("num_attention_heads", "n_head", "num_heads"),
        "num_transformer_submodules": 2 if getattr(cfg, "is_encoder_decoder", False) else 1,
    }


def _dims(args, model) -> dict[str, int]:
    dims = model_dims(model)
    for key, inferred in dims.items():
        given = getattr(args, key)
        if given is not None and inferred is not None and given != inferred:
            raise UsageError(f"`--{key} {given}` contradicts the model, which has {key}={inferred}; drop the flag "
                             f"(it is inferred) or pass {inferred}.")
    return dims


def build_peft_config(technique: str, args, model, tokenizer_path: str | None = None):
    """-> a PeftConfig for `technique` (lora, dora, qlora, prefix_tuning, p_tuning, prompt_tuning)."""
    import peft

    if technique in LORA_FAMILY:
        runtime = peft.LoraRuntimeConfig(ephemeral_gpu_offload=args.dora_ephemeral_gpu_offload)
        modules_to_save = [m.strip() for m in args.modules_to_save.split(",") if m.strip()] \
            if args.modules_to_save else None
        if modules_to_save:
            check_modules_to_save(model, modules_to_save)
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            bias=args.lora_bias,
            target_modules=resolve_target_modules(model, args.target_modules),
            modules_to_save=modules_to_save,
            use_rslora=args.use_rslora,
            use_dora=technique == "dora" or args.use_dora,
            # GPT-2-style Conv1D layers store weights transposed
            fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()),
            runtime_config=runtime,
        )
    dims = _dims(args, model)
    common: dict[str, Any] = {"task_type": "CAUSAL_LM", "num_virtual_tokens": args.num_virtual_tokens, **dims}
    if technique == "prefix_tuning":
        return peft.PrefixTuningConfig(
            prefix_projection=args.prefix_projection,
            encoder_hidden_size=args.encoder_hidden_size or dims["token_dim"],
            **common,
        )
    if technique == "p_tuning":
        return peft.PromptEncoderConfig(
            encoder_reparameterization_type=args.encoder_reparameterization_type,
            encoder_hidden_size=args.encoder_hidden_size or dims["token_dim"],
            encoder_num_layers=args.encoder_num_layers,
            encoder_dropout=args.encoder_dropout,
            **common,
        )
    if technique == "prompt_tuning":
        text = args.prompt_tuning_init == "TEXT"
        return peft.PromptTuningConfig(
            prompt_tuning_init=args.prompt_tuning_init,
            prompt_tuning_init_text=args.prompt_tuning_init_text if text else None,
            tokenizer_name_or_path=tokenizer_path if text else None,
            **common,
        )
    raise ValueError(f"unknown technique {technique!r}")


# LoRA flags and their keys in adapter_config.json.
_SAVED_LORA_SETTINGS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "lora_bias": "bias",
                        "use_rslora": "use_rslora", "use_dora": "use_dora", "target_modules": "target_modules",
                        "modules_to_save": "modules_to_save"}


def _comparable(value):
    if isinstance(value, str) and "," in value or isinstance(value, (list, tuple, set)):
        items = value.split(",") if isinstance(value, str) else value
        return sorted(str(m).strip() for m in items if str(m).strip())
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return [value] if isinstance(value, str) else value


def overridden_by_saved_adapter(args, saved: dict) -> list[str]:
    """Flags given on the command line that a continued adapter's saved settings override, as
    `--flag given (saved: value)`."""
    out = []
    for flag, key in _SAVED_LORA_SETTINGS.items():
        if flag not in getattr(args, "explicit", ()) or key not in saved:
            continue
        given, kept = getattr(args, flag), saved[key]
        if flag == "target_modules" and given == "all-linear":
            continue  # PEFT saves all-linear resolved to module names: nothing to compare
        if _comparable(given) != _comparable(kept):
            shown = ",".join(sorted(kept)) if isinstance(kept, (list, tuple, set)) else kept
            out.append(f"`--{flag} {given}` (saved: {shown})")
    return out


def adapter_kind(args, model) -> str:
    """The LoRA-family adapter a preference or RL run attaches: DoRA when asked, QLoRA on a k-bit base."""
    from common.model.loading import is_quantized

    return "dora" if args.use_dora else ("qlora" if is_quantized(model) else "lora")


def attach_adapter(technique: str, args, model, source):
    """A new adapter, or the adapter of --model_id continued (runs chain)."""
    from peft import get_peft_model

    from common.model.loading import load_adapter, shardable

    expected = "LORA" if technique in LORA_FAMILY else {"prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING",
                                                          "prompt_tuning": "PROMPT_TUNING"}[technique]
    if source.adapter_dir:
        if source.adapter_type != expected:
            # A new adapter on top would be saved against the raw base and reload without the first one.
            raise UsageError(f"`--model_id` {source.adapter_dir} holds a {source.adapter_type} adapter, which a "
                             f"{expected} run cannot continue; merge it into its base first (merge.py) and pass "
                             f"the merged model, or start from the base model.")
        log.info("continuing training of the %s adapter in %s (its saved settings apply).", source.adapter_type,
                 source.adapter_dir)
        overridden = overridden_by_saved_adapter(args, source.adapter_config or {})
        if overridden:
            log.warning("`--model_id` %s is a saved adapter, whose own settings apply: %s ignored; to change them, "
                        "start a new adapter from the merged model (merge.py).", source.adapter_dir,
                        ", ".join(overridden))
        return share_dropout(shardable(load_adapter(model, source.adapter_dir, "`--model_id`", is_trainable=True)),
                             args)
    if technique in LORA_FAMILY and getattr(args, "dora_ephemeral_gpu_offload", False):
        import torch

        if not torch.cuda.is_available():  # PEFT would move DoRA weights to "cuda" and crash
            log.warning("`--dora_ephemeral_gpu_offload`: no CUDA GPU, so there is nothing to offload to; ignored.")
            args.set("dora_ephemeral_gpu_offload", False)
    tokenizer_path = source.adapter_dir or source.base
    model = shardable(get_peft_model(model, build_peft_config(technique, args, model, tokenizer_path)))
    return share_dropout(model, args) if technique in LORA_FAMILY else model


def check_modules_to_save(model, names: list[str]) -> None:
    """Each `--modules_to_save` name must be a module of the model; PEFT records unknown ones and trains
    nothing for them."""
    present = {full.rsplit(".", 1)[-1] for full, _ in model.named_modules() if full}
    missing = [n for n in names if n not in present and not any(f == n or f.endswith("." + n)
                                                                  for f, _ in model.named_modules())]
    if missing:
        candidates = [n for n in ("lm_head", "embed_tokens", "wte", "score", "embed_out") if n in present]
        raise UsageError(f"`--modules_to_save`: {', '.join(missing)} not in this model; give module names such as "
                         f"{', '.join(candidates) or 'lm_head'}.")


def check_targets_before_loading(args, source) -> None:
    """`--target_modules` and `--modules_to_save` against the model's structure, built from its config on
    the meta device (no weights, no memory): a wrong name stops before the weights load. Only for names the
    user gave, on a new adapter; where the skeleton cannot be built, the check after loading remains."""
    given = {"target_modules", "modules_to_save"} & set(getattr(args, "explicit", ()))
    if source.adapter_dir or not given or (args.target_modules.strip() == "all-linear" and not args.modules_to_save):
        return
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source.base, revision=args.revision,
                                            trust_remote_code=args.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    except Exception:  # noqa: BLE001 - the load itself reports what is wrong with the model
        return
    resolve_target_modules(skeleton, args.target_modules, warn=lambda message: None)
    if args.modules_to_save:
        check_modules_to_save(skeleton, [m.strip() for m in args.modules_to_save.split(",") if m.strip()])


def share_dropout(model, args):
    """LoRA dropout shared between adapters that read one tensor, unless `--share_lora_dropout False`
    (common/model/dropout.py); PEFT's own with `--lora_dropout_impl peft`. -> model."""
    from common.model.dropout import share_lora_dropout

    if getattr(args, "lora_dropout_impl", "ours") == "ours":
        share_lora_dropout(model, shared=getattr(args, "share_lora_dropout", True))
    return model
