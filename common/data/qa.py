"""Question-answer data: detect the schema and normalise every row to `question` / `answer` /
`aliases`. Every problem with the data is a UsageError naming the file (and the line or row),
raised before any model is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from common.data.prompts import auto_num_proc
from common.data import sources
from common.data.sources import heldout_spec, parse_split, take_rows
from common.flags.errors import UsageError

SCHEMAS = {
    "triviaqa": "hub TriviaQA: `question` + `answer` {`value`, `aliases`}",
    "triviaqa-official": "TriviaQA release JSON: `Data` list of {`Question`, `Answer` {`Value`, `Aliases`}}",
    "qa": "flat `question` + `answer` (optional `aliases` list)",
    "prompt-completion": "`prompt` + `completion`",
    "qa-answers": "`question` + `answers` (SQuAD `{text: [...]}` or a list; optional `context`)",
}


@dataclass
class QAData:
    train: Any  # datasets.Dataset with question / answer / aliases
    eval: Any  # same, or None
    schema: str
    source: str


# Schemas -------------------------------------------------------------------------------------

def detect_schema(ds, source: str) -> str:
    cols = set(ds.column_names)
    if {"question", "answer"} <= cols:
        return "triviaqa" if len(ds) and isinstance(ds[0]["answer"], dict) else "qa"
    if {"question", "answers"} <= cols:
        return "qa-answers"
    if {"Question", "Answer"} <= cols:
        return "triviaqa-official"
    if {"prompt", "completion"} <= cols:
        return "prompt-completion"
    accepted = "; ".join(SCHEMAS.values())
    raise UsageError(f"{source}: columns {sorted(cols)} match no known schema. Accepted: {accepted}.")


def _text(value: Any, what: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        kind = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise UsageError(f"{where}: `{what}` is {kind}; fix or remove that row.")
    if isinstance(value, float) and not math.isfinite(value):  # a Parquet/CSV NaN would train on "nan"
        raise UsageError(f"{where}: `{what}` is {value}, not text; fix or remove that row.")
    text = str(value).strip()
    if not text:
        raise UsageError(f"{where}: `{what}` is empty; fix or remove that row.")
    return text


def _aliases(value: Any, answer: str, what: str, where: str) -> list[str]:
    out = [answer]
    for item in _strings(value, what, where):
        if item.strip() and item.strip() not in out:
            out.append(item.strip())
    return out


def _strings(value: Any, what: str, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{where}: `{what}` must be a list of strings.")
    for item in value:
        if not isinstance(item, str):
            raise UsageError(f"{where}: `{what}` must be a list of strings (found {type(item).__name__}).")
    return list(value)


# What the hub's TriviaQA builder writes where a split has no public answers (the test split).
PLACEHOLDER_ANSWERS = {"<unk>"}


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in PLACEHOLDER_ANSWERS


def _is_answerless(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or _is_placeholder(value)


def _triviaqa_answers(answer: dict, names: dict, where: str) -> tuple[str, list[str]]:
    """A TriviaQA answer object -> (answer to train on, strings to score against).

    The official script scores against `NormalizedAliases` plus the normalised `HumanAnswers`; the
    value and the raw aliases count only where a file has no normalised aliases."""
    from common.evaluation.metrics import normalize_answer

    field = lambda key: f"{names['prefix']}.{names[key]}"  # noqa: E731
    raw_value = answer.get(names["value"])
    normalized = _strings(answer.get(names["normalized_aliases"]), field("normalized_aliases"), where)
    human_key = next((k for k in names["human"] if answer.get(k) is not None), names["human"][0])
    human = _strings(answer.get(human_key), f"{names['prefix']}.{human_key}", where)
    aliases = _strings(answer.get(names["aliases"]), field("aliases"), where)
    value = _refuse_placeholder(_text(raw_value, field("value"), where), field("value"), where)
    if normalized:
        truths = normalized + [normalize_answer(h) for h in human]
    else:
        truths = _aliases(aliases + [h for h in human if h.strip()], value, field("aliases"), where)
    return value, list(dict.fromkeys(truths))


_HUB_NAMES = {"prefix": "answer", "value": "value", "aliases": "aliases", "normalized_aliases": "normalized_aliases",
              "human": ("human_answers", "normalized_human_answers")}

_OFFICIAL_NAMES = {"prefix": "Answer", "value": "Value", "aliases": "Aliases",
                   "normalized_aliases": "NormalizedAliases", "human": ("HumanAnswers",)}


def _refuse_placeholder(value: str, what: str, where: str) -> str:
    if _is_placeholder(value):
        raise UsageError(f"{where}: no answer (`{what}` is the placeholder {value!r}); fix or remove that row.")
    return value


def normalise_row(row: dict, schema: str, where: str) -> dict:
    """One raw row -> {question, answer, aliases} (+ `weight` for a weighted official file), where
    `aliases` are the strings a prediction is scored against. Raises UsageError naming the problem."""
    if schema == "prompt-completion":
        prompt = row.get("prompt")
        completion = row.get("completion")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{where}: `prompt` is {'empty' if isinstance(prompt, str) else 'not text'}; "
                             f"fix or remove that row.")
        if not isinstance(completion, str) or not completion.strip():
            raise UsageError(f"{where}: `completion` is {'empty' if isinstance(completion, str) else 'not text'}; "
                             f"fix or remove that row.")
        _refuse_placeholder(completion, "completion", where)
        return {"question": prompt, "answer": completion, "aliases": [completion.strip()]}
    if schema == "qa-answers":
        return _answers_row(row, where)
    if schema == "triviaqa-official":
        question = _text(row.get("Question"), "Question", where)
        answer = row.get("Answer")
        if answer is None:
            raise UsageError(f"{where}: no `Answer`; fix or remove that row.")
        if not isinstance(answer, dict):
            raise UsageError(f"{where}: `Answer` must be an object with `Value` and `Aliases`.")
        value, truths = _triviaqa_answers(answer, _OFFICIAL_NAMES, where)
        out = {"question": question, "answer": value, "aliases": truths}
        if row.get("Weight") is not None:
            out["weight"] = row["Weight"]
        return out
    question = _text(row.get("question"), "question", where)
    answer = row.get("answer")
    if isinstance(answer, dict):  # hub TriviaQA
        value, truths = _triviaqa_answers(answer, _HUB_NAMES, where)
        return {"question": question, "answer": value, "aliases": truths}
    value = _refuse_placeholder(_text(answer, "answer", where), "answer", where)
    return {"question": question, "answer": value, "aliases": _aliases(row.get("aliases"), value, "aliases", where)}


def _answer_list(value: Any) -> list:
    """SQuAD's `answers: {text: [...], answer_start: [...]}` or a plain list -> the list of answers."""
    if isinstance(value, dict):
        value = value.get("text")
    return list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])


