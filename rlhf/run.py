"""Preference optimisation runs: DPO (TRL's DPOTrainer) and ORPO (TRL's experimental ORPOTrainer).

DPO trains the policy against a frozen reference on preference pairs; started from an SFT adapter
dir, both the policy and the reference are that SFT model (TRL keeps a frozen copy of the adapter
as the reference). ORPO adds an odds-ratio penalty to the SFT loss and needs no reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from common.flags.groups import (DataArguments, LoraArguments, ModelArguments, PreferenceArguments, QuantizationArguments, TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags.errors import UsageError, format_flags
from common.flags.checks import check_common, check_preference

log = logging.getLogger("finetune")

KINDS = {
    # LoRA wants ~10x the full-fine-tuning learning rates of the DPO (5e-7..5e-6) and ORPO (8e-6) papers.
    "dpo": ("dpo.py", "DPO", {"learning_rate": 5e-5}),
    "orpo": ("orpo.py", "ORPO", {"learning_rate": 8e-5}),
    "kto": ("kto.py", "KTO", {"learning_rate": 5e-5}),
    # SimPO's reward is the length-normalised log-likelihood, on a larger scale: the paper's beta is 2-2.5.
    "simpo": ("simpo.py", "SimPO", {"learning_rate": 5e-5, "beta": 2.0}),
}
ARG_GROUPS = [ModelArguments, QuantizationArguments, DataArguments, LoraArguments, PreferenceArguments,
              TrainingArguments]
# Flags of the shared set that mean nothing for a preference run.
_SPECIFIC = ("loss_type", "simpo_gamma", "desirable_weight", "undesirable_weight")
_USES = {"dpo": ("loss_type",), "orpo": (), "kto": ("desirable_weight", "undesirable_weight"),
         "simpo": ("simpo_gamma",)}
_UNUSED = {kind: ("completion_only_loss", "packing", "padding_free", *(f for f in _SPECIFIC if f not in uses))
           for kind, uses in _USES.items()}


def make_parser(kind: str) -> FlagParser:
    script, title, defaults = KINDS[kind]
    return FlagParser(ARG_GROUPS, prog=script, defaults=defaults, hidden=_UNUSED[kind],
                      description=f"{title} with LoRA on preference pairs (prompt/chosen/rejected) or on TriviaQA "
                                  f"turned into pairs. Accepts the SFT scripts' model, quantization, LoRA and "
                                  f"training flags.")


def parse(kind: str, argv: Optional[list[str]]) -> ParsedArgs:
    args = make_parser(kind).parse(argv)
    check_common(args)
    check_preference(args, kind)
    ignored = sorted(n for n in args.explicit if n in _UNUSED[kind])
    if ignored:
        log.warning("%s ignores flags that do not apply to %s: %s.", args.script, KINDS[kind][1],
                    format_flags(ignored))
    return args


@dataclass
class PreferenceResult:
    kind: str
    output_dir: str
    summary: dict
    pairs: dict
    trainer: object


def train(kind: str, argv: Optional[list[str]] = None) -> PreferenceResult:
    return run_preference(kind, parse(kind, argv))


def main(kind: str, argv: Optional[list[str]] = None) -> int:
    from common.recipe.cli import run_cli

    return run_cli(KINDS[kind][0], lambda: train(kind, argv))


def run_preference(kind: str, args: ParsedArgs) -> PreferenceResult:
    from common.data import prompts
    from common.recipe import callbacks as recipe_callbacks
    from common.recipe import config as trainer_config
    from common.recipe import outputs
    from common.recipe import reporting
    from common.recipe import training
    from common.model.source import inherit_from_adapter, resolve_model
    from rlhf import preference as pref

    script, title, _ = KINDS[kind]
    # Checks that need no model
    out = outputs.prepare_output_dir(args, default=f"outputs/{kind}")
    source = resolve_model(args.model_id)
    inherit_from_adapter(args, source)
    train_src = pref.load_preference_source(args, args.dataset_split)
    eval_src = None
    if args.eval_strategy != "no":
        spec = args.eval_split
        if spec.lower() == "auto":
            spec = "validation"
        eval_src = pref.load_preference_source(args, spec, flag="eval_split")

    # Model & tokenizer
    from common.model.loading import (count_parameters, is_quantized, keep_float32_trainables, load_model, load_tokenizer)
    from common.model.precision import select_precision
    from common.model.adapters import attach_adapter

    precision = select_precision(args)
    tokenizer = load_tokenizer(source, args)
    fmt = prompts.prompt_format(args, tokenizer, train_src.schema)
    from rlhf.pref_formats import conversation_rendering

    conversation_rendering(args, tokenizer, train_src, eval_src)
    model = load_model(source, args, precision, training=True)
    technique = "dora" if args.use_dora else ("qlora" if is_quantized(model) else "lora")
    from transformers import set_seed

    set_seed(args.seed)  # the new adapter's initial weights follow --seed
    model = attach_adapter(technique, args, model, source)
    if kind in ("dpo", "kto"):  # policy and reference agree at step 0: TRL's disable_dropout (on) covers
        from rlhf.policy_model import disable_dropout  # nn.Dropout only, not OPT-style F.dropout layers

        disable_dropout(model)
    trainable, total = count_parameters(model)
    log.info("%s (%s): %s trainable parameters of %s (%.4f%%)", title, technique, f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))

    # Dataset: pairs (rejected answers from the starting model, before any training, if asked)
    from rlhf.pref_formats import plain_if_no_template

    def pairs_of(src):
        if src.kind == "unpaired":
            if kind != "kto":
                raise UsageError(f"{src.source}: prompt/completion/label rows are unpaired feedback, which only "
                                 f"kto.py takes; {KINDS[kind][0]} needs prompt/chosen/rejected pairs.")
            ds = plain_if_no_template(pref.unpaired_dataset(src, None), tokenizer)
            return pref.limit_prompt_length(ds, tokenizer, args.max_prompt_length, src.source), None
        ds, stats = pref.preference_dataset(src, fmt, args.rejected_source, args.seed, model=model,
                                            tokenizer=tokenizer, batch_size=args.generation_batch_size)
        if kind == "kto":  # each pair becomes one desirable and one undesirable example
            ds = pref.unpaired_dataset(src, ds)
        ds = plain_if_no_template(ds, tokenizer)
        return pref.limit_prompt_length(ds, tokenizer, args.max_prompt_length, src.source), stats

    train_ds, stats = pairs_of(train_src)
    eval_ds = pairs_of(eval_src)[0] if eval_src is not None else None

    # Training
    report_to = reporting.setup_reporting(args, out)
    if args.overwrite_output_dir:
        outputs.clear_previous_run(out)
    common_kwargs = trainer_config.trainer_kwargs(args, out, precision.mode, report_to, has_eval=eval_ds is not None)
    # Pairs carry no `input_ids` column to group by; their lengths vary little for QA anyway.
    common_kwargs["train_sampling_strategy"] = "random"
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common_kwargs, beta=args.beta, max_length=args.max_seq_length,
                           loss_type=[x.strip() for x in args.loss_type.split(",") if x.strip()],
                           dataset_num_proc=args.dataset_num_proc, trust_remote_code=args.trust_remote_code)
        trainer_cls = DPOTrainer
    elif kind == "kto":
        from trl import KTOConfig, KTOTrainer

        # KTO's KL term pairs each example with its neighbours in a fixed order: shuffle once, by --seed.
        common_kwargs["train_sampling_strategy"] = "sequential"
        train_ds = train_ds.shuffle(seed=args.seed)
        pref.balance_kto(args, pref.kto_counts(train_ds["label"]))
        pref.quiet_trl_balance_warning()
        config = KTOConfig(**common_kwargs, beta=args.beta, max_length=args.max_seq_length,
                           desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                           dataset_num_proc=args.dataset_num_proc, trust_remote_code=args.trust_remote_code)
        trainer_cls = KTOTrainer
    else:
        completion = args.max_seq_length - (args.max_prompt_length or 0) or None
        if kind == "orpo":
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as trainer_cls

            extra_config = {"remove_unused_columns": False}  # its pair collator needs every column
        else:  # SimPO is CPO's trainer with the SimPO loss and no behaviour-cloning term
            from trl.experimental.cpo import CPOConfig as Config
            from trl.experimental.cpo import CPOTrainer as trainer_cls

            extra_config = {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": args.simpo_gamma,
                            "remove_unused_columns": False}
        from rlhf.pair_tokens import aligned

        trainer_cls = aligned(trainer_cls)  # the token ids SFT, DPO and KTO train on
        config = Config(**common_kwargs, beta=args.beta, max_length=args.max_seq_length,
                        max_completion_length=completion, dataset_num_proc=args.dataset_num_proc,
                        trust_remote_code=args.trust_remote_code, **extra_config)
    trainer = trainer_cls(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, callbacks=[recipe_callbacks.nan_guard_callback()])
    keep_float32_trainables(trainer.model, precision)  # TRL stores a 4-bit model's adapters in bf16
    from common.model import loss

    loss.install(trainer)  # DPO, KTO: the LM head only at completion positions (ORPO, SimPO keep full logits)
    data = {"source": train_src.source, "schema": train_src.schema, "pairs": stats}
    if kind == "kto":  # what was trained: each pair gave one desirable and one undesirable example
        data["examples"] = pref.kto_counts(trainer.train_dataset["label"])
        log.info("KTO: %d desirable and %d undesirable examples (weights %g and %g).", data["examples"]["desirable"],
                 data["examples"]["undesirable"], args.desirable_weight, args.undesirable_weight)
    metrics, wall = training.train_guarded(trainer, args, out, kind)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    extra = {"model": {"base": source.base, "start_adapter": source.adapter_dir, "precision": precision.mode,
                       "quantized": is_quantized(model)},
             "data": {**data,
                      "rejected_source": args.rejected_source if train_src.kind == "qa" else None,
                      "chat_template": fmt.use_chat},
             "parameters": {"trainable": trainable, "total": total}}
    info = training.finish_run(trainer, tokenizer, args, out, kind, metrics, wall, extra, report_to, drop_adapters=("ref",))
    return PreferenceResult(kind=kind, output_dir=out, summary=info, pairs=stats, trainer=trainer)
