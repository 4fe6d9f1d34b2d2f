"""Checks of flag values that need no model; each error names the flag and the fix."""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
import re

from common.flags.errors import UsageError, format_flags
from common.flags.groups import DPO_LOSS_TYPES, KNOWN_REPORTERS, OPTIMIZERS, SCHEDULERS
from common.flags.parser import ParsedArgs

log = logging.getLogger("finetune")


def _choice(flag: str, value: str, allowed) -> None:
    if value not in allowed:
        match = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.5)
        hint = f"; did you mean {match[0]!r}?" if match else f"; choose one of: {', '.join(allowed)}"
        raise UsageError(f"`--{flag}` {value!r} is not a known name" + hint)


def _positive(args: ParsedArgs, names: list[str], strict: bool = True) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        if (value <= 0) if strict else (value < 0):
            bound = "> 0" if strict else ">= 0"
            raise UsageError(f"`--{name}` must be {bound} (got {value}).")


def check_finite(args: ParsedArgs) -> None:
    """NaN and infinity pass every `<= 0` test and only fail (or train on garbage) after loading."""
    for name, value in args.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"`--{name}` is {value}; give a finite number.")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # the optimizer's float32 state overflows
            raise UsageError(f"`--{name}` is {value}, more than float32 holds; give a smaller number.")


FLOAT32_MAX = 3.4028234663852886e38

# What torch.manual_seed and numpy.random.seed both accept.
SEED_RANGE = (0, 2 ** 32 - 1)


