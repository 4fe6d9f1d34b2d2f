"""Preference pairs (prompt, chosen, rejected) for DPO, ORPO and the reward model.

Sources: any dataset with `prompt`/`chosen`/`rejected` columns (text or conversational
messages), or question-answer data (TriviaQA and friends) turned into pairs: chosen is the gold
answer, rejected comes from `--rejected_source`:
  - `other`: another question's answer, picked reproducibly from `--seed`;
  - `model`: the starting model's own greedy answer where it is wrong by exact match (questions
    it already gets right are skipped).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Optional

from common.flags.errors import UsageError
from common.data.prompts import PromptFormat, chat_messages, prompt_text
from common.data.templates import render, with_system_mode
from common.data.qa import detect_schema, normalise, require_answers
from common.data.sources import heldout_spec, load_splits, take_rows
from common.evaluation.metrics import normalize_answer

log = logging.getLogger("finetune")

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceSource:
    """Raw rows for one split: either ready pairs or QA rows still to be paired."""

    rows: Any  # datasets.Dataset
    kind: str  # "pairs" | "qa"
    schema: str
    source: str
    ties: int = 0  # implicit-prompt pairs whose chosen equals rejected, already dropped from `rows`


# `--dataset_format` values for preference data, besides `auto` and the question-answer schemas
# (common.data.qa.SCHEMAS) that pairs are built from.
PREFERENCE_FORMATS = {
    "preference": "`prompt` + `chosen` + `rejected` (text or messages)",
    "implicit-prompt": "`chosen` + `rejected` only, the prompt being their shared beginning (Anthropic HH, "
                       "message lists)",
    "unpaired": "`prompt` + `completion` + `label` (KTO feedback)",
}


def load_preference_data(args, need_eval: bool, required: bool):
    """-> (training source, held-out source or None), from one load of the data; the held-out split
    follows the rule every script shares (common.data.sources.heldout_spec)."""
    splits, source = load_splits(args.dataset_name, args.dataset_config)
    train = read_preference_rows(args, splits, source, args.dataset_split, "dataset_split")
    spec = heldout_spec(args, splits, source, required) if need_eval else None
    return train, (read_preference_rows(args, splits, source, spec, "eval_split") if spec else None)


def require_pairs(sources, script: str) -> None:
    """Only kto.py trains on unpaired feedback; the others stop here, before any model loads."""
    for src in sources:
        if src is not None and src.kind == "unpaired":
            raise UsageError(f"{src.source}: prompt/completion/label rows are unpaired feedback, which only kto.py "
                             f"takes; {script} needs prompt/chosen/rejected pairs.")


def read_preference_rows(args, splits: dict, source: str, split_spec: str, flag: str) -> PreferenceSource:
    limit = args.max_train_samples if flag == "dataset_split" else args.max_eval_samples
    ds = take_rows(splits, split_spec, source, flag, limit)
    cols = set(ds.column_names)
    if {"prompt", "completion", "label"} <= cols:  # unpaired feedback (KTO)
        _check_format(args, "unpaired", source, cols)
        check_unpaired(ds, source)
        return PreferenceSource(ds, "unpaired", "unpaired", source)
    # Ready pairs are checked here, before any model loads; ties are dropped with a count.
    if {"chosen", "rejected"} <= cols and "prompt" not in cols:  # implicit prompt (Anthropic HH, message lists)
        from rlhf.pref_formats import implicit_prompt_pairs

        _check_format(args, "implicit-prompt", source, cols)
        pairs, ties = implicit_prompt_pairs(ds, source)
        checked = check_pairs(pairs, source)
        return PreferenceSource(checked, "pairs", "implicit-prompt", source, ties + len(pairs) - len(checked))
    if "chosen" in cols or "rejected" in cols:
        missing = [c for c in PAIR_COLUMNS if c not in cols]
        if missing:
            raise UsageError(f"{source}: preference data needs {', '.join(PAIR_COLUMNS)} columns; "
                             f"missing {', '.join(missing)}.")
        _check_format(args, "preference", source, cols)
        checked = check_pairs(ds, source)
        return PreferenceSource(checked, "pairs", "preference", source, len(ds) - len(checked))
    try:
        schema = detect_schema(ds, source)
    except UsageError:
        raise UsageError(f"{source}: columns {sorted(cols)} are neither preference pairs (`prompt`, `chosen`, "
                         f"`rejected`; or `chosen` + `rejected` sharing their prompt) nor question-answer data to "
                         f"build pairs from (`question` + `answer`).") from None
    _check_format(args, schema, source, cols)
    if schema == "prompt-completion":
        raise UsageError(f"{source}: `prompt`/`completion` rows have no rejected answer; give `prompt`/`chosen`/"
                         f"`rejected` columns or question-answer data to build pairs from.")
    require_answers(ds, schema, source, flag, split_spec, splits)
    return PreferenceSource(normalise(ds, schema, source, args.dataset_num_proc), "qa", schema, source)


def _check_format(args, found: str, source: str, cols) -> None:
    """`--dataset_format` on preference data must name the shape its columns hold (or be `auto`)."""
    from common.data.chat import FORMATS as SFT_FORMATS
    from common.data.qa import SCHEMAS

    requested = (getattr(args, "dataset_format", None) or "auto").strip().lower()
    if requested in ("auto", found):
        return
    accepted = f"auto, {', '.join(PREFERENCE_FORMATS)} or a question-answer schema ({', '.join(SCHEMAS)})"
    if requested in SFT_FORMATS:
        raise UsageError(f"`--dataset_format {requested}` is an SFT format; preference data is read as {accepted}.")
    if requested not in PREFERENCE_FORMATS and requested not in SCHEMAS:
        raise UsageError(f"`--dataset_format {requested}` is unknown; use {accepted}.")
    raise UsageError(f"`--dataset_format {requested}`: {source} has the columns of {found!r} "
                     f"({', '.join(sorted(cols))}), not of {requested!r}; use `auto` or fix the data.")


# Checking ready-made pairs ---------------------------------------------------------------------

def _message_problem(value: Any, col: str) -> Optional[str]:
    """What is wrong with a message list (None if nothing): each message a {role, content} with text
    content; some content non-empty."""
    if not isinstance(value, list) or not value:
        return f"`{col}` must be non-empty text or a list of {{role, content}} messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"`{col}`[{i}] is not a {{role, content}} message"
        if not isinstance(m["content"], str):
            kind = "missing (null)" if m["content"] is None else f"a {type(m['content']).__name__}, not text"
            return f"`{col}`[{i}].content is {kind}"
    if not any(m["content"].strip() for m in value):
        return f"`{col}` has only empty messages"
    return None


def check_feedback_text(value: Any, col: str, where: str) -> None:
    """A prompt or answer: non-empty text or a well-formed message list."""
    if isinstance(value, str):
        if not value.strip():
            raise UsageError(f"{where}: `{col}` must be non-empty text or a list of {{role, content}} messages; "
                             f"it is empty. Fix or remove that row.")
        return
    problem = _message_problem(value, col)
    if problem:
        raise UsageError(f"{where}: {problem}; fix or remove that row.")


def check_unpaired(ds, source: str) -> None:
    """KTO's prompt/completion/label rows, checked before any model loads."""
    for idx, row in enumerate(ds):
        for col in ("prompt", "completion"):
            check_feedback_text(row[col], col, f"{source}: row {idx}")
        if not isinstance(row["label"], bool):
            raise UsageError(f"{source}: row {idx}: `label` must be true or false.")


