"""Output directories and checkpoints. The Trainer neither tells a complete checkpoint from one
cut off mid-write nor writes final outputs atomically, so this module decides which run a
directory holds, which checkpoints are complete, where a run resumes from, and writes final
outputs so that a crash never leaves a directory that looks finished."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

from common.flags.errors import UsageError
from common.flags.parser import ParsedArgs
from common.recipe.dist import is_main_process
from common.recipe.lock import lock_output_dir
from common.recipe.signals import resume_command

log = logging.getLogger("finetune")


RUN_CONFIG = "run_config.json"


# Output directory ----------------------------------------------------------------------------

def is_finished_run(path: str) -> bool:
    """A finished run has its final adapter (or model) and run_config.json in place."""
    p = Path(path)
    return (p / RUN_CONFIG).is_file() and ((p / "adapter_config.json").is_file() or (p / "config.json").is_file())


def prepare_output_dir(args: ParsedArgs, default: str) -> str:
    out = args.output_dir or default
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"`--output_dir` {out} is a file; choose a directory.")
    if is_finished_run(out) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise UsageError(f"`--output_dir` {out} already holds a finished run; pass `--overwrite_output_dir True` "
                         f"to replace it or choose another directory.")
    lock_output_dir(out)
    if not (args.overwrite_output_dir or args.resume_from_checkpoint):
        refuse_unfinished_run(args, out)
    return out


def refuse_unfinished_run(args: ParsedArgs, out: str) -> None:
    """A killed run's checkpoints are progress: the same command again would start from step 0, and
    rotation would then count the old, higher-numbered checkpoints as the newest and delete the new
    ones. Neither resuming nor starting over is assumed (the flags may have changed since): the user
    picks one, with the exact command to continue."""
    complete = [folder for _, folder in reversed(checkpoint_dirs(out)) if is_complete_checkpoint(folder)]
    if complete:
        raise UsageError(f"`--output_dir` {out} holds an unfinished run whose last complete checkpoint is "
                         f"{complete[0]}; pass `--overwrite_output_dir True` to start over (its checkpoints are "
                         f"deleted), or continue it with: {resume_command(args)}")


def clear_previous_run(out: str) -> None:
    """With --overwrite_output_dir: remove what an earlier run left, never unrelated files. Only the
    main process deletes (several deleting the same files would trip over each other)."""
    p = Path(out)
    if not is_main_process() or not p.is_dir() or not ((p / RUN_CONFIG).exists() or any(p.glob("checkpoint-*"))):
        return
    for child in p.iterdir():
        if child.name.startswith(("checkpoint-", "adapter_", "tokenizer", "special_tokens", "chat_template",
                                  "training_args", "trainer_state", "all_results", "train_results",
                                  "eval_results", "README.md", "runs", "plots", RUN_CONFIG, ".final",
                                  ".checkpoint-")):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def resolve_resume(args: ParsedArgs, out: str) -> Optional[str]:
    value = args.resume_from_checkpoint
    if not value:
        return None
    if value.lower() in ("auto", "true", "latest"):
        ckpt = last_complete_checkpoint(out)
        if ckpt is None:
            log.info("`--resume_from_checkpoint auto`: no checkpoint in %s yet; starting from scratch.", out)
        else:
            log.info("resuming from %s", ckpt)
        return ckpt
    if not os.path.isdir(value):
        raise UsageError(f"`--resume_from_checkpoint` {value}: no such checkpoint directory; use `auto` for the "
                         f"latest one in --output_dir.")
    if not is_complete_checkpoint(Path(value)):
        latest = last_complete_checkpoint(os.path.dirname(os.path.abspath(value)))
        hint = f"the latest complete one is {latest}" if latest else "there is no complete one next to it"
        raise UsageError(f"`--resume_from_checkpoint` {value}: the checkpoint is incomplete (cut off while being "
                         f"written?); {hint}, and `auto` picks it.")
    return value


# A checkpoint holds the weights under one of these names (PEFT adapter or full model, one file
# or shards with an index); the trainer writes them first and trainer_state.json last.
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_dirs(out: str) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder in `out`, oldest first."""
    p = Path(out)
    if not p.is_dir():
        return []
    steps = []
    for child in p.glob("checkpoint-*"):
        suffix = child.name.split("-", 1)[1]
        if suffix.isdigit() and child.is_dir():
            steps.append((int(suffix), child))
    return sorted(steps)


