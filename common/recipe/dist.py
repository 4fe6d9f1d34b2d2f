"""Which process this is under torchrun / accelerate launch, and leaving the process group."""

from __future__ import annotations

import contextlib
import os
import sys


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def world_size() -> int:
    """Processes in this launch (torchrun and `accelerate launch` set WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Under torchrun / accelerate launch: destroys this process's group once its work is done.
    A gloo group left for the interpreter's exit to tear down can abort a finished process
    ("terminate called without an active exception", exit code -6, after every file was written),
    and NCCL warns that the group was never destroyed. Only after a finished run: after an error,
    Ctrl-C or a crash a peer may still be blocked in a collective (a full disk is found on the main
    process alone), and destroying an NCCL group then waits for it."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gathered(params, modify: bool = False):
    """A context in which weights that DeepSpeed ZeRO-3 has partitioned across processes are whole on
    every process (a collective: every process enters it), to read or save them; with `modify`,
    what the main process writes into them is partitioned again on leaving. Without ZeRO-3, nothing."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


@contextlib.contextmanager
def loaded_whole(deepspeed_plugin):
    """Under ZeRO-3: a model that is only run, never trained (a reward model that scores the
    policy's answers), loads whole on each process. Partitioned as it loaded, it would need a
    DeepSpeed engine of its own to gather its weights at every forward pass. `deepspeed_plugin`:
    the run's (accelerator.state's, or the trainer configuration's); None without DeepSpeed."""
    from common.model.precision import zero3_enabled

    if deepspeed_plugin is None or not zero3_enabled():
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed_plugin.set_deepspeed_weakref()  # the policy's ZeRO-3 settings again
