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