def check_pairs(ds, source: str):
    """Rejects malformed pairs with the row named; drops rows whose chosen equals rejected."""
    same = 0
    for idx, row in enumerate(ds):
        for col in PAIR_COLUMNS:
            check_feedback_text(row[col], col, f"{source}: row {idx}")
        same += row["chosen"] == row["rejected"]
    if same == len(ds):
        raise UsageError(f"{source}: `chosen` equals `rejected` in every row; there is no preference to learn.")
    if same:
        log.warning("%s: dropped %d pairs whose chosen equals rejected.", source, same)
        ds = ds.filter(lambda r: r["chosen"] != r["rejected"], desc="Dropping ties")
    return ds


# Building pairs from question-answer rows ------------------------------------------------------

def _answer_text(answer: str, fmt: PromptFormat):
    if fmt.use_chat:
        return [{"role": "assistant", "content": answer}]
    return answer if fmt.raw else " " + answer


def _prompt(question: str, fmt: PromptFormat):
    return chat_messages(question, fmt) if fmt.use_chat else prompt_text(question, fmt)


def other_answers(rows, seed: int, pool=None) -> list[Optional[str]]:
    """For each row, the answer of another question that matches none of this row's aliases, drawn
    from `rows` themselves or, if given, from the rows of `pool`."""
    answers = list((rows if pool is None else pool)["answer"])
    aliases = [{normalize_answer(a) for a in al} for al in rows["aliases"]]
    rng = random.Random(seed)
    out: list[Optional[str]] = []
    n = len(answers)
    for i in range(len(aliases)):
        pick = None
        for _ in range(20):
            j = rng.randrange(n)
            if (pool is not None or j != i) and normalize_answer(answers[j]) not in aliases[i]:
                pick = answers[j]
                break
        out.append(pick)
    return out


