"""The SFT (and DPO, KTO) loss, with the vocabulary projection computed only where the loss is taken.

Completion-only SFT trains on the answer tokens: on TriviaQA about 5 of 30 tokens a row. TRL's
SFTTrainer already avoids keeping full `[batch, seq, vocab]` logits, but on devices without
Triton (the CPU) its fused head still projects every position. Here the backbone's hidden states
are gathered at the positions whose next-token label is not -100, and only those rows go through
the LM head and the cross-entropy, in chunks of at most `CHUNK_ELEMENTS` logits, each recomputed
in the backward pass rather than kept. The softmax runs in float32 whatever the model's dtype.

TRL's `compute_loss` stays in charge (the loss scaling by `num_items_in_batch`, gradient
accumulation, the DFT loss, the logged entropy and token accuracy, which are computed here on
the same positions as the loss). Only the head it calls is replaced: `install(trainer)` swaps the
forward that TRL patched in for `model(..., fused_lm_head=True)`. Prompt-learning adapters reach
the same forward through PEFT, with their virtual tokens prepended and labelled -100, so every
SFT technique takes this path. Models whose logits are scaled or soft-capped, MoE models asking
for router logits, and pre-shifted labels (sequence parallelism) keep TRL's head.

TRL's DPO and KTO trainers call the same head (with completion-only labels), so they take this
path too. ORPO and CPO (SimPO) build full logits in their own `concatenated_forward` and are left
as they are; so is WPO weighting (`use_weighting`), which needs a statistic computed only by TRL's head.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger("finetune")


# Logits per chunk: 2**24 float32 values are 64 MiB (131 positions of a 128,256-token vocabulary).
CHUNK_ELEMENTS = 2**24


# Config attributes that change the logits beyond `lm_head(hidden)`; a model with any of them set
# keeps TRL's head, which applies them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def _chunk_stats(hidden, weight, bias, targets):
    """Log-probability of each target, and without gradient the entropy, whether the target is the
    argmax and the mean logit (what TRL's trainers log), for one chunk of positions."""
    logits = F.linear(hidden, weight, bias)
    if logits.element_size() < 4:  # 16-bit models: the softmax in float32
        logits = logits.float()
    log_p = torch.log_softmax(logits, dim=-1)
    log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1)
        is_top1 = logits.argmax(-1) == targets
        mean_logits = logits.mean(-1)
    return log_probs, entropy, is_top1, mean_logits


def selected_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                       chunk_elements: int | None = None):
    """hidden [N, H] at the positions that are scored, targets [N] -> (log_probs, entropy, is_top1,
    mean_logits), each [N].

    The logits of a chunk exist only while it is computed; with more than one chunk each is
    recomputed in the backward pass (one chunk alone is kept: that is no more than its peak)."""
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // weight.shape[0])
    n = hidden.shape[0]
    if n <= rows:
        return _chunk_stats(hidden, weight, bias, targets)
    parts = [checkpoint(_chunk_stats, hidden[i:i + rows], weight, bias, targets[i:i + rows], use_reentrant=False)
             for i in range(0, n, rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


def supports(model) -> bool:
    """Whether `lm_head(last_hidden_state)` is the model's logits (no scaling or soft-capping)."""
    config = model.config
    if config.get_text_config() is not config:  # vision-language wrappers: keep TRL's handling
        return False
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS) \
        and model.get_output_embeddings() is not None


def install(trainer) -> bool:
    """Make the fused LM head that TRL's SFT, DPO and KTO trainers call score only the positions with a
    label (the policy's, and the reference model's where there is one). -> whether installed."""
    if getattr(trainer, "use_weighting", False):  # WPO weights need log(sum p^2): TRL's head computes it
        return False
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    installed = _patch(base)
    if installed and getattr(trainer, "ref_model", None) is not None:
        _patch(trainer.ref_model)
    return installed


def _patch(base) -> bool:
    trl_forward = base.__dict__.get("forward")  # TRL sets it on the instance
    code = getattr(getattr(trl_forward, "__func__", trl_forward), "__code__", None)
    if not supports(base) or code is None or "fused_lm_head" not in code.co_varnames:
        log.debug("loss: TRL's LM head kept (logit transforms, or no fused head to replace)")
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    @functools.wraps(type(base).forward)  # generate() checks its keyword arguments against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits") \
                or getattr(self.config, "output_router_logits", False):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        head = self.get_output_embeddings()
        labels = labels[:, 1:].to(head.weight.device)
        mask = labels != -100
        stats = selected_log_probs(hidden.to(head.weight.device)[mask], head.weight, head.bias, labels[mask])
        # Back to [batch, seq - 1], zero where there is no label; masked_scatter keeps a batch without
        # labels connected to the graph (a differentiable zero).
        log_probs, entropy, is_top1, mean_logits = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in stats)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, mean_logits=mean_logits, label_mask=mask)

    base.forward = types.MethodType(forward, base)
    return True
