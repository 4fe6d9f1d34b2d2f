"""The one supervised fine-tuning run. The technique (lora, dora, qlora, prefix_tuning,
p_tuning, prompt_tuning) is a parameter; the six root scripts only pick it."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

from common.flags.groups import (DataArguments, LoraArguments, ModelArguments, PromptLearningArguments, QuantizationArguments, TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags.errors import UsageError, format_flags
from common.flags.checks import check_common, check_sft
from common.model.adapters import LORA_FAMILY, PEFT_TYPES, PROMPT_LEARNING

log = logging.getLogger("finetune")


@dataclass(frozen=True)
class Technique:
    name: str
    script: str
    title: str
    defaults: dict
    flags: tuple  # technique-specific flags that apply (others in LoRA/prompt groups are ignored)


_LORA_FLAGS = tuple(f.name for f in dataclasses.fields(LoraArguments))
_DIM_FLAGS = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")

TECHNIQUES = {
    "lora": Technique("lora", "lora.py", "LoRA", {}, _LORA_FLAGS),
    "dora": Technique("dora", "dora.py", "DoRA", {"use_dora": True}, _LORA_FLAGS),
    "qlora": Technique("qlora", "qlora.py", "QLoRA", {"load_in_4bit": True}, _LORA_FLAGS),
    # Prompt learning trains few parameters from scratch: it wants a much higher learning rate.
    "prefix_tuning": Technique("prefix_tuning", "prefix_tuning.py", "prefix tuning", {"learning_rate": 1e-2},
                               _DIM_FLAGS + ("prefix_projection", "encoder_hidden_size")),
    "p_tuning": Technique("p_tuning", "p_tuning.py", "P-tuning", {"learning_rate": 3e-3},
                          _DIM_FLAGS + ("encoder_reparameterization_type", "encoder_hidden_size",
                                        "encoder_num_layers", "encoder_dropout")),
    "prompt_tuning": Technique("prompt_tuning", "prompt_tuning.py", "prompt tuning", {"learning_rate": 3e-2},
                               _DIM_FLAGS + ("prompt_tuning_init", "prompt_tuning_init_text")),
}

_TECHNIQUE_GROUPS = _LORA_FLAGS + tuple(f.name for f in dataclasses.fields(PromptLearningArguments)
                                        if f.name not in ("peft_type", "task_type"))

ARG_GROUPS = [ModelArguments, QuantizationArguments, DataArguments, LoraArguments, PromptLearningArguments,
              TrainingArguments]


def make_parser(technique: str) -> FlagParser:
    t = TECHNIQUES[technique]
    # Other techniques' flags are accepted (and warned about), not listed.
    hidden = [n for n in _TECHNIQUE_GROUPS if n not in t.flags]
    if technique in LORA_FAMILY:
        hidden += ["peft_type", "task_type"]
    return FlagParser(ARG_GROUPS, prog=t.script, defaults=t.defaults, hidden=tuple(hidden),
                      description=f"Supervised fine-tuning with {t.title} on question-answer data (TriviaQA by "
                                  f"default).")


def effective_technique(technique: str, args: ParsedArgs) -> str:
    """Resolve --peft_type / --use_dora / quantization against the script that was run."""
    script = TECHNIQUES[technique].script
    if args.peft_type:
        wanted = PEFT_TYPES.get(args.peft_type.strip().upper())
        if wanted is None:
            raise UsageError(f"`--peft_type {args.peft_type}` is unknown; use one of {', '.join(PEFT_TYPES)}.")
        if wanted != technique and not (technique in LORA_FAMILY and wanted == "lora"):
            if technique in PROMPT_LEARNING and wanted in PROMPT_LEARNING:
                log.info("`--peft_type %s`: running %s (its own script is %s).", args.peft_type,
                         TECHNIQUES[wanted].title, TECHNIQUES[wanted].script)
                return wanted
            target = TECHNIQUES[wanted].script
            raise UsageError(f"`--peft_type {args.peft_type}` does not fit {script}; run `{target}` instead.")
    if technique == "dora" and not args.use_dora:
        raise UsageError("`--use_dora False` turns dora.py into plain LoRA; run `lora.py` instead.")
    if technique == "qlora":
        if not (args.load_in_4bit or args.load_in_8bit):
            raise UsageError("qlora.py trains on a quantized base: `--load_in_4bit False` leaves nothing to "
                             "quantize; run `lora.py` for an unquantized model.")
    if technique == "lora" and args.use_dora:
        return "dora"
    return technique


def warn_ignored(technique: str, args: ParsedArgs) -> None:
    applies = set(TECHNIQUES[technique].flags)
    ignored = sorted(n for n in args.explicit if n in _TECHNIQUE_GROUPS and n not in applies)
    if ignored:
        log.warning("%s ignores flags that do not apply to %s: %s.", args.script,
                    TECHNIQUES[technique].title, format_flags(ignored))


def parse(technique: str, argv: Optional[list[str]]) -> tuple[str, ParsedArgs]:
    args = make_parser(technique).parse(argv)
    if technique == "qlora" and args.load_in_8bit and "load_in_4bit" not in args.explicit:
        args.set("load_in_4bit", False)  # 8-bit LoRA asked for explicitly
    check_common(args)
    effective = effective_technique(technique, args)
    check_sft(effective, args)
    warn_ignored(effective, args)
    if effective == "prefix_tuning" and args.gradient_checkpointing:
        given = "`--gradient_checkpointing`" if "gradient_checkpointing" in args.explicit else \
            "gradient checkpointing (on by default)"
        log.warning("%s: prefix tuning cannot use it (PEFT refuses the combination); training without it.", given)
        args.set("gradient_checkpointing", False)
    return effective, args


def train(technique: str, argv: Optional[list[str]] = None) -> "SFTResult":
    """Parse, check and run; raises UsageError on bad input. Tests use this for the model."""
    effective, args = parse(technique, argv)
    return run_sft(effective, args)


def main(technique: str, argv: Optional[list[str]] = None) -> int:
    from common.recipe.cli import run_cli

    return run_cli(TECHNIQUES[technique].script, lambda: train(technique, argv))


@dataclass
class SFTResult:
    technique: str
    output_dir: str
    summary: dict
    trainer: object  # the trained model is `trainer.model`


def run_sft(technique: str, args: ParsedArgs) -> SFTResult:
    from common.data import chat
    from common.data import prompts
    from common.recipe import callbacks as recipe_callbacks
    from common.recipe import config as trainer_config
    from common.recipe import outputs
    from common.recipe import reporting
    from common.recipe import training
    from common.model.source import inherit_from_adapter, resolve_model

    # Checks that need no model: output dir, model path, data
    out = outputs.prepare_output_dir(args, default=f"outputs/{technique}")
    source = resolve_model(args.model_id)
    inherit_from_adapter(args, source)
    dataset = chat.load_sft_data(args, need_eval=args.eval_strategy != "no" or args.eval_em_samples > 0)
    own_format = dataset.schema in chat.FORMATS  # conversations or text: tokenised and masked by common.data.chat
    if own_format and args.eval_em_samples:
        raise UsageError(f"`--eval_em_samples` scores answers to questions; {dataset.source} is {dataset.schema} "
                         f"data. Leave it at 0 (held-out loss is reported with `--eval_strategy`).")
    log.info("data: %d training rows from %s (schema: %s)%s", len(dataset.train), dataset.source, dataset.schema,
             f", {len(dataset.eval)} held-out rows" if dataset.eval is not None else "")

    # Model & tokenizer
    from common.model.loading import (count_parameters, is_quantized, keep_float32_trainables, load_model, load_tokenizer)
    from common.model.precision import select_precision
    from common.model.adapters import attach_adapter

    precision = select_precision(args)
    tokenizer = load_tokenizer(source, args)
    fmt = prompts.prompt_format(args, tokenizer, dataset.schema)
    num_proc = prompts.auto_num_proc(args.dataset_num_proc, len(dataset.train))
    if own_format:
        to_sft = chat.sft_dataset_builder(args, tokenizer)
        fmt.use_chat = chat.has_template(tokenizer)
    else:
        to_sft = lambda ds, n: prompts.to_sft_dataset(ds, fmt, n)  # noqa: E731
    train_ds = to_sft(dataset.train, num_proc)
    eval_ds = None
    if dataset.eval is not None and args.eval_strategy != "no":
        eval_ds = to_sft(dataset.eval, args.dataset_num_proc)
    model = load_model(source, args, precision, training=True)
    from transformers import set_seed

    set_seed(args.seed)  # the new adapter's initial weights follow --seed
    model = attach_adapter(technique, args, model, source)
    trainable, total = count_parameters(model)
    log.info("%s: %s trainable parameters of %s (%.4f%%)", TECHNIQUES[technique].title, f"{trainable:,}",
             f"{total:,}", 100 * trainable / max(total, 1))

    # Training
    from trl import SFTConfig, SFTTrainer

    report_to = reporting.setup_reporting(args, out)
    if args.overwrite_output_dir:
        outputs.clear_previous_run(out)
    config = SFTConfig(
        **trainer_config.trainer_kwargs(args, out, precision.mode, report_to, has_eval=eval_ds is not None),
        max_length=args.max_seq_length,
        completion_only_loss=args.completion_only_loss,
        packing=args.packing,
        padding_free=args.padding_free,
        dataset_num_proc=num_proc,
        include_num_input_tokens_seen="non_padding",
        trust_remote_code=args.trust_remote_code,
    )
    callbacks = [recipe_callbacks.nan_guard_callback()]
    em = None
    if args.eval_em_samples:
        em_rows = dataset.eval.select(range(min(args.eval_em_samples, len(dataset.eval))))
        em = recipe_callbacks.exact_match_callback(em_rows, fmt, tokenizer, args.per_device_eval_batch_size)
        callbacks.append(em)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_ds,
                         eval_dataset=eval_ds if args.eval_strategy != "no" else None,
                         processing_class=tokenizer, callbacks=callbacks)
    if em is not None:
        em.trainer = trainer
    from common.model import loss

    loss.install(trainer)  # the LM head and cross-entropy only at labelled positions
    keep_float32_trainables(trainer.model, precision)  # TRL stores QLoRA adapters in bf16
    metrics, wall = training.train_guarded(trainer, args, out, technique)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())  # also scores EM/F1 when --eval_em_samples is set
    elif em is not None:
        final = em.score(trainer.model)
        trainer.log(final)
        metrics.update(final)
    extra = {"model": {"base": source.base, "start_adapter": source.adapter_dir, "precision": precision.mode,
                       "quantized": is_quantized(model)},
             "data": {"source": dataset.source, "schema": dataset.schema, "train_rows": len(dataset.train),
                      "eval_rows": len(dataset.eval) if dataset.eval is not None else 0,
                      "chat_template": fmt.use_chat,
                      **({"assistant_turns": args.assistant_turns} if own_format else {})},
             "parameters": {"trainable": trainable, "total": total}}
    info = training.finish_run(trainer, tokenizer, args, out, technique, metrics, wall, extra, report_to)
    return SFTResult(technique=technique, output_dir=out, summary=info, trainer=trainer)
