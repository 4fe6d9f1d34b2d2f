"""The PPO loop as named steps over one state (PPOLoop): the step's prompts, rollout (sample answers,
then old log-probs, reference log-probs and values), score (reward, per-token rewards with the KL
penalty, GAE advantages), update (clipped PPO epochs over minibatches), statistics, log and
checkpoint. `train_loop` runs them step after step until `--max_steps` or a stop request. The
arithmetic is in rlhf/ppo_core.py, what is built before the loop in rlhf/ppo_setup.py."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.flags.errors import UsageError
from common.recipe.callbacks import NonFiniteLoss, SaveClock, check_finite_weights
from rlhf import ppo_core as core
from rlhf.ppo_checkpoint import resume, save_checkpoint
from rlhf.ppo_setup import PPORun


@dataclass
class Scored:
    raw_scores: torch.Tensor  # the reward as given, before the missing-EOS penalty
    kl: torch.Tensor  # per token, policy against reference
    advantages: torch.Tensor
    returns: torch.Tensor


class PPOLoop:
    """The state that changes from step to step: prompt order and cursor, time per phase, the log
    history, the adaptive KL coefficient and the generator that shuffles the prompts. A checkpoint
    holds exactly this (plus the weights and random states), so a resumed run goes on unchanged."""

    def __init__(self, run: PPORun):
        self.run = run
        args, accelerator = run.args, run.accelerator
        self.kl_ctl = core.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
        self.reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
        self.history: list[dict] = []
        self.generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
        self.order = torch.randperm(len(run.prompts.ids), generator=self.generator).tolist()
        state = {"cursor": 0, "seconds": {"sampling": 0.0, "scoring": 0.0, "optimisation": 0.0}, "runtime_s": 0.0,
                 "num_processes": accelerator.num_processes}
        if run.resume:
            self.history, self.order, state = resume(Path(run.resume), run.unwrapped, run.optimizer, run.scheduler,
                                                     self.kl_ctl, self.generator, accelerator, len(run.prompts.ids),
                                                     engine=deepspeed_engine(run))
        self.cursor, self.seconds = state["cursor"], state["seconds"]
        self.start = time.perf_counter() - state["runtime_s"]
        self.save_clock = SaveClock(args.save_minutes)

    @property
    def first_step(self) -> int:
        return len(self.history) + 1

    def step(self, step: int) -> dict:
        batch = self.next_batch()
        t0 = clock()
        roll = self.rollout(batch)
        scored = self.score(batch, roll)
        self.seconds["sampling"] += roll["sampling_s"]
        self.seconds["scoring"] += clock() - t0 - roll["sampling_s"]
        t0 = clock()
        stats = self.update(roll, scored)
        self.seconds["optimisation"] += clock() - t0
        try:  # the statistics come from before the step's last update: they can be finite while the weights are not
            check_finite_weights(self.run.wrapper, step, self.run.accelerator.device)
        except NonFiniteLoss as exc:
            raise UsageError(str(exc)) from None
        return self.statistics(step, roll, scored, stats)

    def next_batch(self) -> list[int]:
        """The step's prompts: the next ones in the shuffled order, reshuffled once it runs out."""
        per_step = self.run.rollouts_per_step
        if self.cursor + per_step > len(self.order):
            self.order = torch.randperm(len(self.run.prompts.ids), generator=self.generator).tolist()
            self.cursor = 0
        batch = self.order[self.cursor:self.cursor + per_step]
        self.cursor += per_step
        return batch

    def rollout(self, batch: list[int]) -> dict:
        run = self.run
        return sample_rollouts(run.unwrapped, run.accelerator, run.tokenizer, [run.prompts.ids[i] for i in batch],
                               run.args, run.stop_ids, ref_adapter=bool(run.source.adapter_dir))

    def score(self, batch: list[int], roll: dict) -> Scored:
        run, args = self.run, self.run.args
        responses = run.tokenizer.batch_decode(roll["responses"], skip_special_tokens=True)
        if run.reward.scorer is not None:
            scores = run.reward.scorer.score_answers([run.prompts.scored[i] for i in batch], responses,
                                                     roll["has_eos"].tolist())
        else:
            scores = run.reward.function(responses, [run.prompts.aliases[i] for i in batch])
        scores = torch.tensor(scores, dtype=torch.float32, device=run.accelerator.device)
        raw_scores = scores.clone()
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~roll["has_eos"]).float()
        mask = roll["mask"]
        rewards, kl = core.per_token_rewards(scores, roll["logprobs"], roll["ref_logprobs"], mask, self.kl_ctl.value)
        advantages, returns = core.gae(rewards, roll["values"], mask, args.gamma, args.lam)
        advantages = core.masked_whiten(advantages, mask, reduce=self.reduce)
        return Scored(raw_scores=raw_scores, kl=kl, advantages=advantages, returns=returns)

    def update(self, roll: dict, scored: Scored) -> dict:
        run = self.run
        return ppo_epochs(run.wrapper, run.accelerator, run.optimizer, run.scheduler, roll, scored.advantages,
                          scored.returns, run.args)

    def statistics(self, step: int, roll: dict, scored: Scored, stats: dict) -> dict:
        """The step's log entry, across processes; the KL controller adapts to the step's KL here."""
        run, accelerator = self.run, self.run.accelerator
        gathered = {
            "score": accelerator.gather(scored.raw_scores).mean().item(),
            "kl": accelerator.gather(scored.kl.sum(dim=1)).mean().item(),
            "response_length": accelerator.gather(roll["mask"].sum(1).float()).mean().item(),
            "eos_fraction": accelerator.gather(roll["has_eos"].float()).mean().item(),
        }
        self.kl_ctl.update(gathered["kl"], run.rollouts_per_step * accelerator.num_processes)
        first = stats.pop("first_microbatch")
        # Before the step's first optimizer update the policy is the one that sampled: ratio 1.
        gathered["start_ratio_max_dev"] = accelerator.gather(
            torch.tensor([first["ratio_max_dev"]], device=accelerator.device)).max().item()
        gathered["start_approx_kl"] = mean_across(accelerator, first["approx_kl"])
        entry = {"step": step, **gathered, **{k: mean_across(accelerator, v) for k, v in stats.items()},
                 "kl_coef": self.kl_ctl.value, "learning_rate": run.scheduler.get_last_lr()[0]}
        if not all(math.isfinite(v) for v in entry.values()):
            raise UsageError(f"PPO statistics became non-finite at step {step} ({entry}); lower `--learning_rate` "
                             f"or raise `--kl_coef`.")
        return entry

    def log(self, step: int, entry: dict, bar) -> None:
        from common.recipe.progress import PPO_LINE_KEYS, log_line

        run = self.run
        if step % run.args.logging_steps == 0 or step == run.steps:
            run.accelerator.log(entry, step=step)
            bar.set_postfix(score=f"{entry['score']:.3f}", kl=f"{entry['kl']:.3f}")
            if run.accelerator.is_main_process:
                bar.write(log_line(entry, step, run.steps, PPO_LINE_KEYS), file=sys.stderr)

    def checkpoint_due(self, step: int) -> bool:
        args = self.run.args
        by_steps = args.save_strategy == "steps" and step % args.save_steps == 0
        return step < self.run.steps and (by_steps or self.save_clock.due(self.run.accelerator.device))

    def checkpoint(self, step: int) -> Path:
        from common.recipe import run_config

        run = self.run
        folder = Path(run.out) / f"checkpoint-{step}"
        state = {"cursor": self.cursor, "seconds": self.seconds, "runtime_s": time.perf_counter() - self.start,
                 "num_processes": run.accelerator.num_processes, "kl_coef": self.kl_ctl.value}
        engine = deepspeed_engine(run)
        if engine is not None:  # a resume must run under the same stage
            state["zero_stage"] = engine.zero_optimization_stage()
        config = run_config.run_config(run.args, "ppo", {"model": {"base": run.source.base,
                                                                   "quantized": run.policy.quantized},
                                                         "checkpoint": {"step": step}})
        save_checkpoint(run.unwrapped, run.tokenizer, folder, run.accelerator, self.history, run.optimizer,
                        run.scheduler, state, self.generator, self.order, run.args.save_total_limit, config=config,
                        engine=engine)
        self.save_clock.saved()
        return folder


