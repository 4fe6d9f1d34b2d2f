"""Rewards for PPO: verifiable TriviaQA rewards, or a reward model written by reward_model.py."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from common.args import UsageError
from common.metrics import extract_answer, score

# name -> fn(responses, aliases) -> list of floats. The TriviaQA rewards use the same scorer as
# evaluate.py on the answer as evaluate.py extracts it.
RewardFn = Callable[[Sequence[str], Sequence[Sequence[str]]], list]


def triviaqa_em(responses, aliases) -> list:
    return [score(extract_answer(r), a)["em"] for r, a in zip(responses, aliases)]


def triviaqa_f1(responses, aliases) -> list:
    return [score(extract_answer(r), a)["f1"] for r, a in zip(responses, aliases)]


REWARD_FUNCTIONS: dict[str, RewardFn] = {"triviaqa_em": triviaqa_em, "triviaqa_f1": triviaqa_f1}


def get_reward_function(name: str) -> RewardFn:
    if name not in REWARD_FUNCTIONS:
        raise UsageError(f"`--reward_function {name}` does not exist; choose one of: "
                         f"{', '.join(sorted(REWARD_FUNCTIONS))} (or pass `--reward_model DIR`).")
    return REWARD_FUNCTIONS[name]


class RewardModelScorer:
    """Scores prompt + response texts with a reward model dir from reward_model.py."""

    def __init__(self, path: str, policy_tokenizer, args, device):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from common.model import resolve_model

        source = resolve_model(path)
        if not source.adapter_dir or (source.adapter_config or {}).get("task_type") != "SEQ_CLS":
            raise UsageError(f"`--reward_model` {path}: not a reward model written by reward_model.py "
                             f"(expected an adapter_config.json with task_type SEQ_CLS).")
        tokenizer_dir = source.adapter_dir if os.path.isfile(os.path.join(source.adapter_dir, "tokenizer_config.json")) \
            else source.base
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=args.trust_remote_code)
        if self.tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            raise UsageError(f"`--reward_model` {path} uses another vocabulary than the policy "
                             f"({len(self.tokenizer)} vs {len(policy_tokenizer)} tokens); train the reward model "
                             f"from the same base model family as the policy.")
        from common.model import ensure_pad_token

        ensure_pad_token(self.tokenizer)
        base = AutoModelForSequenceClassification.from_pretrained(
            source.base, num_labels=1, trust_remote_code=args.trust_remote_code, dtype=torch.float32)
        base.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = PeftModel.from_pretrained(base, source.adapter_dir).to(device).eval()
        self.device = device

    def score_answers(self, prompts: Sequence[str], answers: Sequence[str], finished: Sequence[bool]) -> list:
        """Scores answers in the format the reward model was trained on: TRL's RewardTrainer
        appends the EOS token to every (plain-text) prompt + answer, so a finished answer (it ended
        with a stop token; `answers` are decoded without special tokens) is scored with EOS and a
        truncated one without: the reward model can tell them apart, as in training. The score is
        read on the last real token (TRL 0.11's convention for PPO)."""
        eos = self.tokenizer.eos_token or ""
        return self([p + a + (eos if done else "") for p, a, done in zip(prompts, answers, finished)])

    def __call__(self, texts: Sequence[str]) -> list:
        import torch

        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            enc = self.tokenizer(list(texts), return_tensors="pt", padding=True).to(self.device)
        finally:
            self.tokenizer.padding_side = side
        with torch.no_grad():
            return self.model(**enc).logits[:, 0].float().tolist()