def model_answers(model, tokenizer, rows, fmt: PromptFormat, batch_size: int) -> list[Optional[str]]:
    """The model's own greedy answers where they are wrong; None where it is right (skipped)."""
    from common.evaluation.answers import generate_answers
    from common.evaluation.metrics import exact_match
    from common.recipe.dist import is_main_process

    predictions = generate_answers(model, tokenizer, list(rows["question"]), fmt, batch_size=batch_size,
                                   progress=is_main_process())  # one bar, not one per process
    out: list[Optional[str]] = []
    for pred, aliases in zip(predictions, rows["aliases"]):
        wrong = pred.strip() and not any(exact_match(pred, a) for a in aliases)
        out.append(pred if wrong else None)
    return out


def build_pairs(rows, fmt: PromptFormat, rejected: list[Optional[str]], source: str, how: str):
    from datasets import Dataset

    pairs = {"prompt": [], "chosen": [], "rejected": []}
    skipped = 0
    for question, answer, bad in zip(rows["question"], rows["answer"], rejected):
        if bad is None:
            skipped += 1
            continue
        pairs["prompt"].append(_prompt(question, fmt))
        pairs["chosen"].append(_answer_text(answer, fmt))
        pairs["rejected"].append(_answer_text(bad, fmt))
    built = len(pairs["prompt"])
    reason = "the model already answers them correctly" if how == "model" else "no distinct answer to pick"
    log.info("preference pairs from %s: built %d, skipped %d%s.", source, built, skipped,
             f" ({reason})" if skipped else "")
    if built == 0:
        raise UsageError(f"{source}: no preference pairs left after filtering ({skipped} skipped: {reason}); "
                         f"try `--rejected_source other` or more data.")
    return Dataset.from_dict(pairs), {"built": built, "skipped": skipped}


def limit_prompt_length(ds, tokenizer, max_prompt_length: Optional[int], source: str, system_mode: str = "keep"):
    """Text prompts longer than --max_prompt_length keep their last tokens (the question sits at the
    end); conversational prompts that long are dropped, with a count."""
    if not max_prompt_length:
        return ds
    dropped = 0

    def fit(batch):
        nonlocal dropped
        keep = {k: [] for k in batch}
        for i, prompt in enumerate(batch["prompt"]):
            if isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if len(ids) > max_prompt_length:
                    prompt = tokenizer.decode(ids[-max_prompt_length:])
            else:
                text = render(tokenizer, with_system_mode(list(prompt), system_mode), add_generation_prompt=True)
                if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_length:
                    dropped += 1
                    continue
            for k in batch:
                keep[k].append(prompt if k == "prompt" else batch[k][i])
        return keep

    ds = ds.map(fit, batched=True, desc="Limiting prompt length")
    if dropped:
        log.warning("%s: dropped %d conversational pairs longer than `--max_prompt_length %d`.", source, dropped,
                    max_prompt_length)
    if len(ds) == 0:
        raise UsageError(f"{source}: every prompt is longer than `--max_prompt_length {max_prompt_length}`; raise it.")
    return ds