def check_seed(args: ParsedArgs) -> None:
    seed = getattr(args, "seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"`--seed` {seed} is out of range; give a whole number from 0 to {SEED_RANGE[1]}.")


_FIELD = re.compile(r"\{([^{}]*)\}")


def check_template(args: ParsedArgs) -> None:
    """Only `{question}` is filled in: any other `{field}` would reach every prompt as typed."""
    template = args.prompt_template
    if "{question}" not in template:
        raise UsageError("`--prompt_template` must contain `{question}`, e.g. 'Question: {question}\\nAnswer:'.")
    other = sorted({f"{{{m}}}" for m in _FIELD.findall(template) if m != "question"})
    if other:
        raise UsageError(f"`--prompt_template` has {', '.join(other)}: only `{{question}}` is filled in; remove "
                         f"the other field (the answer is what the model learns to write after the prompt).")


def check_output_dir(args: ParsedArgs, flag: str = "output_dir") -> None:
    """An explicit empty `--output_dir`, or one that cannot be created, is refused before any work."""
    value = getattr(args, flag)
    if flag in args.explicit and not value:
        raise UsageError(f"`--{flag}` is empty; give a directory, or leave the flag out for the default.")
    if value:
        check_creatable(value, f"--{flag}")


def check_creatable(path: str, flag: str) -> None:
    """`path` is a directory, or one that can be made: its nearest existing parent is a writable
    directory. Nothing is created."""
    parent = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"`{flag}` {path}: cannot be created, {parent} is a file; choose another directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"`{flag}` {path}: cannot be written, {parent} is not writable; choose another directory.")


def reporters(report_to: str) -> list[str]:
    return [r.strip().lower() for r in report_to.split(",") if r.strip()]


def check_common(args: ParsedArgs) -> None:
    """Flag checks shared by every training script; run before anything heavy is imported."""
    if not args.model_id:
        raise UsageError("`--model_id` is required: a hub id (e.g. `gpt2`), a local model dir or an adapter dir.")
    check_finite(args)
    check_seed(args)
    check_output_dir(args)
    if args.load_in_4bit and args.load_in_8bit:
        raise UsageError("`--load_in_4bit` and `--load_in_8bit` cannot both be set; pick one.")
    if args.use_bfloat16 and args.fp16:
        raise UsageError("`--use_bfloat16` and `--fp16` cannot both be set; pick one precision.")
    _positive(args, ["lora_r", "lora_alpha", "learning_rate", "per_device_train_batch_size",
                     "per_device_eval_batch_size", "gradient_accumulation_steps", "max_seq_length",
                     "logging_steps", "save_steps", "eval_steps", "num_virtual_tokens", "max_train_samples",
                     "max_eval_samples", "encoder_num_layers", "save_total_limit", "dataset_num_proc",
                     "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                     "encoder_hidden_size", "save_minutes", "neftune_noise_alpha"])
    _positive(args, ["max_grad_norm", "weight_decay", "warmup_steps", "dataloader_num_workers", "eval_em_samples"],
              strict=False)
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise UsageError("`--num_train_epochs` must be > 0 (or set `--max_steps`).")
    for name in ("lora_dropout", "encoder_dropout", "warmup_ratio"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < 1:
            raise UsageError(f"`--{name}` must be in [0, 1) (got {value}).")
    _choice("optimizer", args.optimizer, OPTIMIZERS)
    _choice("lr_scheduler_type", args.lr_scheduler_type, SCHEDULERS)
    for reporter in reporters(args.report_to):
        _choice("report_to", reporter, KNOWN_REPORTERS)
    if getattr(args, "task_type", "CAUSAL_LM").upper() != "CAUSAL_LM":
        raise UsageError(f"`--task_type {args.task_type}` is not supported; these scripts train CAUSAL_LM models.")
    check_template(args)
    if getattr(args, "target_modules", None) is not None and not args.target_modules.strip(" ,"):
        raise UsageError("`--target_modules` is empty; name the layers to adapt (e.g. `q_proj,v_proj`) or use "
                         "`all-linear`.")
    if getattr(args, "attn_implementation", None):
        check_attention(args.attn_implementation)
    if (args.eval_strategy != "no" or args.eval_em_samples) and args.eval_split.lower() == "none":
        flag = "--eval_strategy" if args.eval_strategy != "no" else "--eval_em_samples"
        raise UsageError(f"`{flag}` needs held-out data: set `--eval_split` (e.g. `validation`).")
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        raise UsageError("`--resume_from_checkpoint` and `--overwrite_output_dir` contradict; pick one.")
    resume = args.resume_from_checkpoint
    if resume and resume.lower() not in ("auto", "true", "latest") and not os.path.isdir(resume):
        raise UsageError(f"`--resume_from_checkpoint` {resume}: no such checkpoint directory; use `auto` for the "
                         f"latest one in --output_dir.")
    from common.hub.upload import check_push

    check_push(args)
    if args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise UsageError("`--use_liger_kernel` needs the liger-kernel package (CUDA GPUs): `pip install "
                         "liger-kernel`, or leave the flag off.")


# transformers' own names; a hub kernel (`kernels-community/flash-attn`) has a slash.
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_attention(value: str) -> None:
    names = value.split("|")  # `paged|sdpa`
    if "/" in value or all(n in ATTENTION or n == "paged" for n in names):
        return
    _choice("attn_implementation", value, ATTENTION)


def check_sft(technique: str, args: ParsedArgs) -> None:
    """SFT-only flag checks."""
    for name in ("packing", "padding_free"):
        if getattr(args, name) and technique in ("prefix_tuning", "p_tuning", "prompt_tuning"):
            raise UsageError(f"`--{name}` cannot be used with {technique}: its virtual tokens are prepended to each "
                             f"sequence, not to each example; leave `--{name}` off.")
        if getattr(args, name) and "flash" not in (args.attn_implementation or ""):
            raise UsageError(f"`--{name}` puts several examples in one sequence, and only flash attention keeps them "
                             f"from attending to each other: add `--attn_implementation flash_attention_2` (CUDA, "
                             f"`pip install flash-attn`), or leave `--{name}` off (length-grouped batches already "
                             f"keep padding low).")


def check_preference(args: ParsedArgs, kind: str) -> None:
    _positive(args, ["beta", "max_prompt_length", "generation_batch_size", "desirable_weight",
                     "undesirable_weight"])
    _positive(args, ["simpo_gamma"], strict=False)
    if kind == "dpo":
        for loss in [x.strip() for x in args.loss_type.split(",") if x.strip()]:
            _choice("loss_type", loss, DPO_LOSS_TYPES)
    if args.max_prompt_length and args.max_prompt_length >= args.max_seq_length:
        raise UsageError(f"`--max_prompt_length {args.max_prompt_length}` must be below `--max_length "
                         f"{args.max_seq_length}`, which bounds prompt plus answer.")


def check_reward_model(args: ParsedArgs) -> None:
    """`--reward_model` is a reward model dir of reward_model.py, checked before the policy loads."""
    if not args.reward_model:
        return
    from common.model.source import resolve_model

    source = resolve_model(args.reward_model, flag="reward_model")
    if not source.adapter_dir or (source.adapter_config or {}).get("task_type") != "SEQ_CLS":
        raise UsageError(f"`--reward_model` {args.reward_model}: not a reward model written by reward_model.py "
                         f"(expected an adapter_config.json with task_type SEQ_CLS).")


def check_ppo(args: ParsedArgs) -> None:
    if bool(args.reward_model) == bool(args.reward_function):
        raise UsageError("give exactly one of `--reward_model DIR` and `--reward_function triviaqa_em|triviaqa_f1`.")
    check_reward_model(args)
    _positive(args, ["response_length", "temperature", "kl_horizon", "cliprange", "cliprange_value", "ppo_epochs",
                     "num_mini_batches", "max_prompt_length", "target_kl"])
    _positive(args, ["kl_coef", "vf_coef", "missing_eos_penalty"], strict=False)
    for name in ("gamma", "lam"):
        value = getattr(args, name)
        if not 0 <= value <= 1:
            raise UsageError(f"`--{name}` must be in [0, 1] (got {value}).")


def check_grpo(args: ParsedArgs) -> None:
    if not args.reward_function and not args.reward_model:
        raise UsageError("give `--reward_function triviaqa_em|triviaqa_f1` (comma-separated for several) and/or "
                         "`--reward_model DIR`.")
    names = [n.strip() for n in (args.reward_function or "").split(",") if n.strip()]
    check_reward_model(args)
    if args.reward_weights:
        try:
            weights = [float(w) for w in args.reward_weights.split(",")]
        except ValueError:
            raise UsageError(f"`--reward_weights {args.reward_weights}`: write numbers separated by commas.") from None
        expected = len(names) + (1 if args.reward_model else 0)
        if len(weights) != expected:
            raise UsageError(f"`--reward_weights` has {len(weights)} values for {expected} rewards; give one each.")
    _positive(args, ["num_generations", "max_completion_length", "temperature", "max_prompt_length"])
    _positive(args, ["beta"], strict=False)
    if args.num_generations < 2:
        raise UsageError("`--num_generations` must be >= 2: GRPO compares answers within a group.")


def warn_ignored(args: ParsedArgs, unused, technique: str) -> None:
    """One warning for the flags the user gave that mean nothing to this technique."""
    ignored = sorted(n for n in args.explicit if n in unused)
    if ignored:
        log.warning("%s ignores flags that do not apply to %s: %s.", args.script, technique, format_flags(ignored))
