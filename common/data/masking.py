"""Assistant-only labels for a conversation, on the tokens inference sees.

The rule, for every chat template (it does not need a template to render turns as prefixes of the
whole, which Phi-3, Qwen3 and Mistral v0.3 with a system message do not):

1. Render the whole conversation once. Each assistant reply is found in it by rendering the
   conversation again with that reply replaced by a sentinel: the text before the sentinel and the
   text after it are the same in both renderings, so the reply lies between them (whatever the
   template does to the reply's text, such as trimming it).
2. A reply is trained from the end of its generation prompt (the conversation before it rendered
   with `add_generation_prompt=True`, which is what a model is given at inference) through the
   reply and the end-of-turn token after it (`<|eot_id|>`, `<|im_end|>`, `<|end|>`,
   `<end_of_turn>`, `</s>`: what the template writes after a reply, read once per tokenizer by
   end_of_turn; whitespace allowed before it).
   What a template writes between the generation prompt and the reply (Qwen3's empty think block,
   Mistral's space) is generated at inference, so it is trained too. Nothing after the last trained
   token is kept (Phi-3's closing `<|endoftext|>` is never trained).
3. Where a turn's generation prompt is not the start of the whole rendering (Mistral v0.3 writes the
   system prompt into the last user turn only, so a conversation that ends with the assistant has
   none), each assistant turn becomes a row of its own: its generation prompt, then what the
   template writes for the reply and its end of turn.

Characters become tokens through the tokenizer's offsets: a token is trained when it starts inside
a trained span."""

from __future__ import annotations

import logging
from typing import Optional

from common.data.templates import render
from common.flags.errors import UsageError

log = logging.getLogger("finetune")

SENTINEL = "\u2063\u2063reply-here\u2063\u2063"
PREVIOUS = "\u2063\u2063turn-before\u2063\u2063"
CALLED = "zqxcalledfunctionzqx"  # a tool call's function name: templates write it as it is, in JSON too
THINK_END = "</think>"


def _marked(messages: list[dict], marks: dict) -> list[dict]:
    return [{**m, "content": marks[k]} if k in marks else m for k, m in enumerate(messages)]


def _calls(message: dict) -> list:
    return message.get("tool_calls") or []


def _mark_call(messages: list[dict], i: int) -> list[dict]:
    """Assistant turn i with its last tool call's function name replaced by CALLED. (A tool-call turn
    is located by the name, not by its text, which is often empty: templates write `content` and the
    calls differently when `content` is empty.)"""
    calls = list(_calls(messages[i]))
    last = calls[-1]
    calls[-1] = {**last, "function": {**last["function"], "name": CALLED}}
    return [{**m, "tool_calls": calls} if k == i else m for k, m in enumerate(messages)]


def _unlocatable(what: str) -> UsageError:
    return UsageError(f"the chat template {what}, so the assistant's tokens cannot be located; use "
                      f"`--use_chat_template false` for the plain-text rendering.")


def _mark(messages: list[dict], i: int) -> tuple[list[dict], str]:
    """-> (messages with assistant turn i marked, the mark): its text replaced by SENTINEL, or for a
    tool-call turn its last call's name by CALLED."""
    if _calls(messages[i]):
        return _mark_call(messages, i), CALLED
    content = messages[i]["content"]
    if THINK_END in content:  # keep the reasoning: a template that splits it off (Qwen3) renders it apart
        return _marked(messages, {i: content[:content.rindex(THINK_END) + len(THINK_END)] + SENTINEL}), SENTINEL
    return _marked(messages, {i: SENTINEL}), SENTINEL


def reply_bounds(tokenizer, messages: list[dict], i: int, text: str, tools=None) -> tuple[int, int]:
    """-> [start, end) of assistant message i's text in `text` (the rendering of `messages`); for a
    tool-call turn, of its last call's function name."""
    marked, mark = _mark(messages, i)
    head, found, tail = render(tokenizer, marked, tools=tools).partition(mark)
    if not found and mark == CALLED:
        raise UsageError("the model's chat template does not write an assistant's `tool_calls` (Llama 3.1, Qwen 2.5, "
                         "Qwen3 and Mistral v0.3 templates do); train a model whose template renders tool calls, or "
                         "leave the function-calling rows out.")
    if not found or mark in tail or not (text.startswith(head) and text.endswith(tail)) \
            or len(head) + len(tail) > len(text):
        raise _unlocatable("renders a reply's text in a way that changes the rest of the conversation")
    return len(head), len(text) - len(tail)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def end_of_turn(tokenizer, tools=None) -> str:
    """The text the template closes an assistant reply with (`<|eot_id|>`, `<|im_end|>`, `<|end|>`,
    `<end_of_turn>`, `</s>`), read from a one-turn conversation: what follows the reply, up to the
    first whitespace, or its first token where that is one of the tokenizer's added tokens (Phi-3
    writes `<|end|>` then, at the very end, `<|endoftext|>`, which generation never reaches).
    Empty where the template writes nothing after a reply."""
    text = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}],
                  tools=tools)
    after = text.partition(SENTINEL)[2].lstrip()
    chunk = after.split(maxsplit=1)[0] if after.strip() else ""
    ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
    if ids and ids[0] in tokenizer.added_tokens_decoder:
        return tokenizer.decode(ids[:1])
    return chunk


