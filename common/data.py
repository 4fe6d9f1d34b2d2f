"""Question-answering data: load from the hub, a local file or the bundled sample, detect the
schema, normalise every row to `question` / `answer` / `aliases`, and format prompts.

Every problem with the data is raised as a UsageError naming the file (and the line or row),
before any model is loaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from common import network
from common.args import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED = {"triviaqa-sample": REPO_ROOT / "data" / "triviaqa_sample"}
HUB_ALIASES = {"triviaqa": ("mandarjoshi/trivia_qa", "rc.nocontext")}
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

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


# Split specs ---------------------------------------------------------------------------------

_SPLIT_RE = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(spec: str, flag: str = "dataset_split") -> tuple[str, Optional[str], Optional[str]]:
    match = _SPLIT_RE.match(spec)
    if not match:
        raise UsageError(f"`--{flag}` {spec!r} is not a split; write e.g. `train`, `train[:1000]` or `train[10%:]`.")
    return match.group(1), match.group(2), match.group(3)


def _bound(text: Optional[str], n: int) -> Optional[int]:
    if text is None:
        return None
    if text.endswith("%"):
        return round(n * int(text[:-1]) / 100)
    return int(text)


def select_split(splits: dict, spec: str, source: str, flag: str):
    name, start, end = parse_split(spec, flag)
    if name not in splits:
        raise UsageError(
            f"`--{flag}` {spec!r}: {source} has no split {name!r}; available: {', '.join(sorted(splits))}."
        )
    ds = splits[name]
    n = len(ds)
    lo, hi = _bound(start, n), _bound(end, n)
    if lo is not None or hi is not None:
        ds = ds.select(range(*slice(lo, hi).indices(n)))
    return ds


# Loading -------------------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `owner/name`; anything else with a slash or a data suffix is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix.lower() in LOCAL_SUFFIXES


def resolve_source(dataset_name: str) -> tuple[str, str]:
    """-> (kind, location): kind is 'local' or 'hub'. Raises if a local path is missing."""
    if dataset_name in BUNDLED:
        return "local", str(BUNDLED[dataset_name])
    path = os.path.expanduser(dataset_name)
    if os.path.exists(path):
        return "local", path
    if _looks_like_path(dataset_name):
        raise UsageError(f"`--dataset_name`: {dataset_name!r} not found; give an existing file or directory, "
                         f"`triviaqa-sample` (bundled) or a hub dataset id.")
    return "hub", dataset_name


# Fields read as text. A column that mixes text with numbers is one `datasets` would store as JSON
# text and decode again ("007" -> 7, "true" -> True); such files are read row by row instead.
_TEXT_FIELDS = ("question", "answer", "prompt", "completion", "chosen", "rejected", "Question")


def _scan_jsonl(path: str) -> tuple[Optional[tuple[int, str]], set]:
    """-> (first bad line (number, reason) or None, fields whose scalar types are mixed)."""
    kinds: dict[str, set] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return (number, exc.msg), set()
            if not isinstance(obj, dict):
                return (number, "each line must be a JSON object"), set()
            for key in _TEXT_FIELDS:
                value = obj.get(key)
                if isinstance(value, dict):
                    key, value = f"{key}.value", value.get("value", value.get("Value"))
                if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    kinds.setdefault(key, set()).add(type(value).__name__)  # ints beside floats too
    return None, {k for k, v in kinds.items() if len(v) > 1}


def _stringify(records: list[dict], fields: set) -> list[dict]:
    for rec in records:
        for field in fields:
            outer, _, inner = field.partition(".")
            holder, key = (rec.get(outer), inner) if inner else (rec, outer)
            if isinstance(holder, dict):
                key = key if key in holder else key.capitalize()
                value = holder.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    holder[key] = str(value)
    return records


def _is_json_lines(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = ""
        for line in fh:
            if line.strip():
                first = line
                break
    try:
        return isinstance(json.loads(first), dict) and not _is_whole_document(path, first)
    except json.JSONDecodeError:
        return False


def _is_whole_document(path: str, first_line: str) -> bool:
    # A one-line JSON file holding a dict with a `Data` list is the TriviaQA release format.
    obj = json.loads(first_line)
    return "Data" in obj and isinstance(obj["Data"], list)


def _official_rows(records: list, domain: Any = None, verified: Any = False) -> list[dict]:
    """The `Data` list of a TriviaQA release file -> raw rows, kept and weighted as the official
    evaluation (`triviaqa_evaluation.py` with `utils/dataset_utils.py`) reads the file:
    - a file with `VerifiedEval` true keeps only the questions with `QuestionPartOfVerifiedEval`
      (and, in the Web domain, only their documents with `DocPartOfVerifiedEval`);
    - the official ground truth is a dict keyed by `QuestionId` (Wikipedia) or by
      `QuestionId--Filename` for every document in `EntityPages` + `SearchResults` (Web), and its
      scores are means over those keys. `Weight` is the number of keys a row holds: a Web question
      counts once per document, and a repeated key belongs to its last row."""
    if verified:
        records = [r for r in records if not isinstance(r, dict) or r.get("QuestionPartOfVerifiedEval")]
    web = domain == "Web"
    keys = []
    for i, rec in enumerate(records):
        qid = rec.get("QuestionId") if isinstance(rec, dict) else None
        if not isinstance(qid, (str, int, float)):
            qid = ("row", i)  # the official script needs an id; without one, the row is its own key
        if not web:
            keys.append([qid])
            continue
        pages = []
        for field in ("EntityPages", "SearchResults"):
            found = rec.get(field) if isinstance(rec, dict) else None
            pages += [p for p in found or [] if isinstance(p, dict)
                      and (not verified or p.get("DocPartOfVerifiedEval"))]
        keys.append([f"{qid}--{p.get('Filename')}" for p in pages])
    owner = {key: i for i, row_keys in enumerate(keys) for key in row_keys}  # later rows win, as in a dict
    weights = [0] * len(records)
    for i in owner.values():
        weights[i] += 1
    # Weights are kept only where they change a mean. A Web file that lists no document at all has no
    # official score (the official script divides by zero); it is scored one question per row.
    weighted = any(w != 1 for w in weights) and any(weights)
    rows = []
    for rec, weight in zip(records, weights):
        if not isinstance(rec, dict):
            rows.append({"Question": rec, "QuestionId": None, "Answer": None})
        else:
            rows.append({"Question": rec.get("Question"), "QuestionId": rec.get("QuestionId"),
                         "Answer": rec.get("Answer")})
        if weighted:
            rows[-1]["Weight"] = weight
    return rows


def _load_json_document(path: str) -> dict:
    from datasets import Dataset

    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; save the file as UTF-8 JSON.") from None
    if isinstance(obj, dict) and isinstance(obj.get("Data"), list):
        records = _official_rows(obj["Data"], obj.get("Domain"), obj.get("VerifiedEval"))
    elif isinstance(obj, list):
        records = obj
    elif isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        lengths = {len(v) for v in obj.values()}
        if len(lengths) != 1:
            raise UsageError(f"{path}: the column lists have different lengths {sorted(lengths)}.")
        return {"train": Dataset.from_dict(obj)}
    else:
        raise UsageError(f"{path}: expected a list of records, a TriviaQA `Data` list or JSON lines.")
    if not all(isinstance(r, dict) for r in records):
        bad = next(i for i, r in enumerate(records) if not isinstance(r, dict))
        raise UsageError(f"{path}: record {bad} is not a JSON object.")
    return {"train": _from_records(records, path)}


def _from_records(records: list[dict], path: str):
    from datasets import Dataset

    keys = list(dict.fromkeys(k for r in records for k in r))  # from_list alone keeps the first row's keys
    try:
        return Dataset.from_list([{k: r.get(k) for k in keys} for r in records])
    except Exception as exc:  # arrow cannot unify the row types
        raise UsageError(f"{path}: rows have inconsistent types ({str(exc).splitlines()[0][:200]}).") from None


def _load_jsonl(path: str) -> dict:
    from datasets import load_dataset

    bad, mixed = _scan_jsonl(path)
    if bad:
        raise UsageError(f"{path}: line {bad[0]} is not valid JSON ({bad[1]}); fix or remove that line.")
    if not mixed:
        try:
            return dict(load_dataset("json", data_files={"train": path}))
        except Exception:
            pass  # arrow's schema inference failed (nested types vary across rows): read row by row
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return {"train": _from_records(_stringify(records, mixed | {f for f in _TEXT_FIELDS}), path)}


def _load_local(path: str) -> dict:
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json")):
            loaded = load_from_disk(path)
            return dict(loaded) if isinstance(loaded, DatasetDict) else {"train": loaded}
        files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise UsageError(f"`--dataset_name` {path}: directory holds no .json/.jsonl/.parquet/.csv files "
                             f"and is not a saved dataset.")
        splits: dict = {}
        for file in files:
            split = file.stem.split("-")[0].split(".")[0]
            part = _load_local(str(file))["train"]
            if split in splits:
                from datasets import concatenate_datasets

                part = concatenate_datasets([splits[split], part])
            splits[split] = part
        return splits
    suffix = Path(path).suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise UsageError(f"`--dataset_name` {path}: unsupported file type {suffix!r}; use .json, .jsonl, .parquet "
                         f"or .csv.")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{path}: the file is empty.")
    if suffix == ".jsonl" or (suffix == ".json" and _is_json_lines(path)):
        return _load_jsonl(path)
    if suffix == ".json":
        return _load_json_document(path)
    try:
        return dict(load_dataset(LOCAL_SUFFIXES[suffix], data_files={"train": path}))
    except Exception as exc:
        raise UsageError(f"{path}: could not be read as {suffix[1:]} ({str(exc).splitlines()[0][:200]}).") from None


def _load_hub(name: str, config: Optional[str]) -> dict:
    from datasets import load_dataset

    repo, default_config = HUB_ALIASES.get(name, (name, None))
    try:
        return dict(load_dataset(repo, config or default_config))
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise UsageError(
            f"`--dataset_name {name}`: could not load hub dataset {repo!r} ({first}). Without network, pass a "
            f"local file or directory, `triviaqa-sample`, or set HF_DATASETS_OFFLINE=1 to use a cached copy."
        ) from None


def load_splits(dataset_name: str, dataset_config: Optional[str] = None) -> tuple[dict, str]:
    kind, location = resolve_source(dataset_name)
    if kind == "local":
        return _load_local(location), location
    network.need_hub(f"`--dataset_name {dataset_name}`: not a local file or directory",
                     HUB_ALIASES.get(location, (location,))[0], "dataset")
    return _load_hub(location, dataset_config), f"hub dataset {HUB_ALIASES.get(location, (location,))[0]}"


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
    from common.metrics import normalize_answer

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
    splits, source = loaded or load_splits(args.dataset_name, args.dataset_config)
    train = select_split(splits, args.dataset_split, source, "dataset_split")
    schema = detect_schema(train, source)
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if len(train) == 0:
        raise UsageError(f"`--dataset_split {args.dataset_split}` of {source} is empty; widen the slice.")
    require_answers(train, schema, source, "dataset_split", args.dataset_split, splits)
    train = normalise(train, schema, source, auto_num_proc(args.dataset_num_proc, len(train)))
    eval_ds = None
    spec = args.eval_split
    if spec.lower() == "auto":
        spec = "validation" if ("validation" in splits and need_eval) else "none"
    if need_eval and spec.lower() != "none":
        eval_ds = select_split(splits, spec, source, "eval_split")
        if args.max_eval_samples:
            eval_ds = eval_ds.select(range(min(args.max_eval_samples, len(eval_ds))))
        if len(eval_ds) == 0:
            raise UsageError(f"`--eval_split {spec}` of {source} is empty.")
        eval_schema = detect_schema(eval_ds, source)
        require_answers(eval_ds, eval_schema, source, "eval_split", spec, splits)
        eval_ds = normalise(eval_ds, eval_schema, source, args.dataset_num_proc)
    elif need_eval:
        raise UsageError(f"`--eval_strategy` needs held-out data but {source} has no `validation` split; "
                         f"set `--eval_split` (e.g. `train[-200:]`).")
    return QAData(train=train, eval=eval_ds, schema=schema, source=source)


# Formatting ----------------------------------------------------------------------------------

@dataclass
class PromptFormat:
    template: str = "Question: {question}\nAnswer:"
    use_chat: bool = False
    system_prompt: Optional[str] = None
    raw: bool = False  # prompt-completion data: the prompt is used verbatim


_ESCAPES = re.compile(r"\\([\\nt])")


def unescape(text: str) -> str:
    r"""`\n` and `\t` typed as two characters (on a command line, in a single-quoted YAML string)
    become a newline and a tab, `\\` one backslash; anything else stays as typed. The flags keep what
    was typed (so does run_config.json): this runs once, where the prompt format is built."""
    return _ESCAPES.sub(lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def check_template_flag(args, tokenizer) -> bool:
    """-> whether the tokenizer has a chat template; `--use_chat_template true` needs one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.use_chat_template == "true" and not has_template:
        raise UsageError("`--use_chat_template true`: the tokenizer has no chat template; use `auto` or `false`.")
    return has_template


