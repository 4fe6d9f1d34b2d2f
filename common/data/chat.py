"""Your own data for SFT: conversations (`messages`, ShareGPT), Alpaca instructions and plain text.

Each row becomes a list of {role, content} messages (or, for `text`, one string), checked before
any model is loaded: a row that fits no format, an empty assistant turn, or roles out of order
stop the run with one line naming the file, the row and the problem.

Masking (common.data.masking): each assistant reply is trained, with its end-of-turn token, on
the tokens inference sees; the prompt tokens are not. `--system_message fold|drop` handles a
template that refuses a system message (common.data.templates).

A tokenizer without a chat template gets PLAIN_RENDERING (see `plain_template`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from common.data import masking, tools
from common.data.templates import render, say_plain, with_system_mode
from common.flags.errors import UsageError

log = logging.getLogger("finetune")


FORMATS = {
    "messages": "`messages`: list of {`role`, `content`} (system/user/assistant)",
    "sharegpt": "ShareGPT `conversations`: list of {`from`, `value`} (system/human/gpt)",
    "alpaca": "Alpaca `instruction` + optional `input` + `output` (optional `system`)",
    "text": "plain `text` (loss on every token)",
}

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_format(columns) -> Optional[str]:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols and not ({"question", "prompt", "chosen"} & cols):
        return "text"
    return None


# Rows -> messages ----------------------------------------------------------------------------

def _content(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise UsageError(f"{where}: {what} is {kind}; fix or remove that row.")
    return value


def check_messages(messages: Any, where: str, what: str = "`messages`", with_tools: bool = False) -> list[dict]:
    """An optional system message, then user and assistant turns alternating, ending with the
    assistant; every assistant turn non-empty. -> the messages as plain {role, content} dicts.
    `with_tools`: function-calling conversations are accepted too (common.data.tools)."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: {what} must be a non-empty list of {{role, content}} messages; "
                         f"fix or remove that row.")
    if with_tools and tools.uses_tools(messages):
        return tools.check_tool_messages(messages, where, what)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UsageError(f"{where}: {what}[{i}] is not a {{role, content}} message; fix or remove that row.")
        role = m["role"]
        content = _content(m["content"], f"{what}[{i}].content", where)
        if role not in ("system", "user", "assistant"):
            also = " (tool roles: SFT conversation data in the `messages` format)" if role == "tool" else ""
            raise UsageError(f"{where}: {what}[{i}] has role {role!r}; use system, user or assistant{also}.")
        out.append({"role": role, "content": content})
    expected = "user"
    for i, m in enumerate(out):
        if m["role"] == "system":
            if i != 0:
                raise UsageError(f"{where}: roles out of order: a system message at turn {i} (only the first "
                                 f"message may be the system's); fix or remove that row.")
            continue
        if m["role"] != expected:
            raise UsageError(f"{where}: roles out of order: turn {i} is {m['role']!r} where {expected!r} was "
                             f"expected (user and assistant alternate, starting with the user); fix or remove "
                             f"that row.")
        if m["role"] == "assistant" and not m["content"].strip():
            raise UsageError(f"{where}: the assistant turn {i} is empty; fix or remove that row.")
        expected = "assistant" if expected == "user" else "user"
    if out[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the conversation ends with a {out[-1]['role']!r} turn, so there is no "
                         f"assistant reply to train on; end it with the assistant's turn or remove that row.")
    return out


