"""TriviaQA scoring, as the official evaluation script (`triviaqa_evaluation.py`) does it:
normalise, then exact match and token F1, each the maximum over all gold aliases."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

# The official script treats these like punctuation: curly single quotes and accents used as quotes.
_PUNCTUATION = set(string.punctuation + "‘’´`")

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Underscores to spaces, lowercase, punctuation to spaces, drop a/an/the, collapse spaces."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split()).strip()


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_aliases(metric, prediction: str, aliases: Iterable[str]) -> float:
    return max((metric(prediction, gold) for gold in aliases), default=0.0)


def score(prediction: str, aliases: Iterable[str]) -> dict[str, float]:
    aliases = list(aliases)
    return {"em": best_over_aliases(exact_match, prediction, aliases),
            "f1": best_over_aliases(f1_score, prediction, aliases)}


# Tokens that end a model's turn. Generation stops at them and at the tokenizer's EOS; a text that
# still shows one (decoded without skipping special tokens) ends there too.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")

_END_TEXTS = ("\n",) + END_OF_TURN_TOKENS + ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def extract_answer(generated: str) -> str:
    """The one answer rule, for evaluation, the in-training EM, the RL rewards and the preference
    data: the generated text up to its first newline or end-of-turn marker, then stripped. Nothing
    is stripped before the cut, so a completion that opens with a newline answers "" (generation
    stops at that newline)."""
    end = len(generated)
    for marker in _END_TEXTS:
        at = generated.find(marker)
        if at != -1:
            end = min(end, at)
    return generated[:end].strip()