def last_complete_checkpoint(out: str) -> Optional[str]:
    """Newest checkpoint-N written to the end; newer ones cut off mid-write are skipped with a warning."""
    for _, child in reversed(checkpoint_dirs(out)):
        if is_complete_checkpoint(child):
            return str(child)
        log.warning("skipping %s: incomplete (cut off while being written).", child)
    return None


def is_complete_checkpoint(folder: Path) -> bool:
    """Valid trainer_state.json, the weights, and every torch file (optimizer, scheduler, RNG) whole."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or truncated mid-write
        return False
    present = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    # FSDP's sharded state dicts are folders of per-rank files, not checked further.
    sharded = [d for d in folder.glob("pytorch_model_fsdp*") if d.is_dir() and any(d.iterdir())]
    if not (present or sharded) or not all(_weights_whole(path) for path in present):
        return False
    if missing_rng_states(folder):
        return False
    # torch.save writes zip archives, whose directory sits at the end: a cut-off file has none.
    return all(zipfile.is_zipfile(f) for f in folder.iterdir() if f.suffix in (".pt", ".pth", ".bin"))


_RNG_FILE = re.compile(r"rng_state_(\d+)\.(pth|safetensors)$")


def missing_rng_states(folder: Path) -> list[str]:
    """Each process of a multi-process run writes its own rng_state_<rank> file, and the main process
    does not wait for the others before trainer_state.json: without every one, a resumed run would
    draw different random numbers on the missing ranks. -> the names that are missing."""
    ranks = {int(m.group(1)): m.group(2) for f in folder.iterdir() if (m := _RNG_FILE.match(f.name))}
    if not ranks:
        return []
    expected = max(recorded_world_size(folder) or 0, max(ranks) + 1)
    suffix = next(iter(ranks.values()))
    return [f"rng_state_{r}.{suffix}" for r in range(expected) if r not in ranks]


def recorded_world_size(folder: Path) -> Optional[int]:
    """The process count a checkpoint was written with, where the writer recorded it."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        recorded = (state.get("stateful_callbacks", {}).get(RESUME_STATE, {}).get("attributes", {}).get("world_size")
                    or state.get("ppo", {}).get("num_processes"))
        return int(recorded) if recorded else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


# The name under which the trainer callback of common.recipe.training records, in trainer_state.json, what
# the trainer itself does not keep (process count, the loss summed so far).
RESUME_STATE = "ResumeState"


