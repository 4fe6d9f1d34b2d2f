"""Batched greedy answering and TriviaQA scoring, shared by evaluate.py and in-training EM."""

from __future__ import annotations

import time
from typing import Optional

from common.data.prompts import PromptFormat, generation_prompt
from common.evaluation.metrics import END_OF_TURN_TOKENS, extract_answer, score


def generate_answers(model, tokenizer, questions: list[str], fmt: PromptFormat, batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers (see common/evaluation/generation.py), each cut by `extract_answer`, in question order."""
    stops = stop_token_ids(tokenizer)
    generated = generate_ids(model, tokenizer, questions, fmt, batch_size, max_new_tokens, progress)
    return [answer_from_ids(tokenizer, ids, stops) for ids in generated]


def generate_ids(model, tokenizer, questions: list[str], fmt: PromptFormat, batch_size: int = 16,
                 max_new_tokens: int = 16, progress: bool = False) -> list[list[int]]:
    """Greedy continuations of the questions' prompts, as token ids up to and including the first
    stop id or newline token: the same tokens as a cache-free greedy decode through the training
    forward, for every technique and batch size."""
    from common.evaluation.generation import greedy_generate, newline_ids

    encoded = prompt_ids(tokenizer, [generation_prompt(q, fmt, tokenizer) for q in questions], fmt.use_chat)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    bar = None
    if progress:
        from common.recipe.progress import progress_bar

        bar = progress_bar(total=len(encoded), desc="Answering", unit="q")
    try:
        return greedy_generate(model, encoded, pad_id=pad, stop_ids=stops, end_ids=newline_ids(tokenizer),
                               batch_size=batch_size, max_new_tokens=max_new_tokens,
                               on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def prompt_ids(tokenizer, prompts: list[str], use_chat: bool) -> list[list[int]]:
    """Prompt texts -> the ids SFT training puts before the answer. A chat template's rendering is
    tokenized with nothing added (it writes its own BOS). Plain text keeps the special tokens the
    tokenizer puts in front (BOS, BERT's [CLS]) but not those it appends ([SEP], an added EOS):
    training tokenizes prompt + answer + EOS, and its prompt is the part that prompt alone shares."""
    if use_chat:
        return tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompts)["input_ids"]
    bare = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    out = []
    for ids, text_ids in zip(full, bare):
        n = len(text_ids)
        at = next((k for k in range(len(ids) - n + 1) if ids[k:k + n] == text_ids), None) if n else None
        out.append(ids[:at + n] if at is not None else ids)
    return out


def answer_from_ids(tokenizer, ids: list[int], stop_ids) -> str:
    """Generated ids -> answer: up to the first stop id, decoded, then `extract_answer`."""
    stops = set(stop_ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return extract_answer(tokenizer.decode(ids[:cut], skip_special_tokens=True))


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end an answer: EOS and the common end-of-turn tokens in the vocabulary."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(vocab[token])
    return sorted(i for i in ids if i is not None)


def evaluate_qa(model, tokenizer, rows, fmt: PromptFormat, batch_size: int = 16, max_new_tokens: int = 16,
                progress: bool = False) -> tuple[dict, list[dict]]:
    """rows: dataset/list with question, aliases (and `weight` for a weighted official file).
    -> (summary metrics, one record per example)."""
    questions = [r["question"] for r in rows]
    aliases = [r["aliases"] for r in rows]
    weights = [r.get("weight") for r in rows]
    start = time.perf_counter()
    predictions = generate_answers(model, tokenizer, questions, fmt, batch_size, max_new_tokens, progress)
    elapsed = time.perf_counter() - start
    records = []
    for q, gold, pred, weight in zip(questions, aliases, predictions, weights):
        s = score(pred, gold)
        records.append({"question": q, "gold_aliases": list(gold), "prediction": pred, **s,
                        **({"weight": weight} if weight is not None else {})})
    return summarize(records, elapsed), records


def summarize(records: list[dict], elapsed: float) -> dict:
    """Means over the official script's ground-truth keys: one per question, except in a Web-domain
    release file, where a question counts once per document (its `weight`). `exact_match` and `f1`
    are fractions (0-1); `exact_match_percent` and `f1_percent` are the official script's figures."""
    n = len(records)
    weights = [r.get("weight", 1) for r in records]
    denominator = sum(weights)
    em = sum(w * r["em"] for w, r in zip(weights, records))
    f1 = sum(w * r["f1"] for w, r in zip(weights, records))
    summary = {
        "n": n,
        "exact_match": em / denominator if denominator else 0.0,
        "f1": f1 / denominator if denominator else 0.0,
        "exact_match_percent": 100.0 * em / denominator if denominator else 0.0,
        "f1_percent": 100.0 * f1 / denominator if denominator else 0.0,
        "time_s": round(elapsed, 2),
        "samples_per_s": round(n / elapsed, 2) if elapsed else None,
    }
    if denominator != n:
        summary["denominator"] = denominator  # question-document pairs, as the official script counts them
    return summary


def gather_records(records: list[dict], elapsed: float, world: int) -> tuple[list[dict], float]:
    """Every process scored rows rank, rank + world, ...: put all of them back in the split's order."""
    from accelerate.utils import gather_object

    parts = gather_object([(records, elapsed)])
    merged: list[Optional[dict]] = [None] * sum(len(part) for part, _ in parts)
    for rank, (part, _) in enumerate(parts):
        for j, record in enumerate(part):
            merged[rank + j * world] = record
    return [r for r in merged if r is not None], max(t for _, t in parts)
