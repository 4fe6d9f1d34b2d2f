"""The one supervised fine-tuning run. The technique (lora, dora, qlora, prefix_tuning,
p_tuning, prompt_tuning) is a parameter; the six root scripts only pick it."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

from common.flags.groups import (DataArguments, LoraArguments, ModelArguments, PromptLearningArguments,
                                 QuantizationArguments, TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags.errors import UsageError
from common.flags import checks
from common.flags.checks import check_common, check_sft
from common.model.adapters import LORA_FAMILY, PEFT_TYPES, PROMPT_LEARNING
from common.recipe import pipeline as recipe
from common.recipe.pipeline import Run, Steps

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

TECHNIQUE_FLAGS = _LORA_FLAGS + tuple(f.name for f in dataclasses.fields(PromptLearningArguments)
                                      if f.name not in ("peft_type", "task_type"))

ARG_GROUPS = [ModelArguments, QuantizationArguments, DataArguments, LoraArguments, PromptLearningArguments,
              TrainingArguments]


def make_parser(technique: str) -> FlagParser:
    t = TECHNIQUES[technique]
    # Other techniques' flags are accepted (and warned about), not listed.
    hidden = [n for n in TECHNIQUE_FLAGS if n not in t.flags]
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
    unused = set(TECHNIQUE_FLAGS) - set(TECHNIQUES[technique].flags)
    checks.warn_ignored(args, unused, TECHNIQUES[technique].title)


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

    return run_cli(TECHNIQUES[technique].script, lambda: train(technique, argv), detach=True)


@dataclass
class SFTResult:
    technique: str
    output_dir: str
    summary: dict
    trainer: object  # the trained model is `trainer.model`


class SFTSteps(Steps):
    """Supervised fine-tuning: question-answer rows become prompt/completion pairs (or chat
    messages), conversation and text rows are tokenised and masked here; TRL's SFTTrainer."""

    def __init__(self, technique: str):
        self.name = self.adapter = technique
        self.title = TECHNIQUES[technique].title
        self.em = None

    def load_data(self, run: Run) -> None:
        from common.data import chat

        args = run.args
        run.data = chat.load_sft_data(args, need_eval=args.eval_strategy != "no" or args.eval_em_samples > 0)
        if self.own_format(run) and args.eval_em_samples:
            raise UsageError(f"`--eval_em_samples` scores answers to questions; {run.data.source} is "
                             f"{run.data.schema} data. Leave it at 0 (held-out loss is reported with "
                             f"`--eval_strategy`).")
        log.info("data: %d training rows from %s (schema: %s)%s", len(run.data.train), run.data.source,
                 run.data.schema, f", {len(run.data.eval)} held-out rows" if run.data.eval is not None else "")

    @staticmethod
    def own_format(run: Run) -> bool:
        from common.data import chat

        return run.data.schema in chat.FORMATS  # conversations or text: tokenised and masked by common.data.chat

    def prepare(self, run: Run) -> None:
        from common.data import chat, prompts, templates

        from common.data.lengths import fit_tokenized, fit_to_length

        args, data = run.args, run.data
        self.num_proc = prompts.auto_num_proc(args.dataset_num_proc, len(data.train))
        if self.own_format(run):
            to_sft = chat.sft_dataset_builder(args, run.tokenizer)
            run.fmt.use_chat = templates.has_template(run.tokenizer)
        elif run.fmt.use_chat:
            def to_sft(ds, n):
                return prompts.chat_sft_rows(ds, run.fmt, run.tokenizer, args.completion_only_loss, n)
        else:
            def to_sft(ds, n):
                return prompts.to_sft_dataset(ds, run.fmt, n)

        def fitted(ds, n, flag):  # rows --max_seq_length leaves nothing to train are dropped; both counted
            rows = to_sft(ds, n)
            if "labels" in rows.column_names:
                return fit_tokenized(rows, args.max_seq_length, data.source, flag)
            return fit_to_length(rows, run.tokenizer, args.max_seq_length, data.source, flag)

        run.train_rows = fitted(data.train, self.num_proc, "dataset_split")
        if data.eval is not None and args.eval_strategy != "no":
            run.eval_rows = fitted(data.eval, args.dataset_num_proc, "eval_split")

    def config(self, run: Run, kwargs: dict):
        from trl import SFTConfig

        args = run.args
        return SFTConfig(**kwargs, max_length=args.max_seq_length, completion_only_loss=args.completion_only_loss,
                         packing=args.packing, padding_free=args.padding_free, dataset_num_proc=self.num_proc,
                         include_num_input_tokens_seen="non_padding", trust_remote_code=args.trust_remote_code)

    def adapter_kind(self, run: Run) -> str:
        return self.adapter

    def trainer(self, run: Run, callbacks: list):
        from trl import SFTTrainer

        from common.recipe.callbacks import exact_match_callback

        args = run.args
        if args.eval_em_samples:
            rows = run.data.eval.select(range(min(args.eval_em_samples, len(run.data.eval))))
            self.em = exact_match_callback(rows, run.fmt, run.tokenizer, args.per_device_eval_batch_size)
            callbacks.append(self.em)
        trainer = SFTTrainer(model=run.model, args=run.config, train_dataset=run.train_rows,
                             eval_dataset=run.eval_rows, processing_class=run.tokenizer, callbacks=callbacks)
        if self.em is not None:
            self.em.trainer = trainer
        return trainer

    def final_metrics(self, run: Run, metrics: dict) -> None:
        if run.eval_rows is not None:
            metrics.update(run.trainer.evaluate())  # also scores EM/F1 when --eval_em_samples is set
        elif self.em is not None:
            final = self.em.score(run.trainer.model)
            run.trainer.log(final)
            metrics.update(final)

    def record(self, run: Run) -> dict:
        data = run.data
        return {"data": {"source": data.source, "schema": data.schema, "train_rows": len(data.train),
                         "eval_rows": len(data.eval) if data.eval is not None else 0,
                         "chat_template": run.fmt.use_chat,
                         **({"assistant_turns": run.args.assistant_turns} if self.own_format(run) else {})}}


def run_sft(technique: str, args: ParsedArgs) -> SFTResult:
    run, info = recipe.train(SFTSteps(technique), args)
    return SFTResult(technique=technique, output_dir=run.out, summary=info, trainer=run.trainer)
