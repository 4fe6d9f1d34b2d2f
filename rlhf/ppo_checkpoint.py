"""ppo.py's files on disk: the final outputs (policy adapter, value head, tokenizer, log history,
run_config.json), the checkpoint-N folders that hold the whole loop state (those plus optimizer,
scheduler, the adaptive KL coefficient, the prompt order and every process's random state), the
check that a `--resume_from_checkpoint` folder is one of ours, and resuming from it. The
Trainer's checkpointing does not apply: PPO runs its own loop, outside transformers' Trainer."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from common.flags.errors import UsageError, first_line
from common.recipe import outputs

log = logging.getLogger("finetune")


def _write_policy(unwrapped, tokenizer, folder: Path, history: list, extra_state: Optional[dict] = None) -> None:
    """Policy adapter (without the frozen reference copy), value head, tokenizer and log history."""
    from safetensors.torch import save_file

    unwrapped.policy.save_pretrained(str(folder), selected_adapters=["default"])
    head = unwrapped.value_head
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}, str(folder / "value_head.safetensors"))
    tokenizer.save_pretrained(str(folder))
    outputs.absolute_base_path(folder)
    # Written last: a checkpoint counts as complete once this file is whole.
    outputs.write_json(folder / "trainer_state.json", {"global_step": len(history), "log_history": history,
                                                  **({"ppo": extra_state} if extra_state else {})})


def save_final(unwrapped, tokenizer, target: Path, accelerator, history: list, config: dict) -> None:
    """The final outputs, staged, then moved into place with adapter_config.json and run_config.json last."""
    from common.recipe.dist import gathered

    accelerator.wait_for_everyone()
    with gathered(_saved_params(unwrapped)):  # every process takes part where ZeRO-3 splits them
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


def _saved_params(unwrapped) -> list:
    """The weights a checkpoint holds: the trained adapter and the value head."""
    return [p for p in unwrapped.parameters() if p.requires_grad]


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_{rank}.safetensors"


def save_checkpoint(unwrapped, tokenizer, folder: Path, accelerator, history: list, optimizer, scheduler,
                    loop_state: dict, generator, order: list, keep: Optional[int],
                    config: Optional[dict] = None, engine=None) -> None:
    """Everything the loop needs to go on: written into a hidden folder (every process adds its
    random state), then renamed to checkpoint-N in one step, so a kill never leaves half of one.
    Under DeepSpeed (`engine`), the optimizer state is split across the processes: each writes its
    part through DeepSpeed's own checkpoint (in `deepspeed/`), and a resume needs as many processes."""
    import torch

    from safetensors.torch import save_file

    from common.recipe.dist import gathered

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
    if engine is not None:
        engine.save_checkpoint(str(staging / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
                               exclude_frozen_parameters=True)
    with gathered(_saved_params(unwrapped)):
        if accelerator.is_main_process:
            if engine is None:
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


DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


def check_checkpoint(folder: Path) -> None:
    """Before any model loads: the checkpoint must be one that ppo.py wrote."""
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    missing = [n for n in ("value_head.safetensors", "scheduler.pt", "rng_state_0.safetensors")
               if not (folder / n).is_file()]
    if not (folder / "optimizer.pt").is_file() and not (folder / DEEPSPEED_DIR).is_dir():
        missing.append("optimizer.pt")
    if "ppo" not in state or missing:
        raise UsageError(f"`--resume_from_checkpoint` {folder}: not a ppo.py checkpoint (no PPO loop state"
                         f"{', no ' + ', '.join(missing) if missing else ''}); resume from a checkpoint-N that "
                         f"ppo.py wrote, or start from an adapter with `--model_id`.")


def _load_weights(folder: Path, unwrapped, optimizer, engine=None, loop: Optional[dict] = None) -> None:
    """Adapter, value head and optimizer state; a checkpoint of another shape stops the run with exit 2."""
    import torch

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from common.recipe.dist import gathered

    sharded = (folder / DEEPSPEED_DIR).is_dir()
    if sharded != (engine is not None):
        raise UsageError(f"`--resume_from_checkpoint` {folder}: written {'under' if sharded else 'without'} "
                         f"DeepSpeed, and this run is {'not ' if sharded else ''}under DeepSpeed; resume with the "
                         f"launch configuration the run started with.")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    try:
        with gathered(_saved_params(unwrapped), modify=True):
            result = set_peft_model_state_dict(unwrapped.policy, weights, adapter_name="default")
            unwrapped.value_head.load_state_dict({k: v.to(unwrapped.value_head.weight.dtype) for k, v in
                                                  load_file(str(folder / "value_head.safetensors")).items()})
        if engine is None:
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UsageError(f"`--resume_from_checkpoint` {folder}: its adapter does not fit this run "
                         f"({first_line(exc)}); resume with the flags the run started with.") from None
    if getattr(result, "unexpected_keys", None):
        raise UsageError(f"`--resume_from_checkpoint` {folder}: its adapter does not fit this run (unexpected "
                         f"weights such as {result.unexpected_keys[0]}); resume with the flags the run started with.")
    if engine is not None:
        _load_deepspeed_state(folder, engine, (loop or {}).get("zero_stage"))


def _load_deepspeed_state(folder: Path, engine, zero_stage: Optional[int]) -> None:
    """The optimizer state each process wrote of its own part (DeepSpeed reads its own files, with
    pickle: unlike ppo.py's own files, these are not read as tensors only)."""
    from common.recipe.dist import world_size

    parts = len(list((folder / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*optim_states.pt")))
    if parts != world_size():
        raise UsageError(f"`--resume_from_checkpoint` {folder}: written by {parts} DeepSpeed process(es), this run "
                         f"has {world_size()}; resume with `--num_processes {parts}`.")
    if zero_stage != engine.zero_optimization_stage():
        raise UsageError(f"`--resume_from_checkpoint` {folder}: written under ZeRO stage {zero_stage}, this run is "
                         f"under stage {engine.zero_optimization_stage()}; resume with the accelerate config the run "
                         f"started with.")
    try:
        path, _ = engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    except (RuntimeError, ValueError, KeyError, AssertionError, OSError) as exc:
        path, reason = None, first_line(exc)
    else:
        reason = "DeepSpeed found nothing to load"
    if path is None:
        raise UsageError(f"`--resume_from_checkpoint` {folder}: its DeepSpeed state does not fit this run "
                         f"({reason}); resume with the flags and launch configuration the run started with.")


def _load_random_state(folder: Path, loop: dict, generator, accelerator, num_prompts: int) -> list:
    """This process's random states (global, CUDA, the prompt-order generator); returns the prompt order."""
    import torch

    from safetensors.torch import load_file

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
    return order


def resume(folder: Path, unwrapped, optimizer, scheduler, kl_ctl, generator, accelerator,
           num_prompts: int, engine=None) -> tuple[list, list, dict]:
    """Loads a checkpoint-N of ours; returns (history, prompt order, loop state). Only tensors are
    read: safetensors, and torch files with `weights_only=True`, which unpickles nothing else;
    except under DeepSpeed, whose own optimizer files DeepSpeed reads itself (with pickle)."""
    import torch

    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    loop = state["ppo"]
    _load_weights(folder, unwrapped, optimizer, engine, loop)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    kl_ctl.value = loop["kl_coef"]
    order = _load_random_state(folder, loop, generator, accelerator, num_prompts)
    log.info("PPO resumes after step %d", state["global_step"])
    return state["log_history"], order, loop
