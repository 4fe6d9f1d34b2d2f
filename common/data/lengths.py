"""What `--max_seq_length` does to SFT rows, said before the model loads: TRL truncates every longer
example without a word, and silently drops those whose prompt alone fills the length (no answer
token is left to train on), failing with an IndexError when none is left."""

from __future__ import annotations

import logging

from common.flags.errors import UsageError

log = logging.getLogger("finetune")

_CHUNK = 1000


def _texts(prompt, completion, tokenizer) -> tuple[str, str]:
    """(prompt, prompt + completion) as the text the tokenizer sees."""
    if isinstance(prompt, list):  # chat messages
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return head, tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    return prompt, prompt + completion


def token_lengths(rows, tokenizer) -> list[tuple[int, int]]:
    """(prompt tokens, prompt + answer tokens + EOS) of each prompt/completion row."""
    out = []
    for start in range(0, len(rows), _CHUNK):
        batch = rows[start:start + _CHUNK]
        pairs = [_texts(p, c, tokenizer) for p, c in zip(batch["prompt"], batch["completion"])]
        heads = tokenizer([p for p, _ in pairs])["input_ids"]
        fulls = tokenizer([f for _, f in pairs])["input_ids"]
        out.extend((len(h), len(f) + 1) for h, f in zip(heads, fulls))
    return out


def fit_to_length(rows, tokenizer, max_length: int, source: str, flag: str = "dataset_split"):
    """Drops the rows whose prompt leaves no room for an answer, and says in one line each how many
    were dropped and how many will be truncated; stops when no row is left. -> the rows kept."""
    lengths = token_lengths(rows, tokenizer)
    keep = [i for i, (prompt, _) in enumerate(lengths) if prompt < max_length]
    truncated = sum(1 for i in keep if lengths[i][1] > max_length)
    dropped = len(rows) - len(keep)
    if not keep:
        shortest = min(p for p, _ in lengths)
        raise UsageError(f"`--max_seq_length {max_length}`: all {len(rows)} rows of `--{flag}` ({source}) would be "
                         f"dropped: every prompt fills it (the shortest is {shortest} tokens), leaving no answer "
                         f"token to train on; raise `--max_seq_length` above {shortest}.")
    if dropped:
        log.warning("%s: %d of %d rows dropped: their prompt fills `--max_seq_length %d` and leaves no answer token "
                    "to train on (the longest prompt is %d tokens).", source, dropped, len(rows), max_length,
                    max(p for p, _ in lengths))
        rows = rows.select(keep)
    if truncated:
        log.warning("%s: %d of %d rows truncated to `--max_seq_length %d`: the end of their answer is cut off and "
                    "never trained on.", source, truncated, len(rows), max_length)
    return rows


def fit_tokenized(rows, max_length: int, source: str, flag: str = "dataset_split"):
    """fit_to_length for rows already tokenised and masked (conversations, questions under a chat
    template: `input_ids` and `labels`): a row is dropped when no trained token lies within the first
    `max_length` tokens, and truncated when some lie beyond them. -> the rows kept."""
    keep, truncated = [], 0
    for i, labels in enumerate(rows["labels"]):
        trained = [k for k, t in enumerate(labels) if t != -100]
        if not trained or trained[0] >= max_length:
            continue
        keep.append(i)
        truncated += trained[-1] >= max_length
    if not keep:
        raise UsageError(f"`--max_seq_length {max_length}`: all {len(rows)} rows of `--{flag}` ({source}) would be "
                         f"dropped: none has a trained token within the first {max_length} tokens; raise "
                         f"`--max_seq_length`.")
    if len(keep) < len(rows):
        log.warning("%s: %d of %d rows dropped: no trained token lies within their first `--max_seq_length %d` "
                    "tokens.", source, len(rows) - len(keep), len(rows), max_length)
        rows = rows.select(keep)
    if truncated:
        log.warning("%s: %d of %d rows truncated to `--max_seq_length %d`: the end of what they train is cut off "
                    "and never trained on.", source, truncated, len(rows), max_length)
    return rows
