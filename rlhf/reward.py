"""Reward model training: a scalar head on the base model plus LoRA, with TRL's RewardTrainer, on
the same preference sources as dpo.py. Reports pairwise accuracy on held-out pairs; the saved
dir is what `ppo.py --reward_model` loads."""

from __future__ import annotations

import logging
from typing import Optional

from common.flags.groups import (DataArguments, LoraArguments, ModelArguments, PreferenceArguments,
                                 QuantizationArguments, TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags.errors import UsageError
from common.flags.checks import check_common, check_preference
from common.recipe import pipeline as recipe
from common.recipe.pipeline import Run, Steps

log = logging.getLogger("finetune")

ARG_GROUPS = [ModelArguments, QuantizationArguments, DataArguments, LoraArguments, PreferenceArguments,
              TrainingArguments]


def make_parser() -> FlagParser:
    return FlagParser(ARG_GROUPS, prog="reward_model.py", defaults={"learning_rate": 1e-4},
                      description="Train a scalar reward model (sequence-classification head + LoRA) on preference "
                                  "pairs, for ppo.py --reward_model.")


def main(argv: Optional[list[str]] = None) -> int:
    from common.recipe.cli import run_cli

    def train():
        args = make_parser().parse(argv)
        check_common(args)
        check_preference(args, "reward")
        return run_reward_model(args)

    return run_cli("reward_model.py", train, detach=True)


def _tokenize(ds, tokenizer, system_mode: str = "keep"):
    """Pairs -> the ids SFT trains on for prompt + chosen and prompt + rejected (rlhf.pair_tokens.sft_ids),
    which RewardTrainer takes as they are; ppo.py and grpo.py score with the same ids. `--system_message`
    applies to message-list prompts."""
    from common.data.masking import end_of_turn
    from common.data.templates import with_system_mode
    from rlhf.pair_tokens import sft_ids

    eot = end_of_turn(tokenizer)

    def tokenize(batch):
        prompts = [p if isinstance(p, str) else with_system_mode(list(p), system_mode) for p in batch["prompt"]]
        return {f"{side}_ids": [sft_ids(tokenizer, p, a, eot=eot) for p, a in zip(prompts, batch[side])]
                for side in ("chosen", "rejected")}

    return ds.map(tokenize, batched=True, desc="Tokenizing pairs")  # (RewardTrainer reads only the ids)


def _split_then_pair(src, fmt, args):
    """-> (train pairs, their stats, held-out pairs). Rows are split first, so that a training
    pair's rejected answer is never a held-out row's answer; a held-out pair's rejected answer may
    come from any row."""
    from dataclasses import replace

    from rlhf import preference as pref

    split = src.rows.train_test_split(test_size=0.1, seed=args.seed)
    train_ds, stats = pref.preference_dataset(replace(src, rows=split["train"]), fmt, args.rejected_source,
                                              args.seed)
    eval_ds, _ = pref.preference_dataset(replace(src, rows=split["test"]), fmt, args.rejected_source, args.seed + 1,
                                         pool=src.rows)
    return train_ds, stats, eval_ds


def pooled_accuracy_trainer():
    """TRL's RewardTrainer reports the mean of per-batch accuracies, which weighs a short last batch
    like a full one (60 pairs in batches of 8: 0.5625 for 35/60). This one reports the share of
    all held-out pairs whose chosen answer scores above the rejected one."""
    import torch
    from trl import RewardTrainer

    class PooledAccuracyRewardTrainer(RewardTrainer):
        _wins = _pairs = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if not self.model.training:
                with torch.no_grad():
                    chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
                    wins = self.accelerator.gather_for_metrics((chosen > rejected).float())
                self._wins += int(wins.sum().item())
                self._pairs += wins.numel()
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            if not self.model.training and self._pairs:  # the end of an evaluation
                self._metrics["eval"]["accuracy"] = [self._wins / self._pairs]
                logs["eval_pairs"] = self._pairs
                self._wins = self._pairs = 0
            super().log(logs, start_time)

    return PooledAccuracyRewardTrainer


class RewardSteps(Steps):
    """A scalar head on the base model plus LoRA, trained with TRL's RewardTrainer on pairs."""

    name, title = "reward_model", "reward model (LoRA + scalar head)"
    labelled_positions_only = False

    def check_source(self, run: Run) -> None:
        if run.source.adapter_dir:
            raise UsageError(f"`--model_id` {run.args.model_id} is an adapter; a reward model starts from a base "
                             f"model (merge the adapter with merge.py first if you want its weights).")

    def load_data(self, run: Run) -> None:
        from rlhf import preference as pref

        run.data = pref.load_preference_data(run.args, need_eval=True, required=False)
        pref.require_pairs(run.data, "reward_model.py")

    def schema(self, run: Run) -> str:
        return run.data[0].schema

    def prepare(self, run: Run) -> None:
        from rlhf import preference as pref
        from rlhf.pref_formats import conversation_rendering

        args, (train_src, eval_src) = run.args, run.data
        conversation_rendering(args, run.tokenizer, train_src, eval_src)
        if args.rejected_source == "model" and train_src.kind == "qa":
            raise UsageError("`--rejected_source model` needs a policy to generate answers; reward_model.py builds "
                             "question-answer pairs with `--rejected_source other`, or takes prompt/chosen/rejected "
                             "data.")
        if eval_src is not None:
            train_ds, self.stats = pref.preference_dataset(train_src, run.fmt, args.rejected_source, args.seed)
            eval_ds, _ = pref.preference_dataset(eval_src, run.fmt, args.rejected_source, args.seed + 1)
        else:  # no held-out split: keep 10% of the rows aside, reproducibly, before any pair is built
            train_ds, self.stats, eval_ds = _split_then_pair(train_src, run.fmt, args)
            log.info("no held-out split: %d of the pairs are kept aside for accuracy.", len(eval_ds))
        run.train_rows = _tokenize(train_ds, run.tokenizer, args.system_message)
        run.eval_rows = _tokenize(eval_ds, run.tokenizer, args.system_message)

    def config(self, run: Run, kwargs: dict):
        from trl import RewardConfig

        kwargs["train_sampling_strategy"] = "random"
        if run.args.eval_strategy == "no":
            kwargs["eval_strategy"] = "no"
        return RewardConfig(**kwargs, max_length=run.args.max_seq_length, dataset_num_proc=run.args.dataset_num_proc)

    def load_model(self, run: Run):
        from transformers import AutoModelForSequenceClassification

        from common.model.loading import device_map_for, hub_error, prepare_kbit_training
        from common.model.precision import get_quantization_config

        args = run.args
        quant = get_quantization_config(args, run.precision)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                run.source.base, num_labels=1, trust_remote_code=args.trust_remote_code, revision=args.revision,
                dtype=run.precision.torch_dtype, quantization_config=quant,
                device_map=device_map_for(quant is not None))
        except Exception as exc:
            raise hub_error(args.model_id, exc) from None
        model.config.pad_token_id = run.tokenizer.pad_token_id
        return prepare_kbit_training(model, args.gradient_checkpointing) if quant is not None else model

    def attach(self, run: Run):
        from peft import LoraConfig, get_peft_model

        from common.model.adapters import resolve_target_modules, share_dropout
        from common.model.loading import shardable
        from rlhf.rewards import score_at_last_token

        args = run.args
        config = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout, bias=args.lora_bias, use_dora=args.use_dora,
                            target_modules=resolve_target_modules(run.model, args.target_modules))
        model = get_peft_model(run.model, config)
        score_at_last_token(model)
        return share_dropout(shardable(model), args)

    def trainer(self, run: Run, callbacks: list):
        return pooled_accuracy_trainer()(model=run.model, args=run.config, train_dataset=run.train_rows,
                                         eval_dataset=run.eval_rows, processing_class=run.tokenizer,
                                         callbacks=callbacks)

    def final_metrics(self, run: Run, metrics: dict) -> None:
        metrics.update(run.trainer.evaluate())

    def record(self, run: Run) -> dict:
        return {"data": {"source": run.data[0].source, "pairs": self.stats, "heldout_pairs": len(run.eval_rows)}}

    def more_summary(self, run: Run, metrics: dict) -> dict:
        return {"heldout_accuracy": metrics.get("eval_accuracy")}


def run_reward_model(args: ParsedArgs) -> dict:
    run, info = recipe.train(RewardSteps(), args)
    log.info("held-out pairwise accuracy: %.4f on %d pairs", info["heldout_accuracy"] or 0.0,
             run.metrics.get("eval_pairs", len(run.eval_rows)))
    return info
