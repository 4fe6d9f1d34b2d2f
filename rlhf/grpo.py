"""GRPO (TRL's GRPOTrainer) with LoRA/QLoRA on the prompts ppo.py uses, rewarded by the same
TriviaQA rewards (several, weighted) and/or a reward model from reward_model.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from common.flags.groups import (DataArguments, GRPOArguments, LoraArguments, ModelArguments, QuantizationArguments, TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags.errors import UsageError, format_flags
from common.flags.checks import check_common, check_grpo

log = logging.getLogger("finetune")

ARG_GROUPS = [ModelArguments, QuantizationArguments, DataArguments, LoraArguments, GRPOArguments, TrainingArguments]
_UNUSED = ("completion_only_loss", "packing", "padding_free", "eval_em_samples", "max_seq_length",
           "neftune_noise_alpha")


def make_parser() -> FlagParser:
    return FlagParser(ARG_GROUPS, hidden=_UNUSED, prog="grpo.py", defaults={"learning_rate": 1e-4, "logging_steps": 1,
                                                            "per_device_train_batch_size": 8},
                      description="GRPO with LoRA on TriviaQA-style prompts, rewarded by exact match / F1 against "
                                  "the gold answers (combinable, weighted) and/or a reward model.")


def parse(argv: Optional[list[str]]) -> ParsedArgs:
    args = make_parser().parse(argv)
    check_common(args)
    check_grpo(args)
    from rlhf.rewards import get_reward_function

    for name in (args.reward_function or "").split(","):
        if name.strip():
            get_reward_function(name.strip())
    ignored = sorted(n for n in args.explicit if n in _UNUSED)
    if ignored:
        log.warning("grpo.py ignores flags that do not apply to GRPO: %s.", format_flags(ignored))
    return args


@dataclass
class GRPOResult:
    output_dir: str
    summary: dict
    trainer: object


def train(argv: Optional[list[str]] = None) -> GRPOResult:
    return run_grpo(parse(argv))


def main(argv: Optional[list[str]] = None) -> int:
    from common.recipe.cli import run_cli

    return run_cli("grpo.py", lambda: train(argv))


def _text(completion) -> str:
    """GRPO hands conversational completions as message lists."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def _as_list(ids) -> list:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _as_grpo_reward(name: str, fn):
    """Our reward (responses, aliases) -> TRL's reward function (prompts, completions, **columns)."""

    def reward(prompts, completions, aliases, **_):
        return fn([_text(c) for c in completions], aliases)

    reward.__name__ = name  # TRL logs each reward under its function's name
    return reward


def sft_prompt_tokens():
    """TRL's GRPOTrainer whose text prompts are the ids SFT puts before the answer. TRL tokenises
    them with all the tokenizer's special tokens: a BERT-style prompt then ends in [SEP], which
    is also its end-of-answer token. Conversations go through TRL's own chat-template path
    (nothing added), as in SFT."""
    from trl import GRPOTrainer

    from common.evaluation.answers import prompt_ids

    class SFTPromptTokens(GRPOTrainer):
        def _tokenize_prompts(self, prompts: list):
            if not prompts or not isinstance(prompts[0], str):
                return super()._tokenize_prompts(prompts)
            return prompt_ids(self.processing_class, list(prompts), use_chat=False), None, {}

    SFTPromptTokens.__name__ = SFTPromptTokens.__qualname__ = GRPOTrainer.__name__
    return SFTPromptTokens


