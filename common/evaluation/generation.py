"""Greedy decoding with the KV cache for every model this project trains or loads, including
prompt-learning adapters, token for token as a cache-free decode through the training forward.

PEFT's own `generate()` cannot be trusted here with the pinned libraries (transformers 5, PEFT
0.21): a prefix-tuning prefix never reaches the model, P-tuning and prompt tuning feed their
virtual tokens again at every step, and left padding loses the position ids. So the virtual
inputs are built here, once per batch, exactly as `PeftModelForCausalLM.forward` builds them for
training (`get_prompt`), and the base model then decodes with its cache:

- prefix tuning: the prefix is the cache the prompt is run against (positions start after it);
- prompt tuning / P-tuning: the virtual embeddings go before the padded prompt, positions count
  only real inputs, so a row's answer does not depend on the rest of its batch;
- everything else (LoRA, DoRA, QLoRA, merged or plain models): the model's own forward.

Prompts are sorted by length into batches (little padding), answers come back in input order,
and a batch stops as soon as every row has emitted a stop id or a newline.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Callable, Optional, Sequence

# tokenizer -> (its length, newline ids). Keyed by the object itself, not id(): a freed
# tokenizer's address may be reused by another one.
_NEWLINE_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def newline_ids(tokenizer) -> frozenset:
    """Ids of the tokens whose text contains a newline: the answer ends at the first of them."""
    cached = _NEWLINE_IDS.get(tokenizer)
    if cached is None or cached[0] != len(tokenizer):
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = (len(tokenizer), frozenset(i for i, t in enumerate(texts) if "\n" in t))
        _NEWLINE_IDS[tokenizer] = cached
    return cached[1]


def greedy_generate(model, prompts: Sequence[Sequence[int]], *, pad_id: int, stop_ids: Sequence[int],
                    end_ids: Sequence[int] = (), batch_size: int = 16, max_new_tokens: int = 16,
                    on_batch: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """Greedy continuations of tokenized prompts, each up to and including its first stop/end id.

    stop_ids end a row (EOS, end of turn); end_ids too (newline tokens). Prompts are batched by
    length; the result is in the order of `prompts`."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Optional[list[int]]] = [None] * len(prompts)
    finish = torch.tensor(sorted(set(stop_ids) | set(end_ids)), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), plain_lora_forward(model):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                for i, ids in zip(idx, _greedy_batch(model, [prompts[i] for i in idx], pad_id, finish,
                                                     max_new_tokens)):
                    out[i] = ids
                if on_batch is not None:
                    on_batch(len(idx))
    finally:
        model.train(was_training)
    return [o or [] for o in out]


def _greedy_batch(model, prompts, pad_id: int, finish, max_new_tokens: int) -> list[list[int]]:
    import torch

    device = _input_device(model)
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every row's next token is in the last column
        if len(p):
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
    ids, mask, finish = ids.to(device), mask.to(device), finish.to(device)

    forward, inputs, mask = _first_inputs(model, ids, mask, max_new_tokens)
    # Positions count real inputs only (virtual tokens included), as in an unpadded forward.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    fed = inputs["inputs_embeds"].shape[1] if "inputs_embeds" in inputs else ids.shape[1]
    params = _forward_parameters(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    # transformers 5.24 renamed the cache argument and output `past_key_values` -> `cache`.
    cache_name = "cache" if "cache" in params else "past_key_values"
    if "past_key_values" in inputs:
        inputs[cache_name] = inputs.pop("past_key_values")
    step = forward(**inputs, attention_mask=mask, position_ids=positions[:, -fed:], use_cache=True, **extra)
    next_position = positions[:, -1] + 1

    done = torch.zeros(rows, dtype=torch.bool, device=device)
    new = []
    for t in range(max_new_tokens):
        token = step.logits[:, -1, :].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done |= torch.isin(token, finish)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
        step = forward(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                       **{cache_name: _cache_of(step)}, use_cache=True, **extra)
        next_position = next_position + 1

    generated = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(rows)]
    finishing = set(finish.tolist())
    result = []
    for row in generated:
        kept = []
        for tok in row:
            kept.append(tok)
            if tok in finishing:
                break
        result.append(kept)
    return result


@contextlib.contextmanager
def plain_lora_forward(model):
    """Inside this block, eval-mode LoRA layers on plain `nn.Linear`s compute their output with the
    very operations of PEFT's forward, in its order (base, then B(A(x)) * scaling added), without its
    per-call bookkeeping: the same numbers, in less time (bench_generate's pass: 0.182 s, not 0.191 s). Layers
    PEFT computes differently (DoRA and other variants, several active adapters, merged, quantized,
    hooked or FSDP-wrapped layers, calls with extra arguments) keep PEFT's forward."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    swapped = []
    try:
        for module in model.modules():
            forward = _plain_lora(module) if type(module) is LoraLinear else None
            if forward is not None:
                module.forward = forward
                swapped.append(module)
        yield
    finally:
        for module in swapped:
            del module.forward


def _plain_lora(module):
    """The lean forward for one PEFT LoRA `Linear` layer, or None where PEFT's own must stay."""
    import torch

    if module.training or "forward" in vars(module):
        return None
    base = module.base_layer
    if type(base) is not torch.nn.Linear or module.merged or module.disable_adapters:
        return None
    adapters = module.active_adapters
    if len(adapters) != 1 or adapters[0] not in module.lora_A or adapters[0] in module.lora_variant:
        return None
    name, active = adapters[0], module.active_adapter
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:  # e.g. FSDP units of their own
        return None
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in (module, base, lora_a, lora_b)):
        return None
    linear = torch.nn.functional.linear
    original = type(module).forward.__get__(module)

    def forward(x, *args, **kwargs):
        if (args or kwargs or module.training or module.disable_adapters or module.merged
                or module.active_adapter != active):
            return original(x, *args, **kwargs)  # switched, merged or put in training inside the block: PEFT decides
        result = linear(x, base.weight, base.bias)
        result_dtype = result.dtype
        if x.dtype != lora_a.weight.dtype and getattr(module, "cast_input_dtype_enabled", True):
            x = x.to(dtype=lora_a.weight.dtype)
        result = result + linear(linear(x, lora_a.weight, lora_a.bias), lora_b.weight, lora_b.bias) * module.scaling[name]
        return result.to(result_dtype)

    return forward


def _first_inputs(model, ids, mask, max_new_tokens: int):
    """(callable, first-step inputs, attention mask over everything the first step attends to)."""
    import torch

    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return model, {"input_ids": ids}, mask
    from peft import PeftType

    rows, n_virtual = ids.shape[0], config.num_virtual_tokens
    base = model.get_base_model()
    mask = torch.cat([mask.new_ones((rows, n_virtual)), mask], dim=1)
    if config.peft_type == PeftType.PREFIX_TUNING:
        prefix = model.get_prompt(rows, max_cache_len=n_virtual + ids.shape[1] + max_new_tokens)
        return base, {"input_ids": ids, "past_key_values": prefix}, mask
    if config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        embeds = model.word_embeddings(ids)
        virtual = model.get_prompt(batch_size=rows).to(embeds.dtype)
        return base, {"inputs_embeds": torch.cat([virtual, embeds], dim=1)}, mask
    raise ValueError(f"generation from a {config.peft_type} adapter is not supported; this project trains "
                     f"prefix tuning, P-tuning and prompt tuning.")


def _input_device(model):
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _forward_parameters(model) -> set:
    """The causal LM's forward arguments (under a PeftModel, the base model's)."""
    fn = (model.get_base_model() if hasattr(model, "get_base_model") else model).forward
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _cache_of(output):
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values
