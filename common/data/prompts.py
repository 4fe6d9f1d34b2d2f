"""The prompt format of question-answer data: template or chat template, system prompt, completion."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from common.flags.errors import UsageError

# Formatting ----------------------------------------------------------------------------------


@dataclass
class PromptFormat:
    template: str = "Question: {question}\nAnswer:"
    use_chat: bool = False
    system_prompt: Optional[str] = None
    raw: bool = False  # prompt-completion data: the prompt is used verbatim
    system_mode: str = "keep"  # --system_message: keep, fold or drop


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
                        system_prompt=unescape(system) if system else None, raw=schema == "prompt-completion",
                        system_mode=getattr(args, "system_message", "keep"))


def chat_messages(question: str, fmt: PromptFormat) -> list[dict]:
    """The conversation a question becomes under a chat template, with `--system_message` applied."""
    from common.data.templates import with_system_mode

    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    return with_system_mode(messages + [{"role": "user", "content": question}], fmt.system_mode)


def prompt_text(question: str, fmt: PromptFormat) -> str:
    return question if fmt.raw else fmt.template.replace("{question}", question)


def sft_example(question: str, answer: str, fmt: PromptFormat) -> dict:
    """The prompt/completion pair TRL trains on (EOS is appended by the trainer). Under a chat
    template, see chat_sft_rows."""
    if fmt.raw:
        return {"prompt": question, "completion": answer}
    return {"prompt": prompt_text(question, fmt), "completion": " " + answer}


def generation_prompt(question: str, fmt: PromptFormat, tokenizer) -> str:
    """The exact text a model sees at inference, matching training."""
    if fmt.use_chat:
        from common.data.templates import render

        return render(tokenizer, chat_messages(question, fmt), add_generation_prompt=True)
    return prompt_text(question, fmt)


def chat_sft_rows(ds, fmt: PromptFormat, tokenizer, completion_only: bool = True, num_proc: Optional[int] = None):
    """Question-answer rows under a chat template -> Dataset(input_ids, labels): the question as a
    conversation, masked as conversations are (common.data.masking), so the prompt is, byte for byte,
    generation_prompt's (evaluate.py's), and only the answer and its end of turn are trained
    (every token with `--completion_only_loss false`)."""
    from common.data import masking

    eot = masking.end_of_turn(tokenizer)

    def rows(question: str, answer: str) -> list[dict]:
        messages = chat_messages(question, fmt) + [{"role": "assistant", "content": answer}]
        out = masking.conversation_rows(tokenizer, messages, "last", eot=eot)
        return out if completion_only else [{"input_ids": r["input_ids"], "labels": list(r["input_ids"])}
                                            for r in out]

    def convert(batch: dict) -> dict:
        out = [r for q, a in zip(batch["question"], batch["answer"]) for r in rows(q, a)]
        return {"input_ids": [r["input_ids"] for r in out], "labels": [r["labels"] for r in out]}

    if len(ds):  # a template that refuses the prompt format says so before the map starts
        rows(ds[0]["question"], ds[0]["answer"])
    return ds.map(convert, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="Tokenizing")


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
