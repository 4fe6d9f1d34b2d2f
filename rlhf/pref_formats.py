"""Preference data in every common shape, brought to explicit `prompt`/`chosen`/`rejected`.

Implicit prompt (only `chosen` and `rejected`, each the whole exchange):
  - text with a shared beginning, as Anthropic HH (`\\n\\nHuman: ...\\n\\nAssistant: ...`): the prompt
    is the shared beginning, cut back to the last `\\n\\nAssistant:` it holds, or else to the last
    whitespace (an answer never starts mid-word); each answer is the rest, its leading space kept
    (` Paris.`, as this project writes answers);
  - message lists whose last assistant turn differs: the prompt is the messages before it.
Pairs whose chosen equals rejected are counted, reported and skipped.

Conversational pairs reach the trainers already rendered as SFT trains them (as_trained).
"""

from __future__ import annotations

import logging
from typing import Any

from common.flags.errors import UsageError

log = logging.getLogger("finetune")

HH_TURN = "\n\nAssistant:"


def split_text(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    shared = chosen[:n]
    if HH_TURN in chosen and HH_TURN in rejected:
        # Dialogues: the prompt is everything up to the last assistant turn, and must be the same in both.
        c_cut, r_cut = chosen.rfind(HH_TURN) + len(HH_TURN), rejected.rfind(HH_TURN) + len(HH_TURN)
        if chosen[:c_cut] != rejected[:r_cut]:
            raise UsageError(f"{where}: `chosen` and `rejected` have different prompts (they differ before their last "
                             f"{HH_TURN.strip()!r} turn, at character {n}), so neither answers the other's "
                             f"question; add a `prompt` column or fix that row.")
    cut = shared.rfind(HH_TURN)
    if cut >= 0:
        cut += len(HH_TURN)
    else:
        cut = max(shared.rfind(" "), shared.rfind("\n"), shared.rfind("\t"))
    if cut <= 0 or not chosen[:cut].strip():
        raise UsageError(f"{where}: `chosen` and `rejected` share no prompt (no common beginning to split them at); "
                         f"add a `prompt` column or fix that row.")
    prompt, c, r = chosen[:cut], chosen[cut:], rejected[cut:]
    if not c.strip() or not r.strip():
        side = "chosen" if not c.strip() else "rejected"
        raise UsageError(f"{where}: `{side}` has no answer after the prompt they share ({prompt[-40:]!r}); fix or "
                         f"remove that row.")
    return prompt, c, r


def split_messages(chosen: list, rejected: list, where: str) -> tuple[list, list, list]:
    from common.data.chat import check_messages

    chosen = check_messages(chosen, where, "`chosen`")
    rejected = check_messages(rejected, where, "`rejected`")
    if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        raise UsageError(f"{where}: `chosen` and `rejected` must be the same conversation up to their last "
                         f"assistant turn; they differ earlier. Add a `prompt` column or fix that row.")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def implicit_prompt_pairs(ds, source: str):
    """Dataset(chosen, rejected) -> (Dataset(prompt, chosen, rejected), ties skipped)."""
    from datasets import Dataset

    out = {"prompt": [], "chosen": [], "rejected": []}
    ties = 0
    for idx, row in enumerate(ds):
        where = f"{source}: row {idx}"
        chosen, rejected = row["chosen"], row["rejected"]
        if chosen == rejected:
            ties += 1
            continue
        if _is_text(chosen) and _is_text(rejected):
            p, c, r = split_text(chosen, rejected, where)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            p, c, r = split_messages(chosen, rejected, where)
        else:
            raise UsageError(f"{where}: `chosen` and `rejected` must both be text or both message lists.")
        out["prompt"].append(p)
        out["chosen"].append(c)
        out["rejected"].append(r)
    if not out["prompt"]:
        raise UsageError(f"{source}: `chosen` equals `rejected` in every row; there is no preference to learn.")
    if ties:
        log.warning("%s: skipped %d pairs whose chosen equals rejected.", source, ties)
    log.info("%s: implicit prompt: the shared beginning of chosen and rejected is the prompt (%d pairs).", source,
             len(out["prompt"]))
    return Dataset.from_dict(out), ties


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _is_conversation_source(src) -> bool:
    """Pairs or KTO rows whose prompts are message lists (not question-answer rows, not text)."""
    return src is not None and src.kind != "qa" and len(src.rows) > 0 and _is_conversational(src.rows[0]["prompt"])


def conversation_rendering(args, tokenizer, *sources) -> None:
    """Where any split holds message-list pairs: `--use_chat_template` applies to them as in SFT
    (`false` drops the tokenizer's template, so the pairs and the saved tokenizer get the plain
    rendering), and a run without a template says so."""
    from common.data import chat, templates

    if any(_is_conversation_source(src) for src in sources):
        chat.apply_template_flag(args, tokenizer)
        templates.say_plain(tokenizer, args.model_id)


# The chat template conversational rows carry (`chat_template_kwargs`) once as_trained has rendered
# them: the prompt and each answer are one message holding their final text, written out as it is.
AS_WRITTEN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def as_trained(ds, tokenizer, system_mode: str = "keep"):
    """Conversational pairs (or KTO rows) -> the texts SFT trains on (common.data.masking): the prompt
    as inference renders it (the generation prompt, with the system prompt where the template puts
    it), each answer through its end-of-turn token and nothing after it. The trainers render a
    conversation themselves, as its prompt alone and as prompt + answer, and take the answer to start
    where the two stop agreeing; on Mistral v0.3 with a system prompt that kept only `<s>[INST]` as
    the prompt and trained the question as the answer, on Phi-3 the answer gained `\n<|endoftext|>`.
    The rows stay conversational (so no trainer adds BOS or EOS), each message holding its final text,
    with a template that writes it out as it is. The same holds without a chat template (the plain
    rendering)."""
    from common.data import masking
    from common.data.templates import with_system_mode

    if len(ds) == 0 or not _is_conversational(ds[0]["prompt"]):
        return ds
    answers = [c for c in ("chosen", "rejected", "completion") if c in ds.column_names]
    eot = masking.end_of_turn(tokenizer)

    def convert(batch, indices):
        out = {k: list(v) for k, v in batch.items()}
        out["chat_template_kwargs"] = [{"chat_template": AS_WRITTEN}] * len(batch["prompt"])
        for i, prompt in enumerate(batch["prompt"]):
            prompt = with_system_mode(list(prompt), system_mode)
            for col in answers:
                reply = list(batch[col][i])
                if len(reply) != 1 or reply[0]["role"] != "assistant":
                    raise UsageError(f"row {indices[i]}: `{col}` holds {len(reply)} messages "
                                     f"({', '.join(m['role'] for m in reply)}); a pair compares one assistant reply: "
                                     f"put the earlier turns in `prompt`.")
                head, answer = masking.prompt_and_completion(tokenizer, prompt + list(batch[col][i]), eot=eot)
                out[col][i] = [{"role": "assistant", "content": answer}]
            out["prompt"][i] = [{"role": "user", "content": head}]
        return out

    return ds.map(convert, batched=True, with_indices=True, desc="Rendering conversations")
