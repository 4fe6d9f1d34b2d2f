"""GRPO (TRL's GRPOTrainer) with LoRA/QLoRA on the prompts ppo.py uses, rewarded by the same
TriviaQA rewards (several, weighted) and/or a reward model from reward_model.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from common.flags.groups import (DataArguments, GRPOArguments, LoraArguments, ModelArguments, QuantizationArguments,
                                 TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags import checks
from common.flags.checks import check_common, check_grpo
from common.recipe import pipeline as recipe
from common.recipe.pipeline import Run, Steps

log = logging.getLogger("finetune")

ARG_GROUPS = [ModelArguments, QuantizationArguments, DataArguments, LoraArguments, GRPOArguments, TrainingArguments]
UNUSED_FLAGS = ("completion_only_loss", "packing", "padding_free", "eval_em_samples", "max_seq_length",
                "neftune_noise_alpha")


def make_parser() -> FlagParser:
    return FlagParser(ARG_GROUPS, hidden=UNUSED_FLAGS, prog="grpo.py",
                      defaults={"learning_rate": 1e-4, "logging_steps": 1, "per_device_train_batch_size": 8},
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
    checks.warn_ignored(args, UNUSED_FLAGS, "GRPO")
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

    return run_cli("grpo.py", lambda: train(argv), detach=True)


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


class GRPOSteps(Steps):
    """GRPO: the prompts ppo.py uses, rewarded by TriviaQA rewards and/or a reward model."""

    name, title = "grpo", "GRPO"
    drop_adapters = ("ref",)
    labelled_positions_only = False

    def load_data(self, run: Run) -> None:
        from common.data import qa

        run.data = qa.load_qa_data(run.args, need_eval=False)

    def prepare(self, run: Run) -> None:
        from datasets import Dataset

        from common.data import prompts
        from rlhf.policy_model import rl_prompts

        data, fmt = run.data, run.fmt
        rl_prompts(run.args, data, fmt, run.tokenizer)  # stops on a prompt over --max_prompt_length
        # TRL renders and tokenises them itself (sft_prompt_tokens: the same ids)
        texts = [prompts.chat_messages(q, fmt) if fmt.use_chat else prompts.prompt_text(q, fmt)
                 for q in data.train["question"]]
        run.train_rows = Dataset.from_dict({"prompt": texts, "aliases": list(data.train["aliases"])})

    def config(self, run: Run, kwargs: dict):
        from trl import GRPOConfig

        args = run.args
        kwargs["train_sampling_strategy"] = "random"
        weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else None
        return GRPOConfig(**kwargs, num_generations=args.num_generations,
                          max_completion_length=args.max_completion_length, temperature=args.temperature,
                          beta=args.beta, reward_weights=weights, trust_remote_code=args.trust_remote_code,
                          disable_dropout=True)

    def after_model(self, run: Run) -> None:
        # Dropout off (TRL's GRPOConfig leaves it on, and a continued SFT adapter brings its
        # lora_dropout: policy and reference would then differ at step 0), and TRL's sampling follows
        # the policy alone, not the decoding settings of generation_config.json.
        from rlhf.policy_model import disable_dropout, sample_from_the_policy_only

        disable_dropout(run.model)
        sample_from_the_policy_only(run.model)
        from common.recipe.dist import loaded_whole

        with loaded_whole(getattr(run.config, "deepspeed_plugin", None)):  # a --reward_model, under ZeRO-3
            self.reward_funcs = reward_functions(run.args, run.tokenizer, run.model)

    def trainer(self, run: Run, callbacks: list):
        return sft_prompt_tokens()(model=run.model, reward_funcs=self.reward_funcs, args=run.config,
                                   train_dataset=run.train_rows, processing_class=run.tokenizer, callbacks=callbacks)

    def record(self, run: Run) -> dict:
        names = reward_names(run.args)
        return {"data": {"source": run.data.source, "prompts": len(run.train_rows), "chat_template": run.fmt.use_chat},
                "reward": names + (["reward_model"] if run.args.reward_model else [])}


def reward_names(args) -> list[str]:
    return [n.strip() for n in (args.reward_function or "").split(",") if n.strip()]


def reward_functions(args, tokenizer, model) -> list:
    """--reward_function (several, in order) and then --reward_model, as TRL's reward functions."""
    from rlhf.rewards import RewardModelScorer, get_reward_function

    funcs = [_as_grpo_reward(n, get_reward_function(n)) for n in reward_names(args)]
    if args.reward_model:
        import torch

        from common.evaluation.answers import stop_token_ids

        scorer = RewardModelScorer(args.reward_model, tokenizer, args, "cuda" if torch.cuda.is_available() else "cpu")
        stops = set(stop_token_ids(tokenizer)) | set(_as_list(model.generation_config.eos_token_id))

        def reward_model(prompts, completions, completion_ids, **_):
            finished = [bool(ids) and ids[-1] in stops for ids in completion_ids]  # truncated ones have no EOS
            return scorer.score_answers(prompts, [_text(c) for c in completions], finished)

        funcs.append(reward_model)
    return funcs


def run_grpo(args: ParsedArgs) -> GRPOResult:
    run, info = recipe.train(GRPOSteps(), args)
    return GRPOResult(output_dir=run.out, summary=info, trainer=run.trainer)
