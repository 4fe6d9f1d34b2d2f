"""PPO for question answering (TRL no longer ships a PPOTrainer; this one is ours).

One copy of the base weights serves three roles: the policy (a trainable LoRA adapter), the
reference (the same model with that adapter disabled, or, when starting from an SFT adapter, a
frozen copy of it) and the value function (a linear head on the policy's last hidden states).
Each step: sample answers to a batch of prompts, score them (verifiable TriviaQA reward or a
reward model), turn scores into per-token rewards with a KL penalty, estimate advantages with
GAE, then run clipped PPO updates for a few epochs. The arithmetic is in rlhf/ppo_core.py.

Checkpoints (`--save_strategy steps`, and one on Ctrl-C or SIGTERM) hold everything the loop needs
to go on as if never stopped: adapter, value head, optimizer and scheduler state, the adaptive KL
coefficient, the prompt order and every process's random state. `--resume_from_checkpoint auto`
continues from the newest complete one.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common.flags.groups import (DataArguments, LoraArguments, ModelArguments, PPOArguments, QuantizationArguments, TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags.errors import UsageError, format_flags
from common.flags.checks import check_common, check_ppo, reporters

log = logging.getLogger("finetune")

ARG_GROUPS = [ModelArguments, QuantizationArguments, DataArguments, LoraArguments, PPOArguments, TrainingArguments]
# Shared flags that have no meaning for PPO rollouts.
_UNUSED = ("completion_only_loss", "packing", "padding_free", "eval_strategy", "eval_steps",
           "eval_em_samples", "train_sampling_strategy", "neftune_noise_alpha", "use_liger_kernel", "max_seq_length")


def make_parser() -> FlagParser:
    return FlagParser(ARG_GROUPS, hidden=_UNUSED, prog="ppo.py", defaults={"learning_rate": 1e-4, "max_steps": 100,
                                                           "per_device_train_batch_size": 8, "logging_steps": 1},
                      description="PPO with LoRA on TriviaQA-style prompts, rewarded by a reward model "
                                  "(reward_model.py) or by exact match / F1 against the gold answers.")


def parse(argv: Optional[list[str]]) -> ParsedArgs:
    args = make_parser().parse(argv)
    check_common(args)
    check_ppo(args)
    if args.reward_function:
        from rlhf.rewards import get_reward_function

        get_reward_function(args.reward_function)  # unknown names stop here, before any model loads
    ignored = sorted(n for n in args.explicit if n in _UNUSED)
    if ignored:
        log.warning("ppo.py ignores flags that do not apply to PPO: %s.", format_flags(ignored))
    return args


@dataclass
class PPOResult:
    output_dir: str
    history: list
    summary: dict
    policy: object


def train(argv: Optional[list[str]] = None) -> PPOResult:
    return run_ppo(parse(argv))


def main(argv: Optional[list[str]] = None) -> int:
    from common.recipe.cli import run_cli

    return run_cli("ppo.py", lambda: train(argv))


# The model: policy + reference + value head on one set of base weights -----------------------

def _policy_and_value(policy, hidden_size: int):
    import torch

    class PolicyAndValue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.policy = policy
            self.value_head = torch.nn.Linear(hidden_size, 1)
            torch.nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden_size + 1))
            torch.nn.init.zeros_(self.value_head.bias)
            forward = policy.get_base_model().forward
            self.keeps_logits = "logits_to_keep" in inspect.signature(forward).parameters

        def forward(self, input_ids, attention_mask, response_length: int, temperature: float):
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            # The vocabulary projection only where answer tokens are predicted: with a 128k-token
            # vocabulary, logits for the prompt too would be most of the activation memory.
            keep = {"logits_to_keep": response_length + 1} if self.keeps_logits else {}
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              output_hidden_states=True, use_cache=False, **keep)
            logits = out.logits[:, -response_length - 1:-1].float() / temperature
            hidden = out.hidden_states[-1][:, -response_length - 1:-1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
            return logits, values

    return PolicyAndValue()


# The run -------------------------------------------------------------------------------------

def run_ppo(args: ParsedArgs) -> PPOResult:
    from common.data import prompts
    from common.data import qa
    from common.recipe import outputs
    from common.recipe import reporting
    from common.recipe import run_config
    from common.recipe import signals
    from common.recipe import summary
    from common.recipe import training
    from common.model.source import inherit_from_adapter, resolve_model

    out = outputs.prepare_output_dir(args, default="outputs/ppo")
    resume = outputs.resolve_resume(args, out)
    if resume:
        _check_checkpoint(Path(resume))
    source = resolve_model(args.model_id)
    inherit_from_adapter(args, source)
    data = qa.load_qa_data(args, need_eval=False)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from common.model.loading import count_parameters, enable_checkpointing, is_quantized, load_model, load_tokenizer
    from common.model.precision import select_precision
    from common.model.adapters import attach_adapter
    from rlhf import ppo_core as core
    from rlhf.policy_model import disable_dropout, sample_from_the_policy_only
    from rlhf.rewards import RewardModelScorer, get_reward_function

    precision = select_precision(args)
    trackers = [r for r in reporters(args.report_to) if r != "none"]
    report_to = reporting.setup_reporting(args, out)
    from common.recipe.config import cuda_available, mps_available

    accelerator = Accelerator(mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(precision.mode, "no"),
                              cpu=not cuda_available() and not mps_available(),  # several CPU processes form one gloo group
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=trackers or None, project_dir=out)
    set_seed(args.seed + accelerator.process_index)

    # Model & tokenizer
    tokenizer = load_tokenizer(source, args)
    fmt = prompts.prompt_format(args, tokenizer, data.schema)
    model = load_model(source, args, precision, training=True)
    quantized = is_quantized(model)
    technique = "dora" if args.use_dora else ("qlora" if quantized else "lora")
    set_seed(args.seed)  # the new adapter's initial weights (and the value head) follow --seed
    policy = attach_adapter(technique, args, model, source)
    trainable, total = count_parameters(policy)
    if source.adapter_dir:  # the SFT model is the reference: keep a frozen copy of its adapter
        policy.load_adapter(source.adapter_dir, adapter_name="ref", is_trainable=False)
        policy.set_adapter("default")
    # Dropout off everywhere (also where gradient checkpointing puts layers in training mode), and
    # rollouts sampled from the policy's distribution alone, whatever generation_config.json says.
    disable_dropout(policy)
    sample_from_the_policy_only(policy)
    if args.gradient_checkpointing and not quantized:  # (4-bit bases have it from prepare_model_for_kbit_training)
        enable_checkpointing(policy.get_base_model(), {"use_reentrant": False})
    hidden = policy.get_base_model().config.get_text_config().hidden_size
    wrapper = _policy_and_value(policy, hidden)
    wrapper.eval()  # no dropout: rollout and update log-probs must agree
    set_seed(args.seed + accelerator.process_index)  # each process samples its own rollouts
    log.info("PPO (%s): %s trainable policy parameters of %s, plus a %d-wide value head", technique,
             f"{trainable:,}", f"{total:,}", hidden)

    # Reward
    if args.reward_model:
        scorer = RewardModelScorer(args.reward_model, tokenizer, args, accelerator.device)
        reward_name = f"reward model {args.reward_model}"
    else:
        reward_fn = get_reward_function(args.reward_function)
        reward_name = args.reward_function

    # Prompts: the ids SFT puts before the answer (and evaluation feeds the model): a BOS the
    # tokenizer adds in front stays, a [SEP] or EOS it appends does not.
    from common.evaluation.answers import prompt_ids as sft_prompt_ids

    questions = list(data.train["question"])
    prompts = [prompts.generation_prompt(q, fmt, tokenizer) for q in questions]
    prompt_ids = sft_prompt_ids(tokenizer, prompts, fmt.use_chat)
    # The reward model renders a conversation itself, as reward_model.py did in training.
    scored_prompts = [prompts.chat_messages(q, fmt) for q in questions] if fmt.use_chat else prompts
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > args.max_prompt_length]
    if too_long:
        raise UsageError(f"{len(too_long)} prompts of {data.source} are longer than `--max_prompt_length "
                         f"{args.max_prompt_length}` tokens (row {too_long[0]}: {len(prompt_ids[too_long[0]])}); "
                         f"raise the limit or filter the data.")
    aliases = list(data.train["aliases"])

    # Optimisation
    from transformers import get_scheduler

    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = _optimizer(args, params)
    rollouts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
    steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * len(prompts)
                                                                 / (rollouts_per_step * accelerator.num_processes)))
    updates = steps * args.ppo_epochs * args.num_mini_batches
    warmup = args.warmup_steps or int(args.warmup_ratio * updates)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=updates)
    # Not through accelerator.prepare: its scheduler steps once per process at every optimizer step
    # (made for data loaders whose batches grow with the processes), so with N processes the
    # schedule would end N times too early. It is stepped in _ppo_updates after each optimizer step.
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    if trackers:
        accelerator.init_trackers(args.run_name or Path(out).name, config=run_config.redact(args.to_dict(),
                                                                                   args.secret_fields()))
    unwrapped = accelerator.unwrap_model(wrapper)
    kl_ctl = core.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    from common.evaluation.answers import stop_token_ids

    stop_ids = stop_token_ids(tokenizer)
    reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None

    history: list[dict] = []
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    loop = {"cursor": 0, "seconds": {"sampling": 0.0, "scoring": 0.0, "optimisation": 0.0}, "runtime_s": 0.0,
            "num_processes": accelerator.num_processes}
    first_step = 1
    if resume:
        history, order, loop = _resume(Path(resume), unwrapped, optimizer, scheduler, kl_ctl, generator,
                                       accelerator, len(prompts))
        first_step = len(history) + 1
    cursor, seconds = loop["cursor"], loop["seconds"]
    start = time.perf_counter() - loop["runtime_s"]

    def checkpoint(step: int) -> Path:
        folder = Path(out) / f"checkpoint-{step}"
        state = {"cursor": cursor, "seconds": seconds, "runtime_s": time.perf_counter() - start,
                 "num_processes": accelerator.num_processes, "kl_coef": kl_ctl.value}
        _save_checkpoint(unwrapped, tokenizer, folder, accelerator, history, optimizer, scheduler, state,
                         generator, order, args.save_total_limit,
                         config=run_config.run_config(args, "ppo", {"model": {"base": source.base, "quantized": quantized},
                                                            "checkpoint": {"step": step}}))
        return folder

    def ppo_step(step: int) -> dict:
        nonlocal order, cursor
        # Rollouts
        if cursor + rollouts_per_step > len(order):
            order = torch.randperm(len(prompts), generator=generator).tolist()
            cursor = 0
        batch_idx = order[cursor:cursor + rollouts_per_step]
        cursor += rollouts_per_step
        t0 = _clock()
        roll = _rollout(unwrapped, accelerator, tokenizer, [prompt_ids[i] for i in batch_idx], args, stop_ids,
                        ref_adapter=bool(source.adapter_dir))
        responses = tokenizer.batch_decode(roll["responses"], skip_special_tokens=True)
        if args.reward_model:
            scores = scorer.score_answers([scored_prompts[i] for i in batch_idx], responses,
                                            roll["has_eos"].tolist())
        else:
            scores = reward_fn(responses, [aliases[i] for i in batch_idx])
        scores = torch.tensor(scores, dtype=torch.float32, device=accelerator.device)
        raw_scores = scores.clone()
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~roll["has_eos"]).float()
        mask = roll["mask"]
        rewards, kl = core.per_token_rewards(scores, roll["logprobs"], roll["ref_logprobs"], mask, kl_ctl.value)
        advantages, returns = core.gae(rewards, roll["values"], mask, args.gamma, args.lam)
        advantages = core.masked_whiten(advantages, mask, reduce=reduce)
        seconds["sampling"] += roll["sampling_s"]
        seconds["scoring"] += _clock() - t0 - roll["sampling_s"]

        # PPO updates
        t0 = _clock()
        stats = _ppo_epochs(wrapper, accelerator, optimizer, scheduler, roll, advantages, returns, args, core)
        seconds["optimisation"] += _clock() - t0

        # Statistics, across processes
        seq_kl = (kl.sum(dim=1))
        gathered = {
            "score": accelerator.gather(raw_scores).mean().item(),
            "kl": accelerator.gather(seq_kl).mean().item(),
            "response_length": accelerator.gather(mask.sum(1).float()).mean().item(),
            "eos_fraction": accelerator.gather(roll["has_eos"].float()).mean().item(),
        }
        kl_ctl.update(gathered["kl"], rollouts_per_step * accelerator.num_processes)
        first = stats.pop("first_microbatch")
        # Before the step's first optimizer update the policy is the one that sampled: ratio 1.
        gathered["start_ratio_max_dev"] = accelerator.gather(
            torch.tensor([first["ratio_max_dev"]], device=accelerator.device)).max().item()
        gathered["start_approx_kl"] = _mean_across(accelerator, first["approx_kl"])
        entry = {"step": step, **gathered, **{k: _mean_across(accelerator, v) for k, v in stats.items()},
                 "kl_coef": kl_ctl.value, "learning_rate": scheduler.get_last_lr()[0]}
        if not all(math.isfinite(v) for v in entry.values()):
            raise UsageError(f"PPO statistics became non-finite at step {step} ({entry}); lower `--learning_rate` "
                             f"or raise `--kl_coef`.")
        return entry

    from common.recipe.progress import PPO_LINE_KEYS, log_line, progress_bar

    bar = progress_bar(iterable=range(first_step, steps + 1), desc="PPO", initial=first_step - 1, total=steps,
                       disable=not accelerator.is_main_process)
    with signals.stop_requests() as stop:
        for step in bar:
            entry = ppo_step(step)
            history.append(entry)
            if step % args.logging_steps == 0 or step == steps:
                accelerator.log(entry, step=step)
                bar.set_postfix(score=f"{entry['score']:.3f}", kl=f"{entry['kl']:.3f}")
                if accelerator.is_main_process:
                    bar.write(log_line(entry, step, steps, PPO_LINE_KEYS), file=sys.stderr)
            saved = None
            if args.save_strategy == "steps" and step % args.save_steps == 0 and step < steps:
                saved = checkpoint(step)
            if signals.on_any_process(stop.requested, accelerator.device):  # every process stops at the same step
                bar.close()
                signals.announce_stop(args, step, saved or checkpoint(step), stop)

    runtime = time.perf_counter() - start
    info = {"steps": steps, "train_loss": None, "runtime_s": round(runtime, 2),
            "rollouts": steps * rollouts_per_step * accelerator.num_processes,
            "rollouts_per_s": round(steps * rollouts_per_step * accelerator.num_processes / runtime, 2),
            "time_generation_s": round(seconds["sampling"] + seconds["scoring"], 2),
            "time_sampling_s": round(seconds["sampling"], 2), "time_scoring_s": round(seconds["scoring"], 2),
            "time_optimisation_s": round(seconds["optimisation"], 2),
            "score_first": history[0]["score"], "score_last": history[-1]["score"],
            "peak_memory": summary.peak_memory(), "peak_memory_gib": round(summary.peak_memory_gib()[0], 3),
            "output_dir": os.path.abspath(out)}
    extra = {"model": {"base": source.base, "start_adapter": source.adapter_dir, "precision": precision.mode,
                       "quantized": quantized},
             "data": {"source": data.source, "schema": data.schema, "prompts": len(prompts), "chat_template":
                      fmt.use_chat},
             "reward": reward_name,
             "parameters": {"trainable": trainable, "total": total},
             "summary": info}
    if args.overwrite_output_dir:
        outputs.clear_previous_run(out)
    _save(unwrapped, tokenizer, Path(out), accelerator, history, run_config.run_config(args, "ppo", extra))
    if trackers:
        accelerator.end_training()
    reporting.finish_reporting(report_to)
    summary.write_plots(out)
    if accelerator.is_main_process:
        print("\n── PPO summary " + "─" * 40 +
              f"\n  steps        {steps} ({info['rollouts']} rollouts, {info['rollouts_per_s']} rollouts/s)"
              f"\n  score        {info['score_first']:.4f} -> {info['score_last']:.4f} ({reward_name})"
              f"\n  time         {runtime:.1f} s: generation {info['time_generation_s']:.1f} s (sampling "
              f"{info['time_sampling_s']:.1f} s, log-probs/values/reward {info['time_scoring_s']:.1f} s), "
              f"optimisation {info['time_optimisation_s']:.1f} s"
              f"\n  peak memory  {info['peak_memory']}"
              f"\n  written to   {info['output_dir']}  (policy adapter, value_head.safetensors, {outputs.RUN_CONFIG})",
              flush=True)
    training.push_when_asked(args, out)
    return PPOResult(output_dir=out, history=history, summary=info, policy=unwrapped.policy)


def _optimizer(args, params):
    import torch

    name = args.optimizer
    if "8bit" in name:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    if not name.startswith("adamw"):
        log.warning("ppo.py: `--optimizer %s` is not supported here; using AdamW.", name)
    fused = name == "adamw_torch_fused" and torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, fused=fused)


def _clock() -> float:
    """Seconds, after the GPU has finished what was queued (so time is charged to the right phase)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _rollout(unwrapped, accelerator, tokenizer, prompt_ids: list[list[int]], args, stop_ids, ref_adapter: bool):
    """Sample answers, then compute old log-probs, reference log-probs and values (no grad)."""
    import torch

    from rlhf.policy_model import NEUTRAL_SAMPLING

    device = accelerator.device
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, p in enumerate(prompt_ids):  # left padding
        ids[row, width - len(p):] = torch.tensor(p)
        attn[row, width - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    policy = unwrapped.policy
    t0 = _clock()
    with torch.no_grad(), accelerator.autocast():
        generated = policy.generate(input_ids=ids, attention_mask=attn, **NEUTRAL_SAMPLING,
                                    temperature=args.temperature, max_new_tokens=args.response_length,
                                    eos_token_id=stop_ids, pad_token_id=pad, use_cache=True)
    sampling_s = _clock() - t0
    responses = generated[:, width:]
    if responses.size(1) < args.response_length:
        fill = torch.full((responses.size(0), args.response_length - responses.size(1)), pad, device=device,
                          dtype=responses.dtype)
        responses = torch.cat([responses, fill], dim=1)
    # Real tokens: up to and including the first stop token.
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=device))
    stop_seen = torch.cumsum(is_stop.int(), dim=1)
    mask = ((stop_seen == 0) | (is_stop & (stop_seen == 1))).float()
    has_eos = is_stop.any(dim=1)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad))
    full = torch.cat([ids, responses], dim=1)
    full_attn = torch.cat([attn, mask.long()], dim=1)
    with torch.no_grad(), accelerator.autocast():
        logits, values = unwrapped(full, full_attn, args.response_length, args.temperature)
        logprobs = torch.gather(torch.log_softmax(logits, -1), 2, responses.unsqueeze(-1)).squeeze(-1)
        if ref_adapter:
            policy.set_adapter("ref", inference_mode=True)
            try:
                ref_logits, _ = unwrapped(full, full_attn, args.response_length, args.temperature)
            finally:
                policy.set_adapter("default")
        else:
            with policy.disable_adapter():
                ref_logits, _ = unwrapped(full, full_attn, args.response_length, args.temperature)
        ref_logprobs = torch.gather(torch.log_softmax(ref_logits, -1), 2, responses.unsqueeze(-1)).squeeze(-1)
    return {"full": full, "attention": full_attn, "responses": responses, "mask": mask, "has_eos": has_eos,
            "logprobs": logprobs.float() * mask, "ref_logprobs": ref_logprobs.float() * mask,
            "values": values.float() * mask, "sampling_s": sampling_s}