def row_messages(row: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "messages":
        return check_messages(row.get("messages"), where, with_tools=True)
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise UsageError(f"{where}: `conversations` must be a non-empty list of {{from, value}} turns; "
                             f"fix or remove that row.")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise UsageError(f"{where}: `conversations`[{i}] is not a {{from, value}} turn; fix or remove "
                                 f"that row.")
            role = SHAREGPT_ROLES.get(t["from"])
            if role is None:
                raise UsageError(f"{where}: `conversations`[{i}] is from {t['from']!r}; use system, human or gpt.")
            messages.append({"role": role, "content": t["value"]})
        return check_messages(messages, where, "`conversations`")
    if fmt == "alpaca":
        instruction = _content(row.get("instruction"), "`instruction`", where)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise UsageError(f"{where}: `input` is a {type(extra).__name__}, not text; fix or remove that row.")
        if not instruction.strip():
            raise UsageError(f"{where}: `instruction` is empty; fix or remove that row.")
        output = _content(row.get("output"), "`output`", where)
        if not output.strip():
            raise UsageError(f"{where}: `output` (the assistant turn) is empty; fix or remove that row.")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        system = row.get("system")
        messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
        return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise ValueError(fmt)


def row_text(row: dict, where: str) -> str:
    text = _content(row.get("text"), "`text`", where)
    if not text.strip():
        raise UsageError(f"{where}: `text` is empty; fix or remove that row.")
    return text


def normalise(ds, fmt: str, source: str, num_proc: Optional[int] = None):
    """Dataset in a conversation format -> Dataset(messages); `text` -> Dataset(text). Function-calling
    data (`messages` with tool calls or tool results, or a `tools` column) keeps those fields too."""
    from datasets import Features, List, Value

    calls = fmt == "messages" and uses_tools(ds)

    def convert(batch: dict, indices: list[int]) -> dict:
        keys = list(batch)
        out, offered = [], []
        for i, idx in enumerate(indices):
            row = {k: batch[k][i] for k in keys}
            where = f"{source}: row {idx}"
            if fmt == "text":
                out.append(row_text(row, where))
                continue
            messages = row_messages(row, fmt, where)
            if calls:
                messages = [{**{f: None for f in tools.EXTRA_FIELDS}, **m} for m in messages]
                offered.append(tools.check_tools(row.get("tools"), where))
            out.append(messages)
        return {"text": out} if fmt == "text" else {"messages": out, **({"tools": offered} if calls else {})}

    if fmt == "text":
        features = Features({"text": Value("string")})
    elif calls:
        message = {"role": Value("string"), "content": Value("string"),
                   **{f: Value("string") for f in tools.EXTRA_FIELDS}}
        features = Features({"messages": List(message), "tools": Value("string")})
    else:
        features = Features({"messages": List({"role": Value("string"), "content": Value("string")})})
    return ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
                  num_proc=num_proc, desc="Reading rows")


def uses_tools(ds) -> bool:
    """Whether `messages` data calls tools: a `tools` column, tool-call fields, or a `tool` role (read
    from the Arrow column, without turning rows into Python objects)."""
    import pyarrow.compute as pc

    if "tools" in ds.column_names:
        return True
    inner = getattr(ds.features.get("messages"), "feature", None)
    if isinstance(inner, dict) and "tool_calls" in inner:
        return True
    if not isinstance(inner, dict):  # messages of mixed shapes, kept as JSON values
        return any(tools.uses_tools(m) for m in ds["messages"])
    try:
        roles = pc.struct_field(pc.list_flatten(ds.data.column("messages")), "role")
        return bool(pc.any(pc.equal(roles, "tool")).as_py())
    except (KeyError, TypeError, ValueError, NotImplementedError):  # not a list of {role, ...}: rows say why
        return False


# Loading -------------------------------------------------------------------------------------

def resolve_format(ds, requested: str, source: str, flag: str = "dataset_format") -> Optional[str]:
    """-> a conversation/text format, or None for question-answer data (common.data's schemas)."""
    from common.data.qa import SCHEMAS

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return detect_format(ds.column_names)
    if requested in SCHEMAS:
        return None
    if requested not in FORMATS:
        raise UsageError(f"`--{flag} {requested}` is unknown; use auto, {', '.join(FORMATS)} or "
                         f"{', '.join(SCHEMAS)}.")
    needed = {"messages": ["messages"], "sharegpt": ["conversations"], "alpaca": ["instruction", "output"],
              "text": ["text"]}[requested]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise UsageError(f"`--{flag} {requested}`: {source} has no {', '.join(f'`{c}`' for c in missing)} column "
                         f"(columns: {', '.join(sorted(ds.column_names))}).")
    return requested


def load_sft_data(args, need_eval: bool):
    """Like common.data.qa.load_qa_data, for every SFT format: conversation and text data are read
    here, question-answer data by load_qa_data. -> QAData (rows are `messages` or `text` for the
    formats of this module)."""
    from common.data import prompts, qa, sources

    splits, source = sources.load_splits(args.dataset_name, args.dataset_config)
    train = sources.take_rows(splits, args.dataset_split, source, "dataset_split", args.max_train_samples)
    fmt = resolve_format(train, getattr(args, "dataset_format", "auto"), source)
    if fmt is None:
        try:
            qa.detect_schema(train, source)
        except UsageError:
            accepted = "; ".join(list(FORMATS.values()) + list(qa.SCHEMAS.values()))
            raise UsageError(f"{source}: row 0 has the columns {sorted(train.column_names)}, which fit no format. "
                             f"Accepted: {accepted}.") from None
        if (getattr(args, "dataset_format", "auto") or "auto").lower() not in ("auto",):
            forced = args.dataset_format.lower()
            if forced != qa.detect_schema(train, source):
                raise UsageError(f"`--dataset_format {forced}`: {source} has the columns of "
                                 f"{qa.detect_schema(train, source)!r}, not of {forced!r}.")
        return qa.load_qa_data(args, need_eval, loaded=(splits, source))
    train = normalise(train, fmt, source, prompts.auto_num_proc(args.dataset_num_proc, len(train)))
    eval_ds = None
    spec = sources.heldout_spec(args, splits, source, required=True) if need_eval else None
    if spec is not None:
        eval_ds = sources.take_rows(splits, spec, source, "eval_split", args.max_eval_samples)
        eval_ds = normalise(eval_ds, resolve_format(eval_ds, fmt, source, "eval_split"), source,
                            args.dataset_num_proc)
    return qa.QAData(train=train, eval=eval_ds, schema=fmt, source=source)