def run_grpo(args: ParsedArgs) -> GRPOResult:
    from common.data import prompts
    from common.data import qa
    from common.recipe import callbacks as recipe_callbacks
    from common.recipe import config as trainer_config
    from common.recipe import outputs
    from common.recipe import reporting
    from common.recipe import training
    from common.model.source import inherit_from_adapter, resolve_model

    out = outputs.prepare_output_dir(args, default="outputs/grpo")
    source = resolve_model(args.model_id)
    inherit_from_adapter(args, source)
    data = qa.load_qa_data(args, need_eval=False)

    from common.evaluation.answers import prompt_ids
    from common.model.loading import (count_parameters, is_quantized, keep_float32_trainables, load_model, load_tokenizer)
    from common.model.precision import select_precision
    from common.model.adapters import attach_adapter
    from rlhf.rewards import RewardModelScorer, get_reward_function

    precision = select_precision(args)
    tokenizer = load_tokenizer(source, args)
    fmt = prompts.prompt_format(args, tokenizer, data.schema)
    rows = [prompts.chat_messages(q, fmt) if fmt.use_chat else prompts.prompt_text(q, fmt) for q in data.train["question"]]
    lengths = [len(ids) for ids in prompt_ids(tokenizer, [prompts.generation_prompt(q, fmt, tokenizer)
                                                          for q in data.train["question"]], fmt.use_chat)]
    too_long = [i for i, n in enumerate(lengths) if n > args.max_prompt_length]
    if too_long:
        raise UsageError(f"{len(too_long)} prompts of {data.source} are longer than `--max_prompt_length "
                         f"{args.max_prompt_length}` tokens (row {too_long[0]}: {lengths[too_long[0]]}); raise the "
                         f"limit or filter the data.")
    from datasets import Dataset

    train_ds = Dataset.from_dict({"prompt": rows, "aliases": list(data.train["aliases"])})

    model = load_model(source, args, precision, training=True)
    technique = "dora" if args.use_dora else ("qlora" if is_quantized(model) else "lora")
    from transformers import set_seed

    set_seed(args.seed)
    model = attach_adapter(technique, args, model, source)
    # Dropout off (TRL's GRPOConfig leaves it on, and a continued SFT adapter brings its
    # lora_dropout: policy and reference would then differ at step 0), and TRL's sampling follows
    # the policy alone, not the decoding settings of generation_config.json.
    from rlhf.policy_model import disable_dropout, sample_from_the_policy_only

    disable_dropout(model)
    sample_from_the_policy_only(model)
    trainable, total = count_parameters(model)
    log.info("GRPO (%s): %s trainable parameters of %s", technique, f"{trainable:,}", f"{total:,}")

    # Rewards
    names = [n.strip() for n in (args.reward_function or "").split(",") if n.strip()]
    reward_funcs = [_as_grpo_reward(n, get_reward_function(n)) for n in names]
    if args.reward_model:
        import torch

        scorer = RewardModelScorer(args.reward_model, tokenizer, args, "cuda" if torch.cuda.is_available() else "cpu")

        from common.evaluation.answers import stop_token_ids

        stops = set(stop_token_ids(tokenizer)) | set(_as_list(model.generation_config.eos_token_id))

        def reward_model(prompts, completions, completion_ids, **_):
            finished = [bool(ids) and ids[-1] in stops for ids in completion_ids]  # truncated ones have no EOS
            return scorer.score_answers(prompts, [_text(c) for c in completions], finished)

        reward_funcs.append(reward_model)
    weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else None

    from trl import GRPOConfig

    report_to = reporting.setup_reporting(args, out)
    if args.overwrite_output_dir:
        outputs.clear_previous_run(out)
    kwargs = trainer_config.trainer_kwargs(args, out, precision.mode, report_to, has_eval=False)
    kwargs["train_sampling_strategy"] = "random"
    config = GRPOConfig(**kwargs, num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, temperature=args.temperature,
                        beta=args.beta, reward_weights=weights, trust_remote_code=args.trust_remote_code,
                        disable_dropout=True)
    trainer = sft_prompt_tokens()(model=model, reward_funcs=reward_funcs, args=config, train_dataset=train_ds,
                                  processing_class=tokenizer, callbacks=[recipe_callbacks.nan_guard_callback()])
    keep_float32_trainables(trainer.model, precision)  # TRL stores a 4-bit model's adapters in bf16
    metrics, wall = training.train_guarded(trainer, args, out)
    extra = {"model": {"base": source.base, "start_adapter": source.adapter_dir, "precision": precision.mode,
                       "quantized": is_quantized(model)},
             "data": {"source": data.source, "prompts": len(rows), "chat_template": fmt.use_chat},
             "reward": names + (["reward_model"] if args.reward_model else []),
             "parameters": {"trainable": trainable, "total": total}}
    info = training.finish_run(trainer, tokenizer, args, out, "grpo", metrics, wall, extra, report_to,
                         drop_adapters=("ref",))
    return GRPOResult(output_dir=out, summary=info, trainer=trainer)
