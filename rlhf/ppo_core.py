"""The arithmetic of PPO for language models, written from the algorithm:
Schulman et al. 2017 (clipped surrogate), Ouyang et al. 2022 (per-token KL penalty against a
reference, score at the final token), Huang et al. 2024, "The N Implementation Details of RLHF
with PPO" (whitening, value clipping, EOS handling).

Everything here is a pure tensor function so the tests can pin it against hand-computed values.
Tensors are [batch, response_len]; `mask` is 1 on real response tokens, 0 on padding after EOS.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Optional[Callable] = None) -> torch.Tensor:
    """Mean over the masked entries. `reduce` sums a tensor across processes (multi-GPU)."""
    total = (x * mask).sum()
    count = mask.sum()
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Optional[Callable] = None,
               unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask, reduce)
    sq = ((x - mean) ** 2 * mask).sum()
    count = mask.sum()
    if reduce is not None:
        sq, count = reduce(sq), reduce(count)
    if unbiased and count > 1:
        return sq / (count - 1)
    return sq / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  reduce: Optional[Callable] = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (statistics across all processes with `reduce`)."""
    mean = masked_mean(x, mask, reduce)
    var = masked_var(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-kl_coef * (log pi - log pi_ref) on every response token, plus the score on the last one.

    Returns (rewards, kl) where kl is the per-token estimate log pi - log pi_ref (masked)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.size(0)), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; the value after the last real
    token is 0 (the episode ends there). Returns (advantages, returns = advantages + values)."""
    values = values * mask
    rewards = rewards * mask
    steps = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        next_value = next_value * (mask[:, t + 1] if t + 1 < steps else 0)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < steps else 0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages + values


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean of max(-A r, -A clip(r, 1-eps, 1+eps))."""
    log_ratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item(),
        }
    return loss, stats


def value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped within cliprange_value of the old V."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    losses = (new_values - returns) ** 2
    losses_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((losses_clipped > losses).float(), mask).item()}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


class AdaptiveKLController:
    """Ziegler et al. 2019: move kl_coef so that the measured KL tracks `target` over `horizon` samples."""

    def __init__(self, init: float, target: Optional[float], horizon: int = 10000):
        self.value = init
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = max(min(current_kl / self.target - 1.0, 0.2), -0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