def _ppo_epochs(wrapper, accelerator, optimizer, scheduler, roll, advantages, returns, args, core) -> dict:
    with _checkpointing_layers(wrapper, on=args.gradient_checkpointing):
        return _ppo_updates(wrapper, accelerator, optimizer, scheduler, roll, advantages, returns, args, core)


@contextlib.contextmanager
def _checkpointing_layers(wrapper, on: bool):
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


def _ppo_updates(wrapper, accelerator, optimizer, scheduler, roll, advantages, returns, args, core) -> dict:
    import torch

    from rlhf.ppo_core import entropy_from_logits

    n = roll["full"].size(0)
    mini = n // args.num_mini_batches
    micro = args.per_device_train_batch_size
    sums: dict[str, list] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy",
                                             "value_clipfrac")}
    first = None
    for _ in range(args.ppo_epochs):
        perm = torch.randperm(n)
        for m in range(args.num_mini_batches):
            mb = perm[m * mini:(m + 1) * mini]
            for start in range(0, len(mb), micro):
                idx = mb[start:start + micro].to(roll["full"].device)
                with accelerator.accumulate(wrapper):
                    with accelerator.autocast():
                        logits, values = wrapper(roll["full"][idx], roll["attention"][idx], args.response_length,
                                                 args.temperature)
                    mask = roll["mask"][idx]
                    new_logprobs = torch.gather(torch.log_softmax(logits, -1), 2,
                                                roll["responses"][idx].unsqueeze(-1)).squeeze(-1)
                    pg, pg_stats = core.policy_loss(new_logprobs, roll["logprobs"][idx], advantages[idx], mask,
                                                    args.cliprange)
                    if first is None:  # no optimizer step yet on these rollouts
                        with torch.no_grad():
                            ratio = torch.exp((new_logprobs - roll["logprobs"][idx]) * mask)
                            first = {"ratio_max_dev": ((ratio - 1).abs() * mask).max().item(),
                                     "approx_kl": pg_stats["approx_kl"]}
                    vf, vf_stats = core.value_loss(values.float(), roll["values"][idx], returns[idx], mask,
                                                   args.cliprange_value)
                    loss = pg + args.vf_coef * vf
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(wrapper.parameters(), args.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients and not optimizer.step_was_skipped:
                        scheduler.step()  # once per optimizer step, whatever the number of processes
                    optimizer.zero_grad()
                with torch.no_grad():
                    sums["entropy"].append(core.masked_mean(entropy_from_logits(logits), mask).item())
                sums["policy_loss"].append(pg.item())
                sums["value_loss"].append(vf.item())
                for k, v in {**pg_stats, **vf_stats}.items():
                    sums[k].append(v)
    return {**{k: sum(v) / len(v) for k, v in sums.items() if v}, "first_microbatch": first}


def _mean_across(accelerator, value: float) -> float:
    import torch

    t = torch.tensor([value], device=accelerator.device)
    return accelerator.gather(t).mean().item()


def _write_policy(unwrapped, tokenizer, folder: Path, history: list, extra_state: Optional[dict] = None) -> None:
    """Policy adapter (without the frozen reference copy), value head, tokenizer and log history."""
    from safetensors.torch import save_file

    from common.recipe import outputs

    unwrapped.policy.save_pretrained(str(folder), selected_adapters=["default"])
    head = unwrapped.value_head
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}, str(folder / "value_head.safetensors"))
    tokenizer.save_pretrained(str(folder))
    outputs.absolute_base_path(folder)
    # Written last: a checkpoint counts as complete once this file is whole.
    outputs.write_json(folder / "trainer_state.json", {"global_step": len(history), "log_history": history,
                                                  **({"ppo": extra_state} if extra_state else {})})


