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