def deepspeed_engine(run: PPORun):
    """The DeepSpeed engine that `accelerator.prepare` made of the policy, or None without DeepSpeed."""
    from accelerate.utils import DistributedType

    return run.wrapper if run.accelerator.distributed_type == DistributedType.DEEPSPEED else None


def train_loop(loop: PPOLoop) -> None:
    """Steps from the first not yet done to `--max_steps`; on Ctrl-C or SIGTERM every process stops
    after the same step, with a checkpoint to resume from."""
    from common.recipe import signals
    from common.recipe.progress import progress_bar

    run = loop.run
    bar = progress_bar(iterable=range(loop.first_step, run.steps + 1), desc="PPO", initial=loop.first_step - 1,
                       total=run.steps, disable=not run.accelerator.is_main_process)
    with signals.stop_requests() as stop:
        for step in bar:
            entry = loop.step(step)
            loop.history.append(entry)
            loop.log(step, entry, bar)
            saved = loop.checkpoint(step) if loop.checkpoint_due(step) else None
            if signals.on_any_process(stop.requested, run.accelerator.device):  # every process stops at the same step
                bar.close()
                signals.announce_stop(run.args, step, saved or loop.checkpoint(step), stop)


# Rollouts and updates ----------------------------------------------------------------------------

def clock() -> float:
    """Seconds, after the GPU has finished what was queued (so time is charged to the right phase)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def mean_across(accelerator, value: float) -> float:
    t = torch.tensor([value], device=accelerator.device)
    return accelerator.gather(t).mean().item()


def _left_padded(prompt_ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):] = torch.tensor(p)
        attn[row, width - len(p):] = 1
    return ids.to(device), attn.to(device)


def _answer_tokens(responses: torch.Tensor, stop_ids, response_length: int, pad: int, device) -> tuple:
    """-> (responses padded to `--response_length`, pad after the first stop token; mask of the
    real tokens, up to and including that stop token; whether each answer has one)."""
    if responses.size(1) < response_length:
        fill = torch.full((responses.size(0), response_length - responses.size(1)), pad, device=device,
                          dtype=responses.dtype)
        responses = torch.cat([responses, fill], dim=1)
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=device))
    stop_seen = torch.cumsum(is_stop.int(), dim=1)
    mask = ((stop_seen == 0) | (is_stop & (stop_seen == 1))).float()
    has_eos = is_stop.any(dim=1)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad))
    return responses, mask, has_eos


def _reference_logits(unwrapped, full, full_attn, args, ref_adapter: bool):
    """The reference: the frozen SFT adapter where the run started from one, else no adapter."""
    policy = unwrapped.policy
    if not ref_adapter:
        with policy.disable_adapter():
            return unwrapped(full, full_attn, args.response_length, args.temperature)[0]
    policy.set_adapter("ref", inference_mode=True)
    try:
        return unwrapped(full, full_attn, args.response_length, args.temperature)[0]
    finally:
        policy.set_adapter("default")


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(torch.log_softmax(logits, -1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def sample_rollouts(unwrapped, accelerator, tokenizer, prompt_ids: list[list[int]], args, stop_ids,
                    ref_adapter: bool) -> dict:
    """Sample answers, then compute old log-probs, reference log-probs and values (no grad)."""
    from rlhf.policy_model import NEUTRAL_SAMPLING

    pad = tokenizer.pad_token_id
    ids, attn = _left_padded(prompt_ids, pad, accelerator.device)
    t0 = clock()
    with torch.no_grad(), accelerator.autocast():
        generated = unwrapped.policy.generate(input_ids=ids, attention_mask=attn, **NEUTRAL_SAMPLING,
                                              temperature=args.temperature, max_new_tokens=args.response_length,
                                              eos_token_id=stop_ids, pad_token_id=pad, use_cache=True)
    sampling_s = clock() - t0
    responses, mask, has_eos = _answer_tokens(generated[:, ids.size(1):], stop_ids, args.response_length, pad,
                                              accelerator.device)
    full = torch.cat([ids, responses], dim=1)
    full_attn = torch.cat([attn, mask.long()], dim=1)
    with torch.no_grad(), accelerator.autocast():
        logits, values = unwrapped(full, full_attn, args.response_length, args.temperature)
        logprobs = _token_logprobs(logits, responses)
        ref_logprobs = _token_logprobs(_reference_logits(unwrapped, full, full_attn, args, ref_adapter), responses)
    return {"full": full, "attention": full_attn, "responses": responses, "mask": mask, "has_eos": has_eos,
            "logprobs": logprobs.float() * mask, "ref_logprobs": ref_logprobs.float() * mask,
            "values": values.float() * mask, "sampling_s": sampling_s}


def ppo_epochs(wrapper, accelerator, optimizer, scheduler, roll, advantages, returns, args) -> dict:
    with checkpointing_layers(wrapper, on=args.gradient_checkpointing):
        return ppo_updates(wrapper, accelerator, optimizer, scheduler, roll, advantages, returns, args)


@contextlib.contextmanager
def checkpointing_layers(wrapper, on: bool):
    """The model stays in eval mode throughout PPO; but transformers only recomputes activations
    (gradient checkpointing) in layers in training mode. So during the updates exactly the decoder
    layers are flagged as training. Some layers (OPT, BioGPT, XGLM, Falcon, ...) call
    `F.dropout(..., training=self.training)` themselves: `disable_dropout` has set every dropout
    probability to 0, so the update's log-probs still equal the rollout's."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in wrapper.modules() if isinstance(m, GradientCheckpointingLayer)] if on else []
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


