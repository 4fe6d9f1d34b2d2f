"""Faults around the output directory: a rerun after a kill never discards the killed run's
progress, a save that runs out of space (at any kind of save) ends in one line with the command
that finishes the run, and weights that are no longer finite are never saved as if finished."""

import errno
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from common.recipe.outputs import is_complete_checkpoint, is_finished_run, last_complete_checkpoint
from tests.helpers import run_script

FAST = ["--dataset_name", "triviaqa-sample", "--max_train_samples", "32", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--report_to", "none", "--learning_rate", "1e-2"]
PPO = ["--reward_function", "triviaqa_f1", "--response_length", "4", "--per_device_train_batch_size", "4",
       "--num_mini_batches", "2", "--dataset_name", "triviaqa-sample", "--max_train_samples", "10", "--report_to",
       "none", "--learning_rate", "3e-3"]


def _error_lines(err: str, script: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{script}: error:")]


def _command(line: str, marker: str) -> list[str]:
    """The command a message prints after `marker`, as argv for run_script (script name dropped)."""
    return shlex.split(line.split(marker, 1)[1])


def _state(folder) -> dict:
    return json.loads((Path(folder) / "trainer_state.json").read_text())


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(folder / "adapter_model.safetensors")
    if (folder / "value_head.safetensors").is_file():
        weights.update({f"value_head.{k}": v for k, v in load_file(folder / "value_head.safetensors").items()})
    return weights


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)


# A rerun without --resume_from_checkpoint ------------------------------------------------------

def _killed_copy(reference: Path, out: Path, steps: dict[int, int]) -> None:
    """What a run killed after the checkpoints named by the values of `steps` leaves: those
    checkpoints (copied from the reference's checkpoint of each key), no final outputs."""
    out.mkdir(parents=True)
    for step, name in steps.items():
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{name}")


@pytest.mark.parametrize("script", ["lora.py", "ppo.py"])
def test_rerun_after_a_kill_stops_with_the_resume_command_which_equals_the_uninterrupted_run(
        script, tiny_llama, tmp_path, capsys):
    extra = PPO if script == "ppo.py" else FAST
    argv = ["--model_id", tiny_llama, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", *extra]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert run_script(script, argv + ["--output_dir", reference]) == 0
    _killed_copy(reference, out, {2: 2})
    capsys.readouterr()

    # The same command again: no restart over the killed run's progress.
    assert run_script(script, argv + ["--output_dir", out]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err, script)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"last complete checkpoint is {out / 'checkpoint-2'}" in lines[0], lines[0]
    assert "`--overwrite_output_dir True` to start over" in lines[0], lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # nothing written or removed
    assert is_complete_checkpoint(out / "checkpoint-2") and not is_finished_run(out)

    # The command it prints finishes the run as if it had never been killed.
    command = _command(lines[0], "continue it with: ")
    assert command[:2] == ["python", script] and command[-2:] == ["--resume_from_checkpoint", "auto"]
    assert run_script(script, command[2:]) == 0
    assert is_finished_run(out) and _state(out)["global_step"] == 4
    _assert_same_weights(out, reference)


@pytest.mark.parametrize("script", ["lora.py", "ppo.py"])
def test_overwrite_output_dir_starts_over_and_keeps_the_new_runs_checkpoints(script, tiny_llama, tmp_path):
    # The killed run got further (checkpoint-8) than the new run goes (3 steps): rotation must not
    # count the killed run's checkpoints as the newest, and none of them may stay.
    extra = PPO if script == "ppo.py" else FAST
    argv = ["--model_id", tiny_llama, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2",
            "--save_total_limit", "2", *extra]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert run_script(script, argv + ["--output_dir", reference]) == 0
    _killed_copy(reference, out, {2: 8})
    assert run_script(script, argv + ["--output_dir", out, "--overwrite_output_dir", "True"]) == 0
    assert is_finished_run(out) and _state(out)["global_step"] == 3
    kept = sorted(p.name for p in reference.glob("checkpoint-*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == kept and kept
    for name in kept:
        _assert_same_weights(out / name, reference / name)
    _assert_same_weights(out, reference)


# Disk full at each kind of save ------------------------------------------------------------------

def _torch_write_error() -> RuntimeError:
    """What torch.save raised on a full tmpfs: the zip writer's error, raised while handling the stream's."""
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        except RuntimeError as exc:
            return exc


def _no_space(kind: str, path: Path) -> Exception:
    if kind == "safetensors":
        from safetensors import SafetensorError

        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    if kind == "torch":
        return _torch_write_error()
    return OSError(errno.ENOSPC, "No space left on device", str(path))


# The first bytes each writer had written when the device filled up.
PARTIAL = {"safetensors": (4096).to_bytes(8, "little") + b'{"base_model.model.model.layers.0',
           "torch": b"PK\x03\x04" + b"\0" * 60, "json": b'{\n  "best_global_step": nu'}


def _fill_disk_at(monkeypatch, name: str, folder: str) -> list:
    """The write of `folder/name` fails as it does on a full device: part of the file is written, then
    its writer raises what it raises there, and the device reads as full from then on. -> [the path]
    once it has failed."""
    import peft.peft_model
    import safetensors.torch
    from transformers.trainer_callback import TrainerState

    from common.recipe import callbacks, outputs

    hit, free_space = [], outputs.free_space

    def failing(original, kind: str, index: int):
        def writer(*args, **kwargs):
            target = args[index]
            if isinstance(target, (str, Path)) and Path(target).name == name and Path(target).parent.name == folder \
                    and not hit:
                hit.append(Path(target))
                Path(target).write_bytes(PARTIAL[kind])
                raise _no_space(kind, Path(target))
            return original(*args, **kwargs)
        return writer

    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing(peft.peft_model.safe_save_file, "safetensors", 1))
    monkeypatch.setattr(safetensors.torch, "save_file", failing(safetensors.torch.save_file, "safetensors", 1))
    monkeypatch.setattr(torch, "save", failing(torch.save, "torch", 1))
    monkeypatch.setattr(TrainerState, "save_to_json", failing(TrainerState.save_to_json, "json", 1))
    monkeypatch.setattr(outputs, "write_json", failing(outputs.write_json, "json", 0))
    monkeypatch.setattr(callbacks, "write_json", failing(callbacks.write_json, "json", 0))
    monkeypatch.setattr(outputs, "free_space", lambda path: 0 if hit else free_space(path))
    return hit


def _assert_one_line_then_the_command_finishes(script, out, reference, last, hit, err, monkeypatch):
    assert hit, "the fault was never injected"
    lines = _error_lines(err, script)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"no space left on the device of {out}" in lines[0], lines[0]
    assert (f"the last complete checkpoint {out / last} is intact" if last else "starts again") in lines[0], lines[0]
    # The save cut off is never taken as complete, and what it left is gone (its space is needed).
    assert last_complete_checkpoint(out) == (str(out / last) if last else None)
    assert not is_finished_run(out) and not hit[0].parent.exists()

    monkeypatch.undo()  # space freed
    command = _command(lines[0], "finish the run with: ")
    assert command[:2] == ["python", script] and command[-2:] == ["--resume_from_checkpoint", "auto"]
    assert run_script(script, command[2:]) == 0
    assert is_finished_run(out) and _state(out)["global_step"] == _state(reference)["global_step"]
    _assert_same_weights(out, reference)


SFT_SAVES = ["--model_id", "{model}", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", *FAST]


@pytest.fixture(scope="module")
def sft_reference(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("disk") / "reference"
    assert run_script("lora.py", [a.format(model=tiny_llama) for a in SFT_SAVES] + ["--output_dir", out]) == 0
    return out


@pytest.mark.parametrize("name,folder,last", [
    ("adapter_model.safetensors", "checkpoint-4", "checkpoint-2"),
    ("optimizer.pt", "checkpoint-4", "checkpoint-2"),
    ("scheduler.pt", "checkpoint-4", "checkpoint-2"),
    ("rng_state.pth", "checkpoint-4", "checkpoint-2"),
    ("trainer_state.json", "checkpoint-4", "checkpoint-2"),
    ("run_config.json", "checkpoint-4", "checkpoint-2"),
    ("optimizer.pt", "checkpoint-2", None),  # the first checkpoint
    ("adapter_model.safetensors", ".final.tmp", "checkpoint-4"),  # the final save
])
def test_disk_full_at_any_trainer_save_is_one_line_and_the_command_finishes_the_run(
        name, folder, last, sft_reference, tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    hit = _fill_disk_at(monkeypatch, name, folder)
    assert run_script("lora.py", [a.format(model=tiny_llama) for a in SFT_SAVES] + ["--output_dir", out]) == 2
    _assert_one_line_then_the_command_finishes("lora.py", out, sft_reference, last, hit, capsys.readouterr().err,
                                               monkeypatch)


PPO_SAVES = ["--model_id", "{model}", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", *PPO]


@pytest.fixture(scope="module")
def ppo_reference(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("disk") / "ppo-reference"
    assert run_script("ppo.py", [a.format(model=tiny_llama) for a in PPO_SAVES] + ["--output_dir", out]) == 0
    return out


@pytest.mark.parametrize("name,folder,last", [
    ("value_head.safetensors", ".checkpoint-2.tmp", "checkpoint-1"),
    ("optimizer.pt", ".checkpoint-2.tmp", "checkpoint-1"),
    ("adapter_model.safetensors", ".final.tmp", "checkpoint-2"),
])
def test_disk_full_at_any_ppo_save_is_one_line_and_the_command_finishes_the_run(
        name, folder, last, ppo_reference, tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    hit = _fill_disk_at(monkeypatch, name, folder)
    assert run_script("ppo.py", [a.format(model=tiny_llama) for a in PPO_SAVES] + ["--output_dir", out]) == 2
    _assert_one_line_then_the_command_finishes("ppo.py", out, ppo_reference, last, hit, capsys.readouterr().err,
                                               monkeypatch)


def test_disk_full_is_recognised_from_each_writers_error_and_nothing_else(tmp_path, monkeypatch):
    from common.recipe import outputs

    out = str(tmp_path)
    assert outputs.is_disk_full(_no_space("json", tmp_path / "x"), out)  # names a file on the output dir's device
    assert outputs.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), out)
    assert not outputs.is_disk_full(OSError(errno.EACCES, "Permission denied"), out)
    # safetensors and torch.save name no file: the output dir's device must be full.
    shm = RuntimeError("unable to write to file </torch_5_1234_0>: No space left on device (28)")  # /dev/shm full
    for free, full in ((10 * 2**30, False), (4096, True)):
        monkeypatch.setattr(outputs, "free_space", lambda path: free)
        assert outputs.is_disk_full(_no_space("safetensors", tmp_path / "x"), out) == full
        assert outputs.is_disk_full(_torch_write_error(), out) == full
        assert outputs.is_disk_full(shm, out) == full
        assert not outputs.is_disk_full(RuntimeError("CUDA out of memory"), out)


# Weights that are no longer finite --------------------------------------------------------------

def _all_finite(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _weights(folder).values())


def _assert_nothing_non_finite_looks_finished(out: Path, err: str, script: str, step=None):
    lines = _error_lines(err, script)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "`--learning_rate`" in lines[0] and (step is None or f"at step {step}" in lines[0]), lines[0]
    assert not is_finished_run(out)
    for folder in out.glob("checkpoint-*"):  # what is left can be resumed from, and is finite
        assert is_complete_checkpoint(folder) and _all_finite(folder), folder


def _poison_in_step(monkeypatch, module, name: str, step: int) -> None:
    """After the `step`-th call of module.name (a training step), one trainable weight is NaN, as
    after an update that overflowed; the loss that step reports is still finite."""
    original, seen = getattr(module, name), []

    def poisoned(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(1)
        if len(seen) == step:
            model = args[0].model if hasattr(args[0], "model") else args[0]
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return result

    monkeypatch.setattr(module, name, poisoned)


@pytest.mark.parametrize("cause", ["--learning_rate inf", "NaN after the update"])
def test_weights_no_longer_finite_after_step_1_stop_the_run_before_any_save(cause, tiny_llama, tmp_path,
                                                                            monkeypatch, capsys):
    # Issue repro: `--learning_rate inf` exited 0 with an adapter of NaN; the loss guard sees it at step 2.
    from transformers import Trainer

    out = tmp_path / "run"
    argv = ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "1", *FAST, "--warmup_ratio", "0",
            "--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", "1"]
    if cause == "--learning_rate inf":
        argv += ["--learning_rate", "inf"]  # (refused before loading, if the flag checks come to refuse it)
    else:
        _poison_in_step(monkeypatch, Trainer, "training_step", 1)
    assert run_script("lora.py", argv) == 2
    _assert_nothing_non_finite_looks_finished(out, capsys.readouterr().err, "lora.py",
                                              1 if cause != "--learning_rate inf" else None)
    assert last_complete_checkpoint(out) is None


def test_weights_no_longer_finite_between_loss_logs_are_never_checkpointed(tiny_llama, tmp_path, monkeypatch,
                                                                           capsys):
    # The weights turn NaN in step 3; the loss is logged only every 10 steps, so the loss guard never
    # sees it: the checkpoint of step 4 (and the final save) must not be written from them.
    from transformers import Trainer

    _poison_in_step(monkeypatch, Trainer, "training_step", 3)
    out = tmp_path / "run"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "4", *FAST,
                                  "--logging_steps", "10", "--save_strategy", "steps", "--save_steps", "2"]) == 2
    _assert_nothing_non_finite_looks_finished(out, capsys.readouterr().err, "lora.py", 4)
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")


@pytest.mark.parametrize("step", [1, 2])
def test_ppo_weights_no_longer_finite_stop_the_run_before_any_save(step, tiny_llama, tmp_path, monkeypatch,
                                                                   capsys):
    # One minibatch, one epoch: the step's statistics come from before its update and are finite.
    from rlhf import ppo_loop

    _poison_in_step(monkeypatch, ppo_loop, "ppo_epochs", step)
    out = tmp_path / "run"
    assert run_script("ppo.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "2", *PPO,
                                 "--num_mini_batches", "1", "--ppo_epochs", "1", "--save_strategy", "steps",
                                 "--save_steps", "1"]) == 2
    _assert_nothing_non_finite_looks_finished(out, capsys.readouterr().err, "ppo.py", step)
    assert last_complete_checkpoint(out) == (str(out / "checkpoint-1") if step == 2 else None)