def _answers_row(row: dict, where: str) -> dict:
    """`question` + a list of reference answers: trained on the first, scored against all (EM/F1 as
    for TriviaQA aliases). A `context` passage goes before the question."""
    question = _text(row.get("question"), "question", where)
    context = row.get("context")
    if isinstance(context, str) and context.strip():
        question = f"{context.strip()}\n\n{question}"
    answers = [a.strip() for a in _strings(_answer_list(row.get("answers")), "answers", where) if a.strip()]
    if not answers or _is_placeholder(answers[0]):
        raise UsageError(f"{where}: `answers` holds no answer; fix or remove that row.")
    return {"question": question, "answer": answers[0], "aliases": list(dict.fromkeys(answers))}


def has_answer(row: dict, schema: str) -> bool:
    """False where a row's answer is missing, empty or a placeholder (a split without public
    answers); anything else, malformed rows included, is left to normalise_row to judge."""
    if schema == "prompt-completion":
        return not _is_answerless(row.get("completion"))
    if schema == "qa-answers":
        return any(not _is_answerless(a) for a in _answer_list(row.get("answers")))
    answer = row.get("Answer" if schema == "triviaqa-official" else "answer")
    if isinstance(answer, dict):
        answer = answer.get(_OFFICIAL_NAMES["value"] if schema == "triviaqa-official" else _HUB_NAMES["value"])
    return not _is_answerless(answer)


def require_answers(ds, schema: str, source: str, flag: str, spec: str, splits: dict) -> None:
    """Refuses a split in which no row has an answer (the hub TriviaQA `test` split: every value is
    '<unk>'), instead of scoring or training every prediction against a placeholder."""
    for row in ds:
        if has_answer(row, schema):
            return
    name = parse_split(spec, flag)[0]
    fix = (f"use `--{flag} validation`" if "validation" in splits and name != "validation"
           else "give a split or file with answers")
    why = "; TriviaQA's test answers are not public" if "trivia_qa" in source else ""
    raise UsageError(f"`--{flag} {spec}` of {source} has no answers (every answer is missing or the placeholder "
                     f"'<unk>'{why}), so there is nothing to score or train on; {fix}.")


def normalise(ds, schema: str, source: str, num_proc: Optional[int] = None):
    """Dataset of any accepted schema -> Dataset(question, answer, aliases), cached by `datasets`."""

    weighted = schema == "triviaqa-official" and "Weight" in ds.column_names  # see _official_rows

    def convert(batch: dict, indices: list[int]) -> dict:
        keys = list(batch)
        out: dict[str, list] = {"question": [], "answer": [], "aliases": [], **({"weight": []} if weighted else {})}
        for i, idx in enumerate(indices):
            row = {k: batch[k][i] for k in keys}
            norm = normalise_row(row, schema, f"{source}: row {idx}")
            for k in out:
                out[k].append(norm[k])
        return out

    from datasets import Features, List, Value

    # Declared, because `map` otherwise casts a column it rewrites back to its old type: the text
    # "8" of a numeric `answer` column would be 8 again and crash prompt formatting.
    features = Features({"question": Value("string"), "answer": Value("string"), "aliases": List(Value("string")),
                         **({"weight": Value("int64")} if weighted else {})})
    return ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
                  num_proc=num_proc, desc="Reading rows")


def load_qa_data(args, need_eval: bool, loaded: Optional[tuple] = None) -> QAData:
    """Loads, slices and normalises the train split and, where asked, the held-out split. `loaded`:
    (splits, source) from a `load_splits` call already made (one hub check, one load)."""
    splits, source = loaded or sources.load_splits(args.dataset_name, args.dataset_config)
    train = take_rows(splits, args.dataset_split, source, "dataset_split", args.max_train_samples)
    schema = detect_schema(train, source)
    require_answers(train, schema, source, "dataset_split", args.dataset_split, splits)
    train = normalise(train, schema, source, auto_num_proc(args.dataset_num_proc, len(train)))
    eval_ds = None
    spec = heldout_spec(args, splits, source, required=True) if need_eval else None
    if spec is not None:
        eval_ds = take_rows(splits, spec, source, "eval_split", args.max_eval_samples)
        eval_schema = detect_schema(eval_ds, source)
        require_answers(eval_ds, eval_schema, source, "eval_split", spec, splits)
        eval_ds = normalise(eval_ds, eval_schema, source, args.dataset_num_proc)
    return QAData(train=train, eval=eval_ds, schema=schema, source=source)