STAT_KEYS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "value_clipfrac")


def ppo_updates(wrapper, accelerator, optimizer, scheduler, roll, advantages, returns, args) -> dict:
    """`--ppo_epochs` passes over the rollouts; returns each statistic's mean over the micro-batches,
    and, as `first_microbatch`, the first one's ratio and KL before any optimizer step."""
    sums: dict[str, list] = {k: [] for k in STAT_KEYS}
    first = None
    for mb in _micro_batches(roll, advantages, returns, args):
        logits, pg, vf, stats, start = _micro_batch_update(wrapper, accelerator, optimizer, scheduler, mb, args,
                                                           measure_start=first is None)
        first = start if first is None else first
        with torch.no_grad():
            sums["entropy"].append(core.masked_mean(core.entropy_from_logits(logits), mb["mask"]).item())
        sums["policy_loss"].append(pg.item())
        sums["value_loss"].append(vf.item())
        for k, v in stats.items():
            sums[k].append(v)
    return {**{k: sum(v) / len(v) for k, v in sums.items() if v}, "first_microbatch": first}


def _micro_batches(roll, advantages, returns, args):
    """Each epoch shuffles the rollouts (global RNG) into `--num_mini_batches` minibatches, one
    optimizer step each, fed in micro-batches of `--per_device_train_batch_size`."""
    n = roll["full"].size(0)
    mini = n // args.num_mini_batches
    micro = args.per_device_train_batch_size
    for _ in range(args.ppo_epochs):
        perm = torch.randperm(n)
        for m in range(args.num_mini_batches):
            mb = perm[m * mini:(m + 1) * mini]
            for start in range(0, len(mb), micro):
                idx = mb[start:start + micro].to(roll["full"].device)
                yield {**{k: roll[k][idx] for k in ("full", "attention", "responses", "mask", "logprobs", "values")},
                       "advantages": advantages[idx], "returns": returns[idx]}