def _turn_end(text: str, reply_end: int, eot: str, calls: bool = False) -> int:
    """-> the character where the reply's turn ends: after its end-of-turn text (whitespace allowed
    before it), or at the reply's end where the template writes none. After a tool call's name the
    call's own text runs on to it."""
    if not eot:
        return reply_end
    if calls:
        at = text.find(eot, reply_end)
        return at + len(eot) if at >= 0 else reply_end
    rest = text[reply_end:]
    skip = len(rest) - len(rest.lstrip())
    return reply_end + skip + len(eot) if rest[skip:].startswith(eot) else reply_end


def _labels(ids, offsets, spans) -> tuple[list[int], list[int]]:
    labels = [ids[k] if end > start and any(s <= start < e for s, e in spans) else -100
              for k, (start, end) in enumerate(offsets)]
    last = max((k for k, t in enumerate(labels) if t != -100), default=len(ids) - 1)
    return list(ids[:last + 1]), labels[:last + 1]


def _turns(messages: list[dict], turns: str) -> list[int]:
    at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return at[-1:] if turns == "last" else at


def conversation_rows(tokenizer, messages: list[dict], turns: str = "all", finished: bool = True,
                      eot: Optional[str] = None, tools=None) -> list[dict]:
    """-> [{input_ids, labels}]: one row, or one per assistant turn (rule 3 of the module doc).
    `finished=False`: the last reply was cut off, so its turn has no end-of-turn token. `tools`: the
    function schemas the conversation offers (common.data.tools)."""
    rows = []
    for text, spans in _trained_spans(tokenizer, messages, _turns(messages, turns), finished, eot, tools):
        ids, labels = _labels(*_encode(tokenizer, text), spans)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def prompt_and_completion(tokenizer, messages: list[dict], finished: bool = True, eot: Optional[str] = None,
                          tools=None) -> tuple[str, str]:
    """A conversation ending with an assistant turn -> (the text inference gives the model before that
    turn, the text it is trained to write: the turn through its end-of-turn token), as
    conversation_rows trains it. The preference scripts train on these (rlhf.pref_formats)."""
    [(text, spans)] = _trained_spans(tokenizer, messages, _turns(messages, "last"), finished, eot, tools)
    start, end = spans[-1]
    return text[:start], text[start:end]


def _trained_spans(tokenizer, messages, chosen, finished, eot, tools) -> list[tuple]:
    """-> [(row text, trained character spans)]."""
    eot = end_of_turn(tokenizer, tools) if eot is None else eot
    full = render(tokenizer, messages, tools=tools)
    prompts = {i: render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) for i in chosen}
    bounds = {i: reply_bounds(tokenizer, messages, i, full, tools) for i in chosen}
    if all(full.startswith(prompts[i]) and len(prompts[i]) <= bounds[i][0] for i in chosen):
        spans = []
        for i in chosen:
            end = bounds[i][1]
            if finished or i != chosen[-1]:
                end = _turn_end(full, end, eot, bool(_calls(messages[i])))
            spans.append((len(prompts[i]), end))
        return [(full[:spans[-1][1]], spans)]
    out = []
    for i in chosen:
        text = _own_text(tokenizer, messages, i, prompts[i], finished or i != chosen[-1], eot, tools)
        out.append((text, [(len(prompts[i]), len(text))]))
    return out


def _own_text(tokenizer, messages: list[dict], i: int, prompt: str, finished: bool, eot: str, tools) -> str:
    """Assistant turn i as inference sees it: its generation prompt, then what the template writes
    from the end of that prompt to the end of the turn."""
    through = render(tokenizer, messages[:i + 1], tools=tools)
    start, end = reply_bounds(tokenizer, messages[:i + 1], i, through, tools)
    # The template's text between the previous message and the reply, less the generation prompt's.
    marked, mark = _mark(_marked(messages[:i + 1], {i - 1: PREVIOUS}), i)
    between = render(tokenizer, marked, tools=tools).partition(PREVIOUS)[2].partition(mark)[0]
    tail = render(tokenizer, _marked(messages[:i], {i - 1: PREVIOUS}), add_generation_prompt=True, tools=tools)
    tail = tail.partition(PREVIOUS)[2]
    if not between.startswith(tail):
        raise _unlocatable("writes a reply's turn differently from its generation prompt")
    if finished:
        end = _turn_end(through, end, eot, bool(_calls(messages[i])))
    return prompt + between[len(tail):] + through[start:end]
