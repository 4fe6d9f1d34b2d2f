"""Which process this is under torchrun / accelerate launch, and leaving the process group."""

from __future__ import annotations

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