def preference_dataset(src: PreferenceSource, fmt: PromptFormat, how: str, seed: int, model=None,
                       tokenizer=None, batch_size: int = 32, pool=None):
    """-> (Dataset of pairs, stats). `pool`: the rows `--rejected_source other` draws from (default:
    the source's own rows)."""
    if src.kind == "pairs":  # checked as they were read (read_preference_rows)
        return src.rows, {"built": len(src.rows), "skipped": src.ties}
    if how == "other":
        rejected = other_answers(src.rows, seed, pool)
    else:
        rejected = model_answers(model, tokenizer, src.rows, fmt, batch_size)
    return build_pairs(src.rows, fmt, rejected, src.source, how)


def unpaired_dataset(src: PreferenceSource, pairs):
    """KTO's unpaired feedback: (prompt, completion, label). From pairs: chosen is desirable and
    rejected undesirable; prompt/completion/label data is used as it is."""
    from datasets import Dataset

    if src.kind == "unpaired":  # checked as they were read (check_unpaired)
        labels = set(src.rows["label"])
        if len(labels) < 2:
            log.warning("%s: every example is %s; KTO learns best from both kinds.", src.source,
                        "desirable" if True in labels else "undesirable")
        return src.rows.select_columns(["prompt", "completion", "label"])
    rows = {"prompt": [], "completion": [], "label": []}
    for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        rows["prompt"] += [p, p]
        rows["completion"] += [c, r]
        rows["label"] += [True, False]
    return Dataset.from_dict(rows)


# KTO's class balance ---------------------------------------------------------------------------

# The KTO paper (Ethayarajh et al. 2024, eq. 8) recommends
# desirable_weight * n_desirable / (undesirable_weight * n_undesirable) within [1, 4/3].
KTO_RATIO = (1.0, 4 / 3)


def kto_counts(labels) -> dict:
    desirable = sum(bool(label) for label in labels)
    return {"desirable": desirable, "undesirable": len(labels) - desirable}


def kto_rebalanced_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight), one of them 1, that bring the ratio just above 1."""
    from fractions import Fraction

    if desirable < undesirable:  # round up: the ratio stays >= 1 and, by < 1%, above it
        return math.ceil(Fraction(100 * undesirable, desirable)) / 100, 1.0
    return 1.0, math.floor(Fraction(100 * desirable, undesirable)) / 100


def balance_kto(args, counts: dict) -> None:
    """Unbalanced beyond the paper's range: with neither weight flag given, set the weights that
    rebalance the examples and say so in one line; with either given, keep them and warn."""
    n_d, n_u = counts["desirable"], counts["undesirable"]
    if not n_d or not n_u:
        return  # one kind only: nothing to balance (unpaired_dataset has warned)
    ratio = args.desirable_weight * n_d / (args.undesirable_weight * n_u)
    if KTO_RATIO[0] <= ratio <= KTO_RATIO[1]:
        return
    dw, uw = kto_rebalanced_weights(n_d, n_u)
    given = {"desirable_weight", "undesirable_weight"} & set(args.explicit)
    if given:
        log.warning("KTO: %d desirable and %d undesirable examples with `--desirable_weight %g --undesirable_weight "
                    "%g` give a ratio of %.2f, outside the [1, 4/3] the KTO paper recommends; "
                    "`--desirable_weight %g --undesirable_weight %g` would rebalance them.", n_d, n_u,
                    args.desirable_weight, args.undesirable_weight, ratio, dw, uw)
        return
    args.set("desirable_weight", dw)
    args.set("undesirable_weight", uw)
    log.warning("KTO: %d desirable and %d undesirable examples: training with `--desirable_weight %g "
                "--undesirable_weight %g` to rebalance them (the KTO paper's ratio range [1, 4/3]); pass either "
                "flag to choose the weights yourself.", n_d, n_u, dw, uw)


class _DropTrlBalanceWarning(logging.Filter):
    """balance_kto has said it in one line; TRL's own multi-line advice would repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("You have different amounts of desirable")


def quiet_trl_balance_warning() -> None:
    trl_log = logging.getLogger("trl.trainer.kto_trainer")
    if not any(isinstance(f, _DropTrlBalanceWarning) for f in trl_log.filters):
        trl_log.addFilter(_DropTrlBalanceWarning())