# Tokenizing ----------------------------------------------------------------------------------

def tokenize_text(tokenizer, text: str) -> dict:
    """Language modelling: the tokenizer's own special tokens plus EOS, every token trained."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def tokenized_dataset(ds, tokenizer, turns: str = "all", num_proc: Optional[int] = None, system_mode: str = "keep"):
    """Dataset(messages) or Dataset(text) -> Dataset(input_ids, labels), which SFTTrainer takes as
    it is (length grouping reads `input_ids`)."""
    if not tokenizer.is_fast:
        raise UsageError("conversation data needs a fast tokenizer (character offsets); this model's tokenizer "
                         "is a slow one.")
    text = "text" in ds.column_names
    eot = masking.end_of_turn(tokenizer)

    def convert(batch: dict) -> dict:
        if text:
            rows = [tokenize_text(tokenizer, t) for t in batch["text"]]
        else:
            offered = batch.get("tools") or [None] * len(batch["messages"])
            rows = [r for m, t in zip(batch["messages"], offered) for r in masking.conversation_rows(
                tokenizer, with_system_mode(tools.for_template(m), system_mode), turns, eot=eot,
                tools=tools.loaded_tools(t))]
        return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}

    if not text and len(ds):  # a template that refuses the data says so before the map starts
        masking.conversation_rows(tokenizer, with_system_mode(tools.for_template(ds[0]["messages"]), system_mode),
                                  turns, eot=eot, tools=tools.loaded_tools(ds[0].get("tools")))
    out = ds.map(convert, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="Tokenizing")
    if not text and len(out) > len(ds):
        log.info("the chat template renders the prompt of an assistant turn differently once the turn is "
                 "answered (Mistral v0.3 writes the system prompt into the last user turn only): each assistant "
                 "turn of a conversation is a row of its own, with its prompt as inference renders it (%d rows).",
                 len(out))
    return out


@dataclass
class Sample:
    prompt: str
    reference: str
    add_special_tokens: bool = False  # a rendered conversation carries its own; a text prefix does not


def heldout_prompts(ds, tokenizer, n: int = 5, system_mode: str = "keep") -> list[Sample]:
    """Prompts for sample generations: the conversation up to its last assistant turn (with the
    generation prompt), or the first half of a text's words."""
    out = []
    for row in ds.select(range(min(n, len(ds)))):
        if "messages" in row:
            messages = with_system_mode(tools.for_template(row["messages"]), system_mode)
            out.append(Sample(render(tokenizer, messages[:-1], add_generation_prompt=True,
                                     tools=tools.loaded_tools(row.get("tools"))), messages[-1]["content"]))
        else:
            words = row["text"].split(" ")
            half = max(1, len(words) // 2)
            out.append(Sample(" ".join(words[:half]), " " + " ".join(words[half:]), add_special_tokens=True))
    return out


def sft_dataset_builder(args, tokenizer):
    """-> fn(dataset, num_proc) for sft/run.py. `--use_chat_template false` renders conversations
    as plain text even where the tokenizer has a template (the saved tokenizer then has none, so
    later runs from the adapter use the same rendering)."""
    apply_template_flag(args, tokenizer)
    say_plain(tokenizer, args.model_id)
    return lambda ds, num_proc: tokenized_dataset(ds, tokenizer, args.assistant_turns, num_proc,
                                                         args.system_message)


def apply_template_flag(args, tokenizer) -> None:
    """`--use_chat_template` for conversation data (SFT messages, message-list preference pairs):
    `false` drops the tokenizer's template, so conversations get the plain rendering and the saved
    tokenizer has none (later runs from the output, and PPO's reward-model scoring, render the same
    way); `true` needs a template."""
    from common.data.prompts import check_template_flag

    if check_template_flag(args, tokenizer) and args.use_chat_template == "false":
        tokenizer.chat_template = None
