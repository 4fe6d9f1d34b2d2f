"""Preference optimisation runs: DPO (TRL's DPOTrainer) and ORPO (TRL's experimental ORPOTrainer).

DPO trains the policy against a frozen reference on preference pairs; started from an SFT adapter
dir, both the policy and the reference are that SFT model (TRL keeps a frozen copy of the adapter
as the reference). ORPO adds an odds-ratio penalty to the SFT loss and needs no reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from common.flags.groups import (DataArguments, LoraArguments, ModelArguments, PreferenceArguments,
                                 QuantizationArguments, TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags import checks
from common.flags.checks import check_common, check_preference
from common.recipe import pipeline as recipe
from common.recipe.pipeline import Run, Steps

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
UNUSED_FLAGS = {kind: ("completion_only_loss", "packing", "padding_free", *(f for f in _SPECIFIC if f not in uses))
                       for kind, uses in _USES.items()}


def make_parser(kind: str) -> FlagParser:
    script, title, defaults = KINDS[kind]
    return FlagParser(ARG_GROUPS, prog=script, defaults=defaults, hidden=UNUSED_FLAGS[kind],
                      description=f"{title} with LoRA on preference pairs (prompt/chosen/rejected) or on TriviaQA "
                                  f"turned into pairs. Accepts the SFT scripts' model, quantization, LoRA and "
                                  f"training flags.")


def parse(kind: str, argv: Optional[list[str]]) -> ParsedArgs:
    args = make_parser(kind).parse(argv)
    check_common(args)
    check_preference(args, kind)
    checks.warn_ignored(args, UNUSED_FLAGS[kind], KINDS[kind][1])
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

    return run_cli(KINDS[kind][0], lambda: train(kind, argv), detach=True)


class PreferenceSteps(Steps):
    """DPO, ORPO, KTO and SimPO: preference pairs (or question-answer rows turned into pairs, or
    KTO's unpaired feedback) and TRL's trainer for each."""

    drop_adapters = ("ref",)

    def __init__(self, kind: str):
        self.name = kind
        self.title = KINDS[kind][1]
        self.labelled_positions_only = kind in ("dpo", "kto")  # ORPO and SimPO keep full logits
        self.stats = None

    def load_data(self, run: Run) -> None:
        from rlhf import preference as pref

        run.data = pref.load_preference_data(run.args, need_eval=run.args.eval_strategy != "no", required=True)
        if self.name != "kto":
            pref.require_pairs(run.data, KINDS[self.name][0])

    def schema(self, run: Run) -> str:
        return run.data[0].schema

    def prepare(self, run: Run) -> None:
        from rlhf.pref_formats import conversation_rendering

        conversation_rendering(run.args, run.tokenizer, *run.data)

    def has_eval(self, run: Run) -> bool:
        return run.data[1] is not None

    def config(self, run: Run, kwargs: dict):
        args, kind = run.args, self.name
        # Pairs carry no `input_ids` column to group by; their lengths vary little for QA anyway.
        kwargs["train_sampling_strategy"] = "random"
        shared = dict(beta=args.beta, max_length=args.max_seq_length, dataset_num_proc=args.dataset_num_proc,
                      trust_remote_code=args.trust_remote_code)
        if kind == "dpo":
            from trl import DPOConfig

            return DPOConfig(**kwargs, **shared,
                             loss_type=[x.strip() for x in args.loss_type.split(",") if x.strip()])
        if kind == "kto":
            from trl import KTOConfig

            # KTO's KL term pairs each example with its neighbours in a fixed order: shuffled once, by --seed.
            kwargs["train_sampling_strategy"] = "sequential"
            return KTOConfig(**kwargs, **shared, desirable_weight=args.desirable_weight,
                             undesirable_weight=args.undesirable_weight)
        completion = args.max_seq_length - (args.max_prompt_length or 0) or None
        if kind == "orpo":
            from trl.experimental.orpo import ORPOConfig as Config

            extra = {"remove_unused_columns": False}  # its pair collator needs every column
        else:  # SimPO is CPO's trainer with the SimPO loss and no behaviour-cloning term
            from trl.experimental.cpo import CPOConfig as Config

            extra = {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": args.simpo_gamma,
                     "remove_unused_columns": False}
        return Config(**kwargs, **shared, max_completion_length=completion, **extra)

    def after_model(self, run: Run) -> None:
        if self.name in ("dpo", "kto"):  # policy and reference agree at step 0: TRL's disable_dropout (on) covers
            from rlhf.policy_model import disable_dropout  # nn.Dropout only, not OPT-style F.dropout layers

            disable_dropout(run.model)
        train_src, eval_src = run.data
        run.train_rows, self.stats = self.pairs_of(run, train_src)
        run.eval_rows = self.pairs_of(run, eval_src)[0] if eval_src is not None else None
        if self.name == "kto":
            from rlhf import preference as pref

            run.train_rows = run.train_rows.shuffle(seed=run.args.seed)
            pref.balance_kto(run.args, pref.kto_counts(run.train_rows["label"]))
            pref.quiet_trl_balance_warning()
            run.config.desirable_weight = run.args.desirable_weight  # as rebalanced
            run.config.undesirable_weight = run.args.undesirable_weight

    def pairs_of(self, run: Run, src):
        from rlhf import preference as pref
        from rlhf.pref_formats import as_trained

        args, kind, tokenizer = run.args, self.name, run.tokenizer
        if src.kind == "unpaired":  # (kto.py only: load_data() has refused it for the others)
            ds = pref.limit_prompt_length(pref.unpaired_dataset(src, None), tokenizer, args.max_prompt_length,
                                          src.source, args.system_message)
            return as_trained(ds, tokenizer, args.system_message), None
        ds, stats = pref.preference_dataset(src, run.fmt, args.rejected_source, args.seed, model=run.model,
                                            tokenizer=tokenizer, batch_size=args.generation_batch_size)
        if kind == "kto":  # each pair becomes one desirable and one undesirable example
            ds = pref.unpaired_dataset(src, ds)
        ds = pref.limit_prompt_length(ds, tokenizer, args.max_prompt_length, src.source, args.system_message)
        return as_trained(ds, tokenizer, args.system_message), stats

    def trainer(self, run: Run, callbacks: list):
        if self.name == "dpo":
            from trl import DPOTrainer as trainer_cls
        elif self.name == "kto":
            from trl import KTOTrainer as trainer_cls
        else:
            from rlhf.pair_tokens import aligned

            if self.name == "orpo":
                from trl.experimental.orpo import ORPOTrainer as base
            else:
                from trl.experimental.cpo import CPOTrainer as base
            trainer_cls = aligned(base)  # the token ids SFT, DPO and KTO train on
        trainer = trainer_cls(model=run.model, args=run.config, train_dataset=run.train_rows,
                              eval_dataset=run.eval_rows, processing_class=run.tokenizer, callbacks=callbacks)
        if self.name == "kto":
            from rlhf import preference as pref

            counts = pref.kto_counts(trainer.train_dataset["label"])
            log.info("KTO: %d desirable and %d undesirable examples (weights %g and %g).", counts["desirable"],
                     counts["undesirable"], run.args.desirable_weight, run.args.undesirable_weight)
        return trainer

    def record(self, run: Run) -> dict:
        from rlhf import preference as pref

        train_src = run.data[0]
        data = {"source": train_src.source, "schema": train_src.schema, "pairs": self.stats}
        if self.name == "kto":  # what was trained: each pair gave one desirable and one undesirable example
            data["examples"] = pref.kto_counts(run.trainer.train_dataset["label"])
        return {"data": {**data, "rejected_source": run.args.rejected_source if train_src.kind == "qa" else None,
                         "chat_template": run.fmt.use_chat}}


def run_preference(kind: str, args: ParsedArgs) -> PreferenceResult:
    steps = PreferenceSteps(kind)
    run, info = recipe.train(steps, args)
    return PreferenceResult(kind=kind, output_dir=run.out, summary=info, pairs=steps.stats, trainer=run.trainer)