def rotate_checkpoints(out: str, keep: Optional[int]) -> list[Path]:
    """`--save_total_limit`: keep the newest `keep` complete checkpoints; incomplete ones older than the
    newest complete one (a lower step, or last written before it) can never be resumed from and go as
    well. A newer incomplete one stays: it may still be being written. Main process only. -> the
    folders removed."""
    if not keep or keep <= 0 or not is_main_process():
        return []
    checkpoints = checkpoint_dirs(out)
    complete = [(step, d) for step, d in checkpoints if is_complete_checkpoint(d)]
    if not complete:
        return []
    newest, written = complete[-1][0], _mtime(complete[-1][1] / "trainer_state.json")
    doomed = [d for _, d in complete[:-keep]]
    doomed += [d for step, d in checkpoints if (step, d) not in complete and (step < newest or _mtime(d) < written)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return sorted(doomed)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _weights_whole(path: Path) -> bool:
    if path.name.endswith(".index.json"):
        try:
            shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return bool(shards) and all(_weights_whole(path.parent / shard) for shard in shards)
    if path.suffix == ".safetensors":
        return _safetensors_whole(path)
    return zipfile.is_zipfile(path)


def _safetensors_whole(path: Path) -> bool:
    """The header (8-byte length + JSON) says where the last tensor ends: the file must end there."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + length > size:
                return False
            header = json.loads(fh.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return size == 8 + length + end


# Saving --------------------------------------------------------------------------------------

def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_final(trainer, tokenizer, out: str, config: dict[str, Any], drop_adapters: tuple = ()) -> None:
    """Writes adapter + tokenizer + run_config.json so that a crash never leaves a directory that
    looks finished: everything goes to a temporary folder first, adapter_config.json last."""
    final = Path(out)
    staging = final / ".final.tmp"
    # Only the main process clears the staging folder, and every process waits for that: a slower
    # rank that cleared it too could delete what a faster main process is writing there.
    if trainer.accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every process: FSDP and DeepSpeed gather the weights
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(staging))
        for name in drop_adapters:  # helper adapters (DPO's frozen reference copy) are not the result
            if (staging / name / "adapter_config.json").is_file():
                shutil.rmtree(staging / name)
        absolute_base_path(staging)
        write_json(staging / RUN_CONFIG, config)
        move_into_place(staging, final)
    trainer.accelerator.wait_for_everyone()


def move_into_place(staging: Path, final: Path) -> None:
    """Moves a staged run's files into `final` with adapter_config.json and run_config.json last, the
    two that make a directory look finished; then removes the staging folder."""
    names = sorted(p.name for p in staging.iterdir())
    last = [n for n in (RUN_CONFIG, "adapter_config.json") if n in names]
    for name in [n for n in names if n not in last] + last:
        target = final / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)


def absolute_base_path(folder: Path) -> None:
    """Record a local base model by absolute path, so the adapter loads from any working dir."""
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    base = cfg.get("base_model_name_or_path")
    if base and os.path.isdir(base) and not os.path.isabs(base):
        cfg["base_model_name_or_path"] = os.path.abspath(base)
        write_json(cfg_path, cfg)


# What each writer raises when the device is full (seen on a full tmpfs): Python's own files an OSError
# (ENOSPC, or EDQUOT over a quota); safetensors a SafetensorError "... No space left on device (os error
# 28)"; torch.save's zip writer a RuntimeError ("unexpected pos ..." after "basic_ios::clear: iostream
# error", or "file write failed") that does not say why. Where no file is named, the free space of the
# output dir's device decides (a full /dev/shm says "No space left on device" too).
_NO_SPACE = re.compile(r"no space left on device|disk quota exceeded|os error (28|122)\b|iostream error|"
                       r"file write failed|unexpected pos", re.IGNORECASE)
FULL_BELOW = 64 * 2**20  # bytes: a writer that failed on a full device leaves less than this free


def is_disk_full(exc: BaseException, out: str = ".") -> bool:
    """Whether `exc` (or an error it was raised from or while handling) says the device of `out` is full."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e.filename is None or _existing(e.filename).stat().st_dev == _existing(out).stat().st_dev
    return any(_NO_SPACE.search(str(e)) for e in chain) and free_space(out) < FULL_BELOW


def free_space(path: str) -> int:
    """Bytes this user may still write on the device of `path`."""
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return 0


def _existing(path) -> Path:
    """`path`, or its nearest parent that exists."""
    p = Path(os.fsdecode(path)).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_full_error(out: str, resume: str) -> UsageError:
    """One line for a save that ran out of space: what is intact and the command that finishes. What
    the failed save left (a staged final output, PPO's staged checkpoint, a checkpoint-N cut off
    mid-write) is removed: it can never be resumed from, and its space is needed to finish."""
    latest = last_complete_checkpoint(out)
    if is_main_process():
        folder = Path(out)
        partial = [folder / ".final.tmp", *folder.glob(".checkpoint-*.tmp")]
        newest = int(Path(latest).name.split("-", 1)[1]) if latest else -1
        partial += [d for step, d in checkpoint_dirs(out) if step > newest]
        for leftover in partial:
            shutil.rmtree(leftover, ignore_errors=True)
    kept = (f"the last complete checkpoint {latest} is intact" if latest else
            "no checkpoint was complete yet, so the run starts again from step 0")
    return UsageError(f"no space left on the device of {os.path.abspath(out)}; {kept}. Free space, then finish "
                      f"the run with: {resume}")
