"""Loading raw splits: the bundled sample, local files (JSON, JSONL, Parquet, CSV, the official
TriviaQA JSON) and hub datasets, with split slices."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from common.flags.errors import UsageError, first_line
from common.hub import network

REPO_ROOT = Path(__file__).resolve().parents[2]

BUNDLED = {"triviaqa-sample": REPO_ROOT / "data" / "triviaqa_sample"}

HUB_ALIASES = {"triviaqa": ("mandarjoshi/trivia_qa", "rc.nocontext")}

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


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


def take_rows(splits: dict, spec: str, source: str, flag: str, limit: Optional[int] = None):
    """The rows of `--dataset_split` or `--eval_split`: sliced, cut to --max_*_samples, never empty."""
    ds = select_split(splits, spec, source, flag)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise UsageError(f"`--{flag} {spec}` of {source} is empty; widen the slice.")
    return ds


def heldout_spec(args, splits: dict, source: str, required: bool) -> Optional[str]:
    """The one rule for `--eval_split`, for every kind of data and every script: a split name or
    slice; `none`; or `auto`, `validation` where the data has one and none otherwise. A run that
    needs held-out data (`required`) and finds none stops here."""
    spec = args.eval_split.strip()
    if spec.lower() == "auto":
        spec = "validation" if "validation" in splits else "none"
    if spec.lower() != "none":
        return spec
    if required:
        raise UsageError(f"`--eval_strategy` needs held-out data but {source} has no `validation` split; "
                         f"set `--eval_split` (e.g. `train[-200:]`).")
    return None


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


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value; quote it as text or write a number")


def require_utf8(path: str) -> None:
    """Text data files are read as UTF-8; a file that is not names its first bad line and byte."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{path}: line {number} is not UTF-8 text (byte {exc.start + 1} of the line, "
                                 f"0x{line[exc.start]:02x}); save the file as UTF-8.") from None


def _scan_jsonl(path: str) -> tuple[Optional[tuple[int, str]], set]:
    """-> (first bad line (number, reason) or None, fields whose scalar types are mixed)."""
    kinds: dict[str, set] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_refuse_constant)
            except json.JSONDecodeError as exc:
                return (number, exc.msg), set()
            except ValueError as exc:
                return (number, str(exc)), set()
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


def _is_whole_document(path: str, line: str) -> bool:
    # A one-line JSON file holding a dict with a `Data` list is the TriviaQA release format.
    obj = json.loads(line)
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
            obj = json.load(fh, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from None
    except ValueError as exc:  # NaN, Infinity
        raise UsageError(f"{path}: not valid JSON: {exc}.") from None
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
        raise UsageError(f"{path}: rows have inconsistent types ({first_line(exc)}).") from None


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
    if suffix != ".parquet":
        require_utf8(path)
    if suffix == ".jsonl" or (suffix == ".json" and _is_json_lines(path)):
        return _load_jsonl(path)
    if suffix == ".json":
        return _load_json_document(path)
    try:
        return dict(load_dataset(LOCAL_SUFFIXES[suffix], data_files={"train": path}))
    except Exception as exc:
        raise UsageError(f"{path}: could not be read as {suffix[1:]} ({root_cause(exc)}).") from None


def root_cause(exc: BaseException) -> str:
    """The first line of the innermost error: `datasets` wraps the parser's own message (the line and
    what is wrong there) in "An error occurred while generating the dataset"."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return (text.splitlines()[0][:300] if text else type(exc).__name__)


def _load_hub(name: str, config: Optional[str]) -> dict:
    from datasets import load_dataset

    repo, default_config = HUB_ALIASES.get(name, (name, None))
    try:
        return dict(load_dataset(repo, config or default_config))
    except Exception as exc:
        first = first_line(exc, 300)
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
