"""Independent references the tests compare results with. Each is small and obviously correct:
a plain loop, no cache, no batching, nothing shared with the code under test."""

import torch


def cache_free_greedy(model, prompt_ids: list[int], stop_ids, is_line_end, max_new_tokens: int) -> list[int]:
    """Greedy decoding of one prompt with no KV cache: at every step the whole prompt + generated
    ids go through `model(...)`, the same forward pass as training (PeftModel's forward adds the
    virtual tokens or prefix itself). Stops after a stop id, or after the token with which
    `is_line_end(generated_ids)` first holds (the text has reached a newline)."""
    model.eval()
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.tensor([list(prompt_ids) + new])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in stop_ids or is_line_end(new):
                break
    return new


def rounded_like_gguf(model, gguf_type: str):
    """The model with each matrix rounded as a GGUF file of `gguf_type` stores it, by hand: f16 and
    bf16 are plain casts; q8_0 cuts each row into blocks of 32 values, each stored as round(x / d)
    with d = max|x| / 127 (kept as f16). Vectors (norms, biases) stay f32. Changes `model` in place."""
    with torch.no_grad():
        for param in model.parameters():
            w = param.data
            if w.dim() < 2 or gguf_type == "f32":
                continue
            if gguf_type in ("f16", "bf16"):
                w.copy_(w.to(torch.float16 if gguf_type == "f16" else torch.bfloat16).float())
                continue
            blocks = w.reshape(-1, 32)
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            q = torch.where(d > 0, torch.round(blocks / d.clamp_min(1e-30)), torch.zeros_like(blocks))
            w.copy_((q * d.half().float()).reshape(w.shape))
    return model


def ollama_prompt(template: str, system: str, prompt: str) -> str:
    """What Ollama renders for one question from a Modelfile TEMPLATE in its legacy form: Go template
    actions `{{ .System }}`, `{{ .Prompt }}`, `{{ if .System }}A{{ else }}B{{ end }}` and string
    literals `{{ "..." }}`; the template is cut at `{{ .Response }}` (the answer starts there)."""
    import re

    values = {".System": system, ".Prompt": prompt, ".Response": ""}
    out, emitting = [], [True]
    for literal, action in re.findall(r'(.*?)(?:\{\{\s*(.*?)\s*\}\}|$)', template, flags=re.DOTALL):
        if all(emitting):
            out.append(literal)
        if action == ".Response":
            break
        if action.startswith("if "):
            emitting.append(bool(values[action[3:].strip()]))
        elif action == "else":
            emitting[-1] = not emitting[-1]
        elif action == "end":
            emitting.pop()
        elif action and all(emitting):
            out.append(action[1:-1] if action.startswith('"') else values[action])
    return "".join(out)
