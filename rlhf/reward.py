"""Reward model training: a scalar head on the base model plus LoRA, with TRL's RewardTrainer, on
the same preference sources as dpo.py. Reports pairwise accuracy on held-out pairs; the saved
dir is what `ppo.py --reward_model` loads."""

from __future__ import annotations

import logging
from typing import Optional

from common.flags.groups import (DataArguments, LoraArguments, ModelArguments, PreferenceArguments, QuantizationArguments, TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags.errors import UsageError
from common.flags.checks import check_common, check_preference

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

    return run_cli("reward_model.py", train)


def _tokenize(ds, tokenizer):
    """Pairs -> the ids SFT trains on for prompt + chosen and prompt + rejected (rlhf.pair_tokens.sft_ids),
    which RewardTrainer takes as they are; ppo.py and grpo.py score with the same ids."""
    from rlhf.pair_tokens import sft_ids

    def tokenize(batch):
        return {f"{side}_ids": [sft_ids(tokenizer, p, a) for p, a in zip(batch["prompt"], batch[side])]
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


def run_reward_model(args: ParsedArgs) -> dict:
    from common.data import prompts
    from common.recipe import callbacks as recipe_callbacks
    from common.recipe import config as trainer_config
    from common.recipe import outputs
    from common.recipe import reporting
    from common.recipe import training
    from common.model.source import inherit_from_adapter, resolve_model
    from rlhf import preference as pref

    out = outputs.prepare_output_dir(args, default="outputs/reward_model")
    source = resolve_model(args.model_id)
    if source.adapter_dir:
        raise UsageError(f"`--model_id` {args.model_id} is an adapter; a reward model starts from a base model "
                         f"(merge the adapter with merge.py first if you want its weights).")
    inherit_from_adapter(args, source)
    train_src = pref.load_preference_source(args, args.dataset_split)
    spec = args.eval_split
    eval_src = None
    if spec.lower() != "none":
        try:
            eval_src = pref.load_preference_source(args, "validation" if spec.lower() == "auto" else spec,
                                                   flag="eval_split")
        except UsageError:
            if spec.lower() != "auto":
                raise

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig

    from common.model.loading import (count_parameters, keep_float32_trainables, load_tokenizer, shardable, device_map_for, hub_error)
    from common.model.precision import get_quantization_config, select_precision
    from common.model.adapters import resolve_target_modules, share_dropout

    precision = select_precision(args)
    tokenizer = load_tokenizer(source, args)
    fmt = prompts.prompt_format(args, tokenizer, train_src.schema)
    from rlhf.pref_formats import conversation_rendering

    conversation_rendering(args, tokenizer, train_src, eval_src)
    if args.rejected_source == "model" and train_src.kind == "qa":
        raise UsageError("`--rejected_source model` needs a policy to generate answers; reward_model.py builds "
                         "question-answer pairs with `--rejected_source other`, or takes prompt/chosen/rejected data.")
    if eval_src is not None:
        train_ds, stats = pref.preference_dataset(train_src, fmt, args.rejected_source, args.seed)
        eval_ds, _ = pref.preference_dataset(eval_src, fmt, args.rejected_source, args.seed + 1)
    else:  # no held-out split: keep 10% of the rows aside, reproducibly, before any pair is built
        train_ds, stats, eval_ds = _split_then_pair(train_src, fmt, args)
        log.info("no held-out split: %d of the pairs are kept aside for accuracy.", len(eval_ds))
    train_ds, eval_ds = _tokenize(train_ds, tokenizer), _tokenize(eval_ds, tokenizer)

    quant = get_quantization_config(args, precision)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source.base, num_labels=1, trust_remote_code=args.trust_remote_code, revision=args.revision,
            dtype=precision.torch_dtype, quantization_config=quant, device_map=device_map_for(quant is not None))
    except Exception as exc:
        raise hub_error(args.model_id, exc) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    if quant is not None:
        from common.model.loading import prepare_kbit_training

        model = prepare_kbit_training(model, args.gradient_checkpointing)
    config = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, bias=args.lora_bias, use_dora=args.use_dora,
                        target_modules=resolve_target_modules(model, args.target_modules))
    model = share_dropout(shardable(get_peft_model(model, config)), args)
    trainable, total = count_parameters(model)
    log.info("reward model: %s trainable parameters of %s (LoRA + scalar head)", f"{trainable:,}", f"{total:,}")

    report_to = reporting.setup_reporting(args, out)
    if args.overwrite_output_dir:
        outputs.clear_previous_run(out)
    kwargs = trainer_config.trainer_kwargs(args, out, precision.mode, report_to, has_eval=True)
    kwargs["train_sampling_strategy"] = "random"
    if args.eval_strategy == "no":
        kwargs["eval_strategy"] = "no"
    trainer = pooled_accuracy_trainer()(model=model, args=RewardConfig(**kwargs, max_length=args.max_seq_length,
                                                          dataset_num_proc=args.dataset_num_proc),
                            train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                            callbacks=[recipe_callbacks.nan_guard_callback()])
    keep_float32_trainables(trainer.model, precision)  # TRL's bf16 score head fails on float32 hidden states
    metrics, wall = training.train_guarded(trainer, args, out)
    metrics.update(trainer.evaluate())
    extra = {"model": {"base": source.base, "precision": precision.mode, "quantized": quant is not None},
             "data": {"source": train_src.source, "pairs": stats, "heldout_pairs": len(eval_ds)},
             "parameters": {"trainable": trainable, "total": total}}
    info = training.finish_run(trainer, tokenizer, args, out, "reward_model", metrics, wall, extra, report_to,
                         more_summary={"heldout_accuracy": metrics.get("eval_accuracy")})
    log.info("held-out pairwise accuracy: %.4f on %d pairs", info["heldout_accuracy"] or 0.0,
             metrics.get("eval_pairs", len(eval_ds)))
    return info
