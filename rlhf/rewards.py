"""Rewards for PPO: verifiable TriviaQA rewards, or a reward model written by reward_model.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Sequence

from common.flags.errors import UsageError
from common.evaluation.metrics import extract_answer, score

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


def _trained_quantization(source, device):
    """The BitsAndBytesConfig the reward model's run loaded its base with (run_config.json), or None."""
    from types import SimpleNamespace

    from common.model.precision import Precision, get_quantization_config
    from common.model.source import saved_run_config

    trained = saved_run_config(source)
    flags = trained.get("flags", {})
    if not (flags.get("load_in_4bit") or flags.get("load_in_8bit")):
        return None
    mode = trained.get("model", {}).get("precision", "fp32")
    # bf16 on a CPU was autocast over float32 weights; the 4-bit matmuls then ran in float32.
    precision = Precision(mode if str(device).startswith("cuda") else "fp32")
    return get_quantization_config(SimpleNamespace(
        load_in_4bit=bool(flags.get("load_in_4bit")), load_in_8bit=bool(flags.get("load_in_8bit")),
        bnb_4bit_quant_type=flags.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=bool(flags.get("bnb_4bit_use_double_quant", True)),
        bnb_4bit_compute_dtype=flags.get("bnb_4bit_compute_dtype", "auto")), precision)


def score_at_last_token(model) -> None:
    """Reads a sequence-classification model's score at each row's last attended token.

    transformers reads it at the last token that is not the pad token. Where the tokenizer has no pad
    token of its own (GPT-2, Pythia), the pad token is EOS, so a finished answer's closing EOS was
    skipped and "Paris" + EOS scored exactly as "Paris" cut off. The attention mask says where each
    row ends whatever the pad token is; reward_model.py trains and ppo.py/grpo.py score through this."""
    import torch

    names = [name for name, _ in model.named_modules() if name.split(".")[-1] in ("score", "classifier")]
    if not names:
        raise UsageError(f"{type(model).__name__} has no `score` head to read rewards from.")
    head = model.get_submodule(names[0])
    pooled = model.get_submodule(names[0].rpartition(".")[0])  # the model that pools the head's output
    seen = []

    def keep(_module, _args, output):
        seen.append(output)

    def pool(_module, args, kwargs, output):
        scores = seen.pop()
        seen.clear()
        if scores.dim() != 3:  # a head on a pooled summary (BERT's [CLS]), not on every token: nothing to pick
            return output
        mask = kwargs.get("attention_mask")
        rows = torch.arange(scores.shape[0], device=scores.device)
        if mask is None:
            last = torch.full_like(rows, scores.shape[1] - 1)
        else:
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (positions * mask.to(positions.dtype)).argmax(-1).to(scores.device)
        output.logits = scores[rows, last]
        return output

    head.register_forward_hook(keep)
    pooled.register_forward_hook(pool, with_kwargs=True)


class RewardModelScorer:
    """Scores prompt + response texts with a reward model dir from reward_model.py."""

    def __init__(self, path: str, policy_tokenizer, args, device):
        import torch
        from transformers import AutoModelForSequenceClassification

        from common.model.loading import load_adapter

        from common.model.loading import load_tokenizer
        from common.model.source import resolve_model

        source = resolve_model(path, flag="reward_model")
        if not source.adapter_dir or (source.adapter_config or {}).get("task_type") != "SEQ_CLS":
            raise UsageError(f"`--reward_model` {path}: not a reward model written by reward_model.py "
                             f"(expected an adapter_config.json with task_type SEQ_CLS).")
        # As reward_model.py loaded it (its EOS and pad token), from the reward model's dir.
        self.tokenizer = load_tokenizer(source, SimpleNamespace(model_id=path, revision=None,
                                                                trust_remote_code=args.trust_remote_code))
        if self.tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            raise UsageError(f"`--reward_model` {path} uses another vocabulary than the policy "
                             f"({len(self.tokenizer)} vs {len(policy_tokenizer)} tokens); train the reward model "
                             f"from the same base model family as the policy.")
        # The base is loaded as the reward model was trained (4-bit stays 4-bit): its adapter and head
        # learned on those weights, and score differently on others.
        quant = _trained_quantization(source, device)
        base = AutoModelForSequenceClassification.from_pretrained(
            source.base, num_labels=1, trust_remote_code=args.trust_remote_code, dtype=torch.float32,
            quantization_config=quant, device_map={"": str(device)} if quant is not None else None)
        base.config.pad_token_id = self.tokenizer.pad_token_id
        model = load_adapter(base, source.adapter_dir, "`--reward_model`")
        score_at_last_token(model)
        self.model = (model if quant is not None else model.to(device)).eval()
        self.device = device

    def score_answers(self, prompts: Sequence, answers: Sequence[str], finished: Sequence[bool]) -> list:
        """Scores answers on the ids reward_model.py trained on (rlhf.pair_tokens.sft_ids, SFT's ids
        for prompt + answer): a finished answer (it ended with a stop token; `answers` are decoded
        without special tokens) with its EOS or end of turn, a truncated one without, so that the
        reward model can tell them apart. The score is read on the last real token (TRL 0.11's
        convention for PPO).

        A prompt is text, or a conversation (a message list): reward_model.py rendered those with
        its own tokenizer's template (the plain `User: ... Assistant:` rendering where that has
        none), so they are rendered so here, not with the policy's template."""
        from common.data.masking import end_of_turn
        from rlhf.pair_tokens import sft_ids

        eot = end_of_turn(self.tokenizer)
        return self.score_ids([sft_ids(self.tokenizer, p if isinstance(p, str) else list(p), a, done, eot)
                               for p, a, done in zip(prompts, answers, finished)])

    def __call__(self, texts: Sequence[str]) -> list:
        """Scores texts as the tokenizer encodes them (with its own special tokens)."""
        return self.score_ids([self.tokenizer(t)["input_ids"] for t in texts])

    def score_ids(self, ids: Sequence[Sequence[int]]) -> list:
        import torch

        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            enc = self.tokenizer.pad({"input_ids": [list(i) for i in ids]}, return_tensors="pt").to(self.device)
        finally:
            self.tokenizer.padding_side = side
        with torch.no_grad():
            return self.model(**enc).logits[:, 0].float().tolist()
