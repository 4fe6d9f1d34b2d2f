"""Function-calling conversations: assistant turns with `tool_calls`, `tool` messages with the
results, and the `tools` a row offers (JSON schemas), rendered by the model's own chat template.

Rows are checked before any model loads; in the dataset each message keeps `tool_calls` as JSON
text (Arrow would otherwise merge every row's argument names into one struct, adding `None`s), and
`for_template` turns a stored message back into what chat templates read. The assistant's tool-call
turns are trained; tool results are part of the prompt, never trained (common.data.masking)."""

from __future__ import annotations

import json
from typing import Any, Optional

from common.flags.errors import UsageError

EXTRA_FIELDS = ("tool_calls", "tool_call_id", "name")


def uses_tools(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def _call(call: Any, where: str, what: str) -> dict:
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise UsageError(f"{where}: {what} is not a {{function: {{name, arguments}}}} tool call; fix or remove "
                         f"that row.")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise UsageError(f"{where}: {what}.arguments is not JSON; fix or remove that row.") from None
    if not isinstance(arguments, dict):
        raise UsageError(f"{where}: {what}.arguments must be a JSON object; fix or remove that row.")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def check_tool_messages(messages: list, where: str, what: str) -> list[dict]:
    """An optional system message, then user turns each answered by the assistant; an assistant turn
    with `tool_calls` is followed by one or more `tool` results and then the assistant again. The
    conversation ends with an assistant turn. -> the messages with `tool_calls` stored as JSON text."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise UsageError(f"{where}: {what}[{i}] is not a {{role, content}} message; fix or remove that row.")
        role, content, calls = m["role"], m.get("content"), m.get("tool_calls")
        if role not in ("system", "user", "assistant", "tool"):
            raise UsageError(f"{where}: {what}[{i}] has role {role!r}; use system, user, assistant or tool.")
        if content is None and role == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise UsageError(f"{where}: {what}[{i}].content is "
                             f"{'missing' if content is None else 'a ' + type(content).__name__ + ', not text'}; "
                             f"fix or remove that row.")
        if calls and role != "assistant":
            raise UsageError(f"{where}: {what}[{i}] is a {role!r} message with `tool_calls`; only the assistant "
                             f"calls tools.")
        if calls is not None and not isinstance(calls, list):
            raise UsageError(f"{where}: {what}[{i}].tool_calls must be a list; fix or remove that row.")
        stored = {"role": role, "content": content,
                  "tool_calls": json.dumps([_call(c, where, f"{what}[{i}].tool_calls[{k}]")
                                            for k, c in enumerate(calls)]) if calls else None,
                  "tool_call_id": m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else None,
                  "name": m.get("name") if isinstance(m.get("name"), str) else None}
        if role == "assistant" and not content.strip() and not calls:
            raise UsageError(f"{where}: the assistant turn {i} is empty; fix or remove that row.")
        out.append(stored)
    _check_order(out, where)
    return out


def _check_order(out: list[dict], where: str) -> None:
    allowed = {"user"}
    for i, m in enumerate(out):
        role = m["role"]
        if role == "system" and i == 0:
            continue
        if role not in allowed:
            expected = " or ".join(repr(r) for r in sorted(allowed))
            raise UsageError(f"{where}: roles out of order: turn {i} is {role!r} where {expected} was expected (a "
                             f"user turn is answered by the assistant; an assistant's tool calls by tool results, "
                             f"then the assistant); fix or remove that row.")
        if role == "user":
            allowed = {"assistant"}
        elif role == "assistant":
            allowed = {"tool"} if m["tool_calls"] else {"user"}
        else:
            allowed = {"tool", "assistant"}
    if out[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the conversation ends with a {out[-1]['role']!r} turn, so there is no "
                         f"assistant reply to train on; end it with the assistant's turn or remove that row.")


def check_tools(tools: Any, where: str) -> Optional[str]:
    """A row's `tools` (a list of JSON schemas, or that list as JSON text) -> JSON text, or None."""
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise UsageError(f"{where}: `tools` is not JSON; fix or remove that row.") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UsageError(f"{where}: `tools` must be a list of function schemas; fix or remove that row.")
    return json.dumps(tools)


def for_template(messages: list[dict]) -> list[dict]:
    """Stored messages -> what chat templates read: fields that are unset are left out (Llama 3.1's
    template treats a message with any `tool_calls` key as a tool call), tool calls parsed."""
    out = []
    for m in messages:
        message = {k: v for k, v in m.items() if v is not None}
        if "tool_calls" in message:
            message["tool_calls"] = json.loads(message["tool_calls"])
        out.append(message)
    return out


def loaded_tools(text: Optional[str]) -> Optional[list]:
    return json.loads(text) if text else None