def prompt_format(args, tokenizer, schema: str) -> PromptFormat:
    choice = args.use_chat_template
    has_template = check_template_flag(args, tokenizer)
    use_chat = has_template if choice == "auto" else choice == "true"
    system = args.system_prompt if args.system_prompt and args.system_prompt.lower() != "none" else None
    return PromptFormat(template=unescape(args.prompt_template), use_chat=use_chat,
                        system_prompt=unescape(system) if system else None, raw=schema == "prompt-completion")


def chat_messages(question: str, fmt: PromptFormat) -> list[dict]:
    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    return messages + [{"role": "user", "content": question}]


def prompt_text(question: str, fmt: PromptFormat) -> str:
    return question if fmt.raw else fmt.template.replace("{question}", question)


def sft_example(question: str, answer: str, fmt: PromptFormat) -> dict:
    """The prompt/completion pair TRL trains on (EOS is appended by the trainer)."""
    if fmt.use_chat:
        return {"prompt": chat_messages(question, fmt),
                "completion": [{"role": "assistant", "content": answer}]}
    if fmt.raw:
        return {"prompt": question, "completion": answer}
    return {"prompt": prompt_text(question, fmt), "completion": " " + answer}


def generation_prompt(question: str, fmt: PromptFormat, tokenizer) -> str:
    """The exact text a model sees at inference, matching training."""
    if fmt.use_chat:
        return tokenizer.apply_chat_template(chat_messages(question, fmt), tokenize=False, add_generation_prompt=True)
    return prompt_text(question, fmt)


def to_sft_dataset(ds, fmt: PromptFormat, num_proc: Optional[int] = None):
    def convert(batch: dict) -> dict:
        rows = [sft_example(q, a, fmt) for q, a in zip(batch["question"], batch["answer"])]
        return {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}

    return ds.map(convert, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="Formatting")


def auto_num_proc(requested: Optional[int], rows: int) -> Optional[int]:
    """--dataset_num_proc, or all cores (up to 8) for datasets big enough to repay the worker start-up."""
    if requested:
        return requested
    return min(os.cpu_count() or 1, 8) if rows >= 20_000 else None
