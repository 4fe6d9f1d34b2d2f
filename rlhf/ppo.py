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

This module holds the flags, `parse`, `main` and the order of the run (`run_ppo`: setup, loop,
finish) with the finish itself; what is built before the loop is in rlhf/ppo_setup.py, the loop's
steps (rollout, score, update, log, checkpoint) in rlhf/ppo_loop.py, checkpoint files and resuming
in rlhf/ppo_checkpoint.py.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common.flags.groups import (DataArguments, LoraArguments, ModelArguments, PPOArguments, QuantizationArguments,
                                 TrainingArguments)
from common.flags.parser import FlagParser, ParsedArgs
from common.flags import checks
from common.flags.checks import check_common, check_ppo

log = logging.getLogger("finetune")

ARG_GROUPS = [ModelArguments, QuantizationArguments, DataArguments, LoraArguments, PPOArguments, TrainingArguments]
# Shared flags that have no meaning for PPO rollouts.
UNUSED_FLAGS = ("completion_only_loss", "packing", "padding_free", "eval_strategy", "eval_steps",
                "eval_em_samples", "train_sampling_strategy", "neftune_noise_alpha", "use_liger_kernel", "max_seq_length",
                "lm_head_impl")


def make_parser() -> FlagParser:
    return FlagParser(ARG_GROUPS, hidden=UNUSED_FLAGS, prog="ppo.py", defaults={"learning_rate": 1e-4, "max_steps": 100,
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
    checks.warn_ignored(args, UNUSED_FLAGS, "PPO")
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

    return run_cli("ppo.py", lambda: train(argv), detach=True)


# The run ---------------------------------------------------------------------------------------

def run_ppo(args: ParsedArgs) -> PPOResult:
    inputs = check_inputs(args)  # before torch is imported: a mistake here is reported in a second
    from rlhf.ppo_loop import PPOLoop, train_loop
    from rlhf.ppo_setup import setup_ppo

    from common.recipe.training import disk_full_exits

    run = setup_ppo(args, *inputs)
    with disk_full_exits(args, run.out):  # at a checkpoint or the final save
        loop = PPOLoop(run)
        train_loop(loop)
        return finish(run, loop)


def check_inputs(args: ParsedArgs) -> tuple:
    """The recipe's first steps (output dir, model source), the checkpoint to resume (checked before
    any model loads), the data. -> (output dir, checkpoint or None, model source, data)."""
    from common.data import qa
    from common.recipe import outputs, pipeline
    from rlhf.ppo_checkpoint import check_checkpoint

    run = pipeline.begin(args, "ppo")
    resume = outputs.resolve_resume(args, run.out)
    if resume:
        check_checkpoint(Path(resume))
    data = qa.load_qa_data(args, need_eval=False)
    return run.out, resume, run.source, data


def finish(run, loop) -> PPOResult:
    """The summary, the final outputs, trackers and plots closed, the printed summary, the upload."""
    from common.recipe import reporting, run_config, summary, training
    from rlhf.ppo_checkpoint import save_final

    args, accelerator = run.args, run.accelerator
    runtime = time.perf_counter() - loop.start
    info = _summary(run, loop, runtime)
    extra = {"model": {"base": run.source.base, "start_adapter": run.source.adapter_dir,
                       "precision": run.precision.mode, "quantized": run.policy.quantized},
             "data": {"source": run.data.source, "schema": run.data.schema, "prompts": len(run.prompts.texts),
                      "chat_template": run.fmt.use_chat},
             "reward": run.reward.name,
             "parameters": {"trainable": run.policy.trainable, "total": run.policy.total},
             "summary": info}
    save_final(run.unwrapped, run.tokenizer, Path(run.out), accelerator, loop.history,
               run_config.run_config(args, "ppo", extra))
    if run.trackers:
        accelerator.end_training()
    reporting.finish_reporting(run.report_to)
    summary.write_plots(run.out)
    if accelerator.is_main_process:
        _print_summary(info, run.steps, runtime, run.reward.name)
    training.push_when_asked(args, run.out)
    return PPOResult(output_dir=run.out, history=loop.history, summary=info, policy=run.unwrapped.policy)


def _summary(run, loop, runtime: float) -> dict:
    from common.recipe import summary

    rollouts = run.steps * run.rollouts_per_step * run.accelerator.num_processes
    seconds, history = loop.seconds, loop.history
    return {"steps": run.steps, "train_loss": None, "runtime_s": round(runtime, 2),
            "rollouts": rollouts, "rollouts_per_s": round(rollouts / runtime, 2),
            "time_generation_s": round(seconds["sampling"] + seconds["scoring"], 2),
            "time_sampling_s": round(seconds["sampling"], 2), "time_scoring_s": round(seconds["scoring"], 2),
            "time_optimisation_s": round(seconds["optimisation"], 2),
            "score_first": history[0]["score"], "score_last": history[-1]["score"],
            "peak_memory": summary.peak_memory(), "peak_memory_gib": round(summary.peak_memory_gib()[0], 3),
            "output_dir": os.path.abspath(run.out)}


def _print_summary(info: dict, steps: int, runtime: float, reward_name: str) -> None:
    from common.recipe import outputs

    print("\n── PPO summary " + "─" * 40 +
          f"\n  steps        {steps} ({info['rollouts']} rollouts, {info['rollouts_per_s']} rollouts/s)"
          f"\n  score        {info['score_first']:.4f} -> {info['score_last']:.4f} ({reward_name})"
          f"\n  time         {runtime:.1f} s: generation {info['time_generation_s']:.1f} s (sampling "
          f"{info['time_sampling_s']:.1f} s, log-probs/values/reward {info['time_scoring_s']:.1f} s), "
          f"optimisation {info['time_optimisation_s']:.1f} s"
          f"\n  peak memory  {info['peak_memory']}"
          f"\n  written to   {info['output_dir']}  (policy adapter, value_head.safetensors, {outputs.RUN_CONFIG})",
          flush=True)
