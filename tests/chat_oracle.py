"""Chat templates written to mimic real model families, and an independent oracle for the
assistant-only label mask.

The oracle never maps characters to tokens (common.data.chat does, through offsets): it tokenises the
conversation rendered up to each assistant turn (with the generation prompt) and rendered through
that turn, checks both are token prefixes of the whole conversation's tokens, and trains the tokens
between them, less the whitespace-only tokens the template writes after the end-of-turn token."""

# Llama 3: BOS written by the template, role headers, <|eot_id|> ends each turn.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# ChatML (Qwen 2.5): a default system message when none is given, `<|im_end|>\n` after each turn.
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# [INST] (Llama 2 / Mistral): BOS from the template, the system prompt inside the first user turn,
# EOS after each answer, nothing added for a generation prompt.
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}[INST] <<SYS>>\n{{ messages[0]['content'] }}"
        "\n<</SYS>>\n\n{{ m['content'] }} [/INST]{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "inst": INST}
SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def tokenizer_with(template, base_tokenizer):
    import copy

    tok = copy.deepcopy(base_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = template
    return tok


def oracle_labels(tokenizer, messages, turns="all", render=None):
    render = render or (lambda m, gen: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen))
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    full = ids(render(messages, False))
    labels = [-100] * len(full)
    turns_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in (turns_at[-1:] if turns == "last" else turns_at):
        before, through = ids(render(messages[:i], True)), ids(render(messages[:i + 1], False))
        assert full[:len(before)] == before and full[:len(through)] == through, "not a token prefix"
        reply = through[len(before):]
        while reply and not tokenizer.decode(reply[-1:]).strip():
            reply = reply[:-1]
        labels[len(before):len(before) + len(reply)] = reply
    return full, labels


def trained_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != -100])