def _micro_batch_update(wrapper, accelerator, optimizer, scheduler, mb: dict, args, measure_start: bool) -> tuple:
    """Forward, clipped policy and value losses, backward; the optimizer steps where the
    accumulation ends. -> (logits, policy loss, value loss, their statistics, the start ratio or None)."""
    with accelerator.accumulate(wrapper):
        with accelerator.autocast():
            logits, values = wrapper(mb["full"], mb["attention"], args.response_length, args.temperature)
        new_logprobs = _token_logprobs(logits, mb["responses"])
        pg, pg_stats = core.policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mb["mask"], args.cliprange)
        start = _start_of_update(new_logprobs, mb, pg_stats) if measure_start else None
        vf, vf_stats = core.value_loss(values.float(), mb["values"], mb["returns"], mb["mask"], args.cliprange_value)
        accelerator.backward(pg + args.vf_coef * vf)
        _optimizer_step(wrapper, accelerator, optimizer, scheduler, args)
    return logits, pg, vf, {**pg_stats, **vf_stats}, start


def _start_of_update(new_logprobs, mb: dict, pg_stats: dict) -> dict:
    """No optimizer step yet on these rollouts: the ratio should be 1 everywhere."""
    with torch.no_grad():
        ratio = torch.exp((new_logprobs - mb["logprobs"]) * mb["mask"])
        return {"ratio_max_dev": ((ratio - 1).abs() * mb["mask"]).max().item(), "approx_kl": pg_stats["approx_kl"]}


def _optimizer_step(wrapper, accelerator, optimizer, scheduler, args) -> None:
    if accelerator.sync_gradients and args.max_grad_norm:
        accelerator.clip_grad_norm_(wrapper.parameters(), args.max_grad_norm)
    optimizer.step()
    if accelerator.sync_gradients and not optimizer.step_was_skipped:
        scheduler.step()  # once per optimizer step, whatever the number of processes
    optimizer.zero_grad()