def _save(unwrapped, tokenizer, target: Path, accelerator, history: list, config: dict) -> None:
    """The final outputs, staged, then moved into place with adapter_config.json and run_config.json last."""
    from common.recipe import outputs

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = target / ".final.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _write_policy(unwrapped, tokenizer, staging, history)
        outputs.write_json(staging / outputs.RUN_CONFIG, config)
        outputs.move_into_place(staging, target)
        for stale in target.glob(".checkpoint-*.tmp"):  # left by a run killed while saving a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


# Checkpoints and resuming ---------------------------------------------------------------------

def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_{rank}.safetensors"


def _save_checkpoint(unwrapped, tokenizer, folder: Path, accelerator, history: list, optimizer, scheduler,
                     loop_state: dict, generator, order: list, keep: Optional[int],
                     config: Optional[dict] = None) -> None:
    """Everything the loop needs to go on: written into a hidden folder (every process adds its
    random state), then renamed to checkpoint-N in one step, so a kill never leaves half of one."""
    import torch
    from safetensors.torch import save_file

    from common.recipe import outputs

    staging = folder.parent / f".{folder.name}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state(), "generator": generator.get_state(),
           "order": torch.tensor(order, dtype=torch.int64)}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state().cpu()
    save_file(rng, str(_rng_file(staging, accelerator.process_index)))
    if accelerator.is_main_process:
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        if config is not None:  # the run's prompt format travels with the checkpoint
            outputs.write_json(staging / outputs.RUN_CONFIG, config)
        _write_policy(unwrapped, tokenizer, staging, history, loop_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        outputs.rotate_checkpoints(str(folder.parent), keep)  # --save_total_limit: counts complete checkpoints only
    accelerator.wait_for_everyone()


def _check_checkpoint(folder: Path) -> None:
    """Before any model loads: the checkpoint must be one that ppo.py wrote."""
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    missing = [n for n in ("value_head.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.safetensors")
               if not (folder / n).is_file()]
    if "ppo" not in state or missing:
        raise UsageError(f"`--resume_from_checkpoint` {folder}: not a ppo.py checkpoint (no PPO loop state"
                         f"{', no ' + ', '.join(missing) if missing else ''}); resume from a checkpoint-N that "
                         f"ppo.py wrote, or start from an adapter with `--model_id`.")


def _resume(folder: Path, unwrapped, optimizer, scheduler, kl_ctl, generator, accelerator,
            num_prompts: int) -> tuple[list, list, dict]:
    """Loads a checkpoint-N of ours; returns (history, prompt order, loop state). Only tensors are
    read: safetensors, and torch files with `weights_only=True`, which unpickles nothing else."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    loop = state["ppo"]
    weights = load_file(str(folder / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(unwrapped.policy, weights, adapter_name="default")
        unwrapped.value_head.load_state_dict({k: v.to(unwrapped.value_head.weight.dtype) for k, v in
                                              load_file(str(folder / "value_head.safetensors")).items()})
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UsageError(f"`--resume_from_checkpoint` {folder}: its adapter does not fit this run "
                         f"({str(exc).splitlines()[0][:200]}); resume with the flags the run started with.") from None
    if getattr(result, "unexpected_keys", None):
        raise UsageError(f"`--resume_from_checkpoint` {folder}: its adapter does not fit this run (unexpected "
                         f"weights such as {result.unexpected_keys[0]}); resume with the flags the run started with.")
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    kl_ctl.value = loop["kl_coef"]

    rank_file = _rng_file(folder, accelerator.process_index)
    if loop.get("num_processes") != accelerator.num_processes or not rank_file.is_file():
        log.warning("the checkpoint was written by %s process(es), this run has %d: the run goes on, but its "
                    "rollouts will not be those of an uninterrupted run.", loop.get("num_processes"),
                    accelerator.num_processes)
        rank_file = _rng_file(folder, accelerator.process_index % max(1, loop.get("num_processes") or 1))
    rng = load_file(str(rank_file))
    order = rng["order"].tolist()
    if len(order) != num_prompts:
        raise UsageError(f"`--resume_from_checkpoint` {folder}: the run was training on {len(order)} prompts, "
                         f"the data now have {num_prompts}; resume with the same data and slicing flags.")
    torch.set_rng_state(rng["cpu"])
    generator.set_state(rng["generator"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    log.info("PPO resumes after step %d", state["global_step"])
    return state["log_history"], order, loop
