"""Rendering conversations: the tokenizer's chat template, or PLAIN_RENDERING where it has none, and
what to do with a system message the template refuses (`--system_message`).

A template that refuses a conversation (Gemma 2: "System role not supported"; Mistral: roles must
alternate) raises a Jinja error from inside transformers; here it becomes one line that names the
reason and, for a refused system message, the flag that fixes it."""

from __future__ import annotations

import logging

from common.flags.errors import UsageError

log = logging.getLogger("finetune")

SYSTEM_MODES = ("keep", "fold", "drop")


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def plain_template(tokenizer) -> str:
    """PLAIN_RENDERING, for tokenizers without a chat template:

        [BOS]{system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}{EOS}\\n\\nUser: ...

    BOS only where the tokenizer adds one to text; the generation prompt is `Assistant:`."""
    bos = "{{ bos_token }}" if adds_bos(tokenizer) else ""
    return (bos + "{% for m in messages %}"
            "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
            "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
            "{% elif m['role'] == 'tool' %}{{ raise_exception('tool') }}"
            "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def say_plain(tokenizer, model_id: str = "the model") -> None:
    if not has_template(tokenizer):
        log.info("%s has no chat template: conversations are rendered as plain text (`User: ...`, "
                 "`Assistant: ...` + EOS; docs/your-own-data.md).", model_id)


def with_system_mode(messages: list[dict], mode: str) -> list[dict]:
    """`--system_message`: `keep` the system message as the template renders it, `fold` its text
    into the start of the first user turn (a blank line between), or `drop` it."""
    if mode == "keep" or not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0], list(messages[1:])
    if mode == "fold":
        for k, m in enumerate(rest):
            if m["role"] == "user":
                rest[k] = {**m, "content": f"{system['content']}\n\n{m['content']}"}
                break
    return rest


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> str:
    """`tools`: the function schemas a row offers (common.data.tools), for templates that list them."""
    from jinja2.exceptions import TemplateError

    template = None if has_template(tokenizer) else plain_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, tools=tools,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise refused(tokenizer, messages, exc, template is not None) from None


def refused(tokenizer, messages: list[dict], exc: Exception, plain: bool) -> UsageError:
    from jinja2.exceptions import TemplateError

    if plain:
        return UsageError("tool messages need a chat template that renders tools; this tokenizer has none (the "
                          "plain `User:`/`Assistant:` rendering has no tool format).")
    reason = str(exc).strip() or type(exc).__name__
    if messages and messages[0]["role"] == "system":
        try:
            tokenizer.apply_chat_template(messages[1:], tokenize=False)
        except TemplateError:
            pass
        else:
            return UsageError(f"the model's chat template refuses a system message ({reason!r}); pass "
                              f"`--system_message fold` to put its text at the start of the first user turn, or "
                              f"`--system_message drop` (question-answer data: or `--system_prompt none`).")
    return UsageError(f"the model's chat template refuses a conversation: {reason!r}; fix the rows it names "
                      f"or use `--use_chat_template false` for the plain-text rendering.")
