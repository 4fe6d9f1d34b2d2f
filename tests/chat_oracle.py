"""Chat templates of real model families on a tiny tokenizer, and an independent oracle for the
assistant-only label mask.

The templates are the families' own (tests/chat_templates/, as published in their
tokenizer_config.json), with their special tokens added to the tiny byte-level tokenizer.

The oracle never maps characters to tokens and never uses sentinels (common.data.masking does
both). It works on token ids and on one fact per family, its end-of-turn token:
  - the prompt of assistant turn i is the conversation before it rendered with the generation
    prompt, tokenised alone;
  - where every such prompt is a token prefix of the whole conversation's tokens, the row is the
    whole conversation, and turn i trains the tokens after its prompt up to and including the first
    end-of-turn token; the row stops after the last trained token;
  - otherwise (Mistral v0.3 with a system message), each turn is a row: its prompt's tokens, then
    the tokens the template writes for the reply, found as the tokens after the prompt in the
    conversation rendered without the system message (where the prefix holds), up to and including
    the end-of-turn token."""

from pathlib import Path

HERE = Path(__file__).resolve().parent / "chat_templates"

# family -> (template file, bos, eos, end of turn, special tokens the family's tokenizer has)
FAMILIES = {
    "llama3_1": ("llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
                 ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]),
    "qwen2_5": ("qwen2_5.jinja", None, "<|im_end|>", "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "qwen3": ("qwen3.jinja", None, "<|im_end|>", "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "mistral_v0_3": ("mistral_v0_3.jinja", "<s>", "</s>", "</s>",
                     ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                      "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "phi3_5": ("phi3_5.jinja", "<s>", "<|endoftext|>", "<|end|>", ["<|system|>", "<|user|>", "<|assistant|>"]),
    "gemma2": ("gemma2.jinja", "<bos>", "<eos>", "<end_of_turn>", ["<start_of_turn>"]),
    "chatml": ("chatml.jinja", None, "<|im_end|>", "<|im_end|>", ["<|im_start|>"]),
}
# Qwen's `<tool_call>` / `<think>` markers are ordinary added tokens there (not special).
PLAIN_ADDED = {"qwen2_5": ["<tool_call>", "</tool_call>"], "qwen3": ["<tool_call>", "</tool_call>", "<think>",
                                                                    "</think>"]}


def family_tokenizer(family: str, base_tokenizer):
    import copy

    from tokenizers import AddedToken

    file, bos, eos, end, specials = FAMILIES[family]
    tok = copy.deepcopy(base_tokenizer)
    named = [t for t in (bos, eos, end) if t]
    tok.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(named + specials))})
    tok.add_tokens([AddedToken(t, special=False) for t in PLAIN_ADDED.get(family, [])])
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = (HERE / file).read_text(encoding="utf-8")
    return tok


def end_of_turn_id(family: str, tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(FAMILIES[family][3])


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages, gen=False, tools=None):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, tools=tools)


def _through_end(ids, start, end_id):
    """ids[start:] up to and including the first end-of-turn token."""
    k = ids.index(end_id, start)
    return ids[start:k + 1]


def oracle_rows(tokenizer, messages, end_id, turns="all", render=_render, tools=None):
    """-> [(input_ids, labels)] as the module doc says. `tools`: function schemas for the template."""
    if tools is not None:
        render = (lambda r: lambda tok, m, gen=False: r(tok, m, gen, tools=tools))(render)
    full = _ids(tokenizer, render(tokenizer, messages))
    at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    at = at[-1:] if turns == "last" else at
    prompts = {i: _ids(tokenizer, render(tokenizer, messages[:i], True)) for i in at}
    if all(full[:len(p)] == p for p in prompts.values()):
        labels = [-100] * len(full)
        last = 0
        for i in at:
            reply = _through_end(full, len(prompts[i]), end_id)
            labels[len(prompts[i]):len(prompts[i]) + len(reply)] = reply
            last = len(prompts[i]) + len(reply)
        return [(full[:last], labels[:last])]
    rows = []
    bare = [m for m in messages if m["role"] != "system"]
    for i in at:
        k = i - (len(messages) - len(bare))
        before = _ids(tokenizer, render(tokenizer, bare[:k], True))
        through = _ids(tokenizer, render(tokenizer, bare[:k + 1]))
        assert through[:len(before)] == before, "no prefix even without the system message"
        reply = _through_end(through, len(before), end_id)
        rows.append((prompts[i] + reply, [-100] * len(prompts[i]) + reply))
    return rows


def trained_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != -100])
