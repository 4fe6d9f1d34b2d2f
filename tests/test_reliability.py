"""Reliability: a killed run resumes where it left off, Ctrl-C saves a checkpoint and says how to
resume, half-written checkpoints are skipped, a diverging loss stops the run, and bad input of any
kind ends in one line and exit code 2, never a traceback."""

import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.flags.errors import UsageError
from common.recipe.lock import lock_output_dir, release_output_locks
from common.recipe.outputs import is_complete_checkpoint, is_finished_run, last_complete_checkpoint, resolve_resume
from tests.conftest import ROOT
from tests.helpers import losses, run_script, write_jsonl
from tests.test_data import Args as DataArgs

FAST = ["--dataset_name", "triviaqa-sample", "--max_train_samples", "64", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--report_to", "none", "--learning_rate", "1e-2"]

# Put on the PYTHONPATH of the training subprocesses below, never imported by pytest itself.
SITECUSTOMIZE = '''
import os, time

import torch

# The scripts attach the adapter before the trainer applies --seed, so two processes would start
# from different LoRA weights (test_same_seed_same_initial_adapter); a fixed torch seed at start-up
# lets one run be compared with another.
torch.manual_seed(0)

if os.environ.get("STEP_LOG"):
    from transformers import Trainer

    _training_step = Trainer.training_step

    def training_step(self, *args, **kwargs):
        with open(os.environ["STEP_LOG"], "a") as fh:
            fh.write(".")
        time.sleep(0.25)  # the tiny model runs ~50 steps/s: too fast to interrupt at a chosen point
        return _training_step(self, *args, **kwargs)

    Trainer.training_step = training_step
'''


def _start(tmp_path, script: str, argv: list, step_log=None) -> subprocess.Popen:
    """`python script ...` as a user runs it, from the repository root; stderr goes to a file."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(site)}
    if step_log is not None:
        env["STEP_LOG"] = str(step_log)
    stderr = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    proc.stderr_path = stderr
    return proc


def _stderr(proc) -> str:
    return proc.stderr_path.read_text(errors="replace")


def _wait_until(condition, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the test could interrupt it:\n"
                        f"{_stderr(proc)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def _state(folder) -> dict:
    return json.loads((Path(folder) / "trainer_state.json").read_text())


def _tokens_seen(folder) -> list[int]:
    """Cumulative input tokens at each logged step: equal sequences mean the same data order."""
    return [e["num_input_tokens_seen"] for e in _state(folder)["log_history"] if "loss" in e]


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


# Killed and resumed --------------------------------------------------------------------------

def _killed_after_checkpoint_4(tmp_path, script: str, argv: list, in_step: int = 0) -> tuple:
    """`script` run twice at once: to the end (the reference), and killed (SIGKILL) once checkpoint-4
    is complete (and, with `in_step`, once that step has begun).
    -> (reference dir, killed dir), the reference finished, the killed run not."""
    reference, out, steps = tmp_path / "reference", tmp_path / "killed", tmp_path / "steps.log"
    ref = _start(tmp_path, script, argv + ["--output_dir", reference])
    proc = _start(tmp_path, script, argv + ["--output_dir", out], step_log=steps)
    _wait_until(lambda: is_complete_checkpoint(out / "checkpoint-4") and steps.exists()
                and len(steps.read_text()) >= in_step, proc)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert ref.wait(timeout=300) == 0, _stderr(ref)[-3000:]
    assert not is_finished_run(out)
    return reference, out


def test_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(tiny_llama, tmp_path, capsys):
    argv = ["--model_id", tiny_llama, "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", *FAST]
    reference, out = _killed_after_checkpoint_4(tmp_path, "lora.py", argv)
    assert last_complete_checkpoint(out) == str(out / "checkpoint-4")
    # What a kill during the next save leaves behind: part of the weights and no trainer state.
    blob = (out / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    (out / "checkpoint-8").mkdir()
    (out / "checkpoint-8" / "adapter_model.safetensors").write_bytes(blob[:len(blob) // 2])

    assert run_script("lora.py", argv + ["--output_dir", out, "--resume_from_checkpoint", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoint-4'}" in err and f"skipping {out / 'checkpoint-8'}" in err

    assert _state(out)["global_step"] == _state(reference)["global_step"] == 12
    assert _tokens_seen(out) == _tokens_seen(reference)  # same batches in the same order after the resume
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    resumed, uninterrupted = _weights(out), _weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-5, rtol=1e-4)


def _tensorboard_curve(out, tag="train/loss") -> list[tuple[int, float]]:
    """The (step, value) points TensorBoard shows for `tag`: its own reader, over every event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in (out / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, f"TensorBoard shows {len(runs)} runs: {sorted(p.name for p in runs)}"
    reader = EventAccumulator(str(runs[0]))
    reader.Reload()
    return [(e.step, e.value) for e in reader.Scalars(tag)]


def test_killed_run_resumed_shows_one_tensorboard_curve_equal_to_the_uninterrupted_one(tiny_llama, tmp_path):
    """The killed run logged steps past checkpoint-4 before it died; the resumed run logs them again.
    TensorBoard shows one run whose loss curve is the uninterrupted run's, step for step."""
    argv = ["--model_id", tiny_llama, "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", *FAST,
            "--logging_steps", "3", "--eval_strategy", "steps", "--eval_steps", "6", "--max_eval_samples", "4",
            "--report_to", "tensorboard"]
    # Killed in step 7: checkpoint-4 is its last, and step 6's loss is already in its events.
    reference, out = _killed_after_checkpoint_4(tmp_path, "lora.py", argv, in_step=7)
    assert last_complete_checkpoint(out) == str(out / "checkpoint-4")
    assert [step for step, _ in _tensorboard_curve(out)] == [3, 6]
    assert run_script("lora.py", argv + ["--output_dir", out, "--resume_from_checkpoint", "auto"]) == 0
    expected, got = _tensorboard_curve(reference), _tensorboard_curve(out)
    assert [step for step, _ in expected] == [step for step, _ in got] == [3, 6, 9, 12]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)
    # Evaluation during training and the final one after it (a writer opened again, purging nothing).
    expected, got = _tensorboard_curve(reference, "eval/loss"), _tensorboard_curve(out, "eval/loss")
    assert [step for step, _ in expected] == [step for step, _ in got] == [6, 12, 12]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_same_seed_same_initial_adapter(tiny_llama, tmp_path):
    # The first warm-up step has learning rate 0: the saved adapter is the initial one.
    argv = ["--model_id", tiny_llama, "--max_steps", "1", "--warmup_steps", "5", "--save_strategy", "no", *FAST]
    for name in ("a", "b"):
        assert run_script("lora.py", argv + ["--output_dir", tmp_path / name]) == 0
    first, second = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)


# Ctrl-C --------------------------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_prints_the_resume_command_and_exits_130(tiny_llama, tmp_path, capsys):
    out, steps = tmp_path / "run", tmp_path / "steps.log"
    # --save_strategy no: the only checkpoint can come from the Ctrl-C.
    argv = ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "20", "--save_strategy", "no", *FAST]
    proc = _start(tmp_path, "lora.py", argv, step_log=steps)
    _wait_until(lambda: steps.is_file() and len(steps.read_text()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = _stderr(proc)
    assert "Traceback" not in err
    hints = [line for line in err.splitlines() if "--resume_from_checkpoint auto" in line]
    assert len(hints) == 1, err[-3000:]
    step = int(re.search(r"stopped at step (\d+)", hints[0]).group(1))
    assert 2 <= step < 20
    checkpoint = out / f"checkpoint-{step}"
    assert str(checkpoint) in hints[0]
    assert last_complete_checkpoint(out) == str(checkpoint) and _state(checkpoint)["global_step"] == step
    assert not is_finished_run(out)
    assert not (out / "adapter_config.json").exists() and not (out / "run_config.json").exists()

    # The printed command, run as printed, finishes the run from that checkpoint.
    command = shlex.split(hints[0].split("Resume with: ", 1)[1])
    assert command[:2] == ["python", "lora.py"] and command[-2:] == ["--resume_from_checkpoint", "auto"]
    assert run_script("lora.py", command[2:]) == 0
    assert f"resuming from {checkpoint}" in capsys.readouterr().err
    assert is_finished_run(out) and _state(out)["global_step"] == 20
    assert [e["step"] for e in _state(out)["log_history"] if "loss" in e] == list(range(1, 21))


def _ctrl_c_during_steps(monkeypatch, *calls: int, signum=signal.SIGINT) -> None:
    """Sends this process SIGINT (or `signum`) at the start of the given training_step calls (1-based)."""
    from transformers import Trainer

    original, seen = Trainer.training_step, []

    def training_step(self, *args, **kwargs):
        seen.append(1)
        for _ in range(calls.count(len(seen))):
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


@pytest.mark.parametrize("script", ["lora.py", "prefix_tuning.py", "dpo.py", "orpo.py", "kto.py", "simpo.py",
                                    "grpo.py", "reward_model.py"])
def test_ctrl_c_in_process_stops_after_the_step_and_the_hint_resumes(script, tiny_llama, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "run"
    argv = ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "6", "--save_strategy", "no", *FAST]
    if script == "grpo.py":
        argv += ["--reward_function", "triviaqa_f1", "--num_generations", "4", "--max_completion_length", "4"]
    handler = signal.getsignal(signal.SIGINT)
    _ctrl_c_during_steps(monkeypatch, 3)
    assert run_script(script, argv) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # restored for whatever runs next in this process
    err = capsys.readouterr().err
    assert "Traceback" not in err and last_complete_checkpoint(out) == str(out / "checkpoint-3")
    assert not is_finished_run(out)
    hint = next(line for line in err.splitlines() if "Resume with: " in line)
    assert hint.startswith(f"{script}: stopped at step 3;")
    command = shlex.split(hint.split("Resume with: ", 1)[1])
    assert command[:2] == ["python", script] and command[-2:] == ["--resume_from_checkpoint", "auto"]

    monkeypatch.undo()
    assert run_script(script, command[2:]) == 0
    assert f"resuming from {out / 'checkpoint-3'}" in capsys.readouterr().err
    assert is_finished_run(out) and _state(out)["global_step"] == 6


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    _ctrl_c_during_steps(monkeypatch, 2, 2)
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "6",
                                  "--save_strategy", "no", *FAST]) == 130
    assert signal.getsignal(signal.SIGINT) is handler
    err = capsys.readouterr().err
    assert "lora.py: interrupted." in err and "Resume with" not in err and "Traceback" not in err
    assert last_complete_checkpoint(out) is None and not is_finished_run(out)


@pytest.mark.parametrize("signals,code", [
    ((signal.SIGTERM,), 143),                # a notebook's stop button, a batch scheduler's pre-emption
    ((signal.SIGINT, signal.SIGTERM), 130),  # Ctrl-C under torchrun: the agent then sends its workers SIGTERM
])
def test_sigterm_saves_a_checkpoint_like_ctrl_c(signals, code, tiny_llama, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    out, original, seen = tmp_path / "run", Trainer.training_step, []

    def training_step(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 3:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    handler = signal.getsignal(signal.SIGTERM)
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "6",
                                  "--save_strategy", "no", *FAST]) == code
    assert signal.getsignal(signal.SIGTERM) is handler
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lora.py: stopped at step 3;" in err
    assert last_complete_checkpoint(out) == str(out / "checkpoint-3") and not is_finished_run(out)


def test_resume_command_keeps_the_users_flags_without_secrets_or_overwrite(tmp_path, monkeypatch):
    from common.recipe.signals import resume_command
    from sft.run import parse

    argv = ["--model_id", "m", "--output_dir", "o x", "--hub_token", "hf_SECRET", "--overwrite_output_dir",
            "--max_steps=5"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/lora.py", *argv])
    assert resume_command(parse("lora", argv)[1]) == \
        "python /somewhere/lora.py --model_id m --output_dir 'o x' --max_steps=5 --resume_from_checkpoint auto"

    # Set in a --config file, --overwrite_output_dir is turned off on the command line, which wins.
    config = tmp_path / "run.yaml"
    config.write_text("overwrite_output_dir: true\nmax_steps: 5\n")
    argv = ["--config", str(config), "--model_id", "m"]
    monkeypatch.setattr(sys, "argv", ["lora.py", *argv])
    command = shlex.split(resume_command(parse("lora", argv)[1]))
    assert command[-4:] == ["--overwrite_output_dir", "False", "--resume_from_checkpoint", "auto"]
    resumed = parse("lora", command[2:])[1]
    assert resumed.resume_from_checkpoint == "auto" and not resumed.overwrite_output_dir

    # Under torchrun / accelerate launch the hint relaunches with as many processes.
    monkeypatch.setattr(sys, "argv", ["lora.py", "--model_id", "m"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    args = parse("lora", ["--model_id", "m"])[1]
    assert resume_command(args) == "torchrun --nproc_per_node=4 lora.py --model_id m --resume_from_checkpoint auto"
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert resume_command(args).startswith("torchrun --nnodes=4 --nproc_per_node=4 lora.py")


# Checkpoints cut off while being written --------------------------------------------------

def _checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint as the trainer writes it: weights, optimizer and RNG state, trainer state last."""
    from safetensors.torch import save_file

    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"base_model.model.lora_A.weight": torch.randn(8, 64)}, str(ckpt / "adapter_model.safetensors"))
    (ckpt / "adapter_config.json").write_text("{}")
    torch.save({"state": {0: torch.randn(64)}}, ckpt / "optimizer.pt")
    torch.save({"python": 1}, ckpt / "rng_state.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}, indent=2))
    return ckpt


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


CUT_OFF = {
    "no trainer state": lambda c: (c / "trainer_state.json").unlink(),
    "trainer state cut off": lambda c: _truncate(c / "trainer_state.json"),
    "no weights": lambda c: (c / "adapter_model.safetensors").unlink(),
    "weights cut off": lambda c: _truncate(c / "adapter_model.safetensors"),
    "weights empty": lambda c: (c / "adapter_model.safetensors").write_bytes(b""),
    "optimizer cut off": lambda c: _truncate(c / "optimizer.pt"),
    "rng state empty": lambda c: (c / "rng_state.pth").write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(CUT_OFF))
def test_checkpoint_cut_off_while_written_is_skipped(damage, tmp_path):
    good = _checkpoint(tmp_path, 4)
    assert last_complete_checkpoint(tmp_path) == str(good)
    newer = _checkpoint(tmp_path, 8)
    assert last_complete_checkpoint(tmp_path) == str(newer)
    CUT_OFF[damage](newer)
    assert last_complete_checkpoint(tmp_path) == str(good)

    class Args:
        resume_from_checkpoint = "auto"

    assert resolve_resume(Args, str(tmp_path)) == str(good)
    Args.resume_from_checkpoint = str(newer)  # named explicitly: refused, pointing to the good one
    with pytest.raises(UsageError, match="incomplete") as err:
        resolve_resume(Args, str(tmp_path))
    assert str(newer) in str(err.value) and str(good) in str(err.value)


def test_full_model_and_sharded_checkpoints_are_checked_too(tmp_path):
    from safetensors.torch import save_file

    ckpt = _checkpoint(tmp_path, 2)
    (ckpt / "adapter_model.safetensors").rename(ckpt / "model.safetensors")
    assert last_complete_checkpoint(tmp_path) == str(ckpt)
    (ckpt / "model.safetensors").unlink()
    for i in (1, 2):
        save_file({f"w{i}": torch.randn(4)}, str(ckpt / f"model-0000{i}-of-00002.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}))
    assert last_complete_checkpoint(tmp_path) == str(ckpt)
    _truncate(ckpt / "model-00002-of-00002.safetensors")
    assert last_complete_checkpoint(tmp_path) is None

    for path in ckpt.glob("model*"):
        path.unlink()
    (ckpt / "pytorch_model_fsdp_0").mkdir()  # FSDP's sharded state dict
    assert last_complete_checkpoint(tmp_path) is None
    (ckpt / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard")
    assert last_complete_checkpoint(tmp_path) == str(ckpt)


# NaN guard -----------------------------------------------------------------------------------

@pytest.mark.parametrize("logging_steps,step", [(1, 2), (3, 3)])
def test_diverging_loss_stops_the_run_naming_the_step(logging_steps, step, tiny_llama, tmp_path, capsys):
    # A learning rate of 1e30 sends the weights to ~1e30 after one update: the next loss is not finite.
    out = tmp_path / "nan"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "6", *FAST,
                                  "--learning_rate", "1e30", "--warmup_ratio", "0", "--lr_scheduler_type", "constant",
                                  "--save_strategy", "no", "--logging_steps", logging_steps]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "lora.py: error:" in line]
    assert len(errors) == 1
    assert re.search(rf"loss became (nan|inf|-inf) at step {step};.*`--learning_rate`", errors[0]), errors[0]
    assert not is_finished_run(out)


# Malformed dataset rows (property-based) ------------------------------------------------------

def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


# Strings that are themselves JSON ("007", "1e3", "true") and floats next to ints are left out:
# test_text_keeps_its_value_in_columns_of_mixed_types shows what `datasets` does to them.
TEXTS = st.one_of(st.sampled_from(["", "   ", "Paris", " Rome "]), st.text(max_size=6).filter(_not_json))
WRONG = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.lists(TEXTS, max_size=2),
                  st.dictionaries(st.sampled_from(["x", "value"]), TEXTS, max_size=1))
ALIASES = st.one_of(st.lists(TEXTS, max_size=3), TEXTS, st.lists(st.one_of(TEXTS, st.integers()), max_size=2), WRONG)
NESTED = st.fixed_dictionaries({}, optional={"value": st.one_of(TEXTS, WRONG), "aliases": ALIASES,
                                             "normalized_value": TEXTS})
MALFORMED = st.fixed_dictionaries({}, optional={"question": st.one_of(TEXTS, WRONG),
                                                "answer": st.one_of(TEXTS, NESTED, WRONG),
                                                "aliases": ALIASES, "question_id": TEXTS})
NOT_JSON = st.sampled_from(['{"question": "a?", "answer": ', "not json", "[1, 2]", "null", "42", '"text"',
                            "{'question': 'a?'}", "", "   "])
GOOD_TEXT = st.one_of(st.text(min_size=1, max_size=8).filter(lambda t: t.strip() and _not_json(t)),
                      st.integers(0, 99))


def _good_row(nested: bool):
    aliases = st.lists(st.text(max_size=5).filter(_not_json), max_size=3)
    answer = st.fixed_dictionaries({"value": GOOD_TEXT}, optional={"aliases": aliases}) if nested else GOOD_TEXT
    return st.fixed_dictionaries({"question": GOOD_TEXT, "answer": answer},
                                 optional={} if nested else {"aliases": aliases})


@st.composite
def jsonl_lines(draw) -> list[str]:
    """Mostly rows that are fine on their own (all flat or all hub-style), some malformed rows and
    some lines that are not JSON objects: about half the files are entirely valid."""
    good = _good_row(nested=draw(st.booleans()))
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 9))
        lines.append(json.dumps(draw(good)) if kind < 8 else
                     json.dumps(draw(MALFORMED)) if kind == 8 else draw(NOT_JSON))
    return lines


def _text(value):
    """The documented rule: text, or a number written as text; never empty."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _expected(row: dict):
    """The normalised row, or None where the row is invalid."""
    answer = row.get("answer")
    nested = isinstance(answer, dict)
    question, value = _text(row.get("question")), _text(answer.get("value") if nested else answer)
    aliases = answer.get("aliases") if nested else row.get("aliases")
    if question is None or value is None or value.lower() == "<unk>":  # '<unk>': the hub's "no answer"
        return None
    if aliases is not None and not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
        return None
    out = [value]
    for alias in aliases or []:
        if alias.strip() and alias.strip() not in out:
            out.append(alias.strip())
    return {"question": question, "answer": value, "aliases": out}


@pytest.mark.usefixtures("datasets_cache")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=jsonl_lines(), suffix=st.sampled_from([".jsonl", ".json"]))
def test_malformed_rows_load_exactly_or_fail_naming_the_file(lines, suffix):
    from common.data.qa import load_qa_data

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"rows{suffix}"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            loaded = load_qa_data(DataArgs(dataset_name=str(path)), need_eval=False)
        except UsageError as exc:
            assert str(path) in str(exc)
            return
    rows = [json.loads(line) for line in lines if line.strip()]
    expected = [_expected(row) for row in rows]
    assert None not in expected, "an invalid row was accepted"
    assert loaded.train.to_list() == expected


@pytest.mark.usefixtures("datasets_cache")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.fixed_dictionaries(
    {"question": st.text(min_size=1).filter(str.strip), "answer": st.text(min_size=1).filter(str.strip)},
    optional={"aliases": st.lists(st.text(max_size=5), max_size=3)}), min_size=1, max_size=5),
    nested=st.booleans())
def test_well_formed_rows_always_load(rows, nested):
    from common.data.qa import load_qa_data

    if nested:
        rows = [{"question": r["question"], "answer": {"value": r["answer"], "aliases": r.get("aliases", [])}}
                for r in rows]
    with tempfile.TemporaryDirectory() as folder:
        path = write_jsonl(Path(folder) / "rows.jsonl", rows)
        loaded = load_qa_data(DataArgs(dataset_name=path), need_eval=False)
    assert loaded.train.to_list() == [_expected(row) for row in rows]


@pytest.mark.parametrize("answers", [[1066, "007"], [8, 2.5], [8, "true"]])
def test_text_keeps_its_value_in_columns_of_mixed_types(answers, tmp_path):
    from common.data.qa import load_qa_data

    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": f"q{i}?", "answer": a} for i, a in enumerate(answers)])
    loaded = load_qa_data(DataArgs(dataset_name=path), need_eval=False)
    assert loaded.train["answer"] == [str(a) for a in answers]


def test_numeric_answers_train(tiny_llama, tmp_path):
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"question": "How many legs has a spider?", "answer": 8},
                                                    {"question": "In which year was the Battle of Hastings?",
                                                     "answer": 1066}])
    out = tmp_path / "out"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "1", *FAST,
                                  "--dataset_name", path, "--save_strategy", "no"]) == 0
    assert is_finished_run(out)


# Bad input to every script ------------------------------------------------------------------

SCRIPTS = ["lora.py", "qlora.py", "prefix_tuning.py", "dpo.py", "orpo.py", "evaluate.py"]


def _bad_input(case: str, tmp_path: Path, tiny_llama: str) -> tuple[list, list[str]]:
    """-> (flags, words the error line must contain)."""
    if case == "model path missing":
        missing = tmp_path / "no-such-model"
        return ["--model_id", missing, "--dataset_name", "triviaqa-sample"], ["`--model_id`", str(missing)]
    if case == "neither model nor adapter":
        folder = tmp_path / "just-files"
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
        return ["--model_id", folder, "--dataset_name", "triviaqa-sample"], ["`--model_id`", "neither"]
    if case == "dataset path missing":
        missing = tmp_path / "missing.jsonl"
        return ["--model_id", tiny_llama, "--dataset_name", missing], ["`--dataset_name`", str(missing)]
    if case == "malformed jsonl":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": \n')
        return ["--model_id", tiny_llama, "--dataset_name", bad], [str(bad), "line 2"]
    assert case == "hub id offline"
    return ["--model_id", "someorg/some-model", "--dataset_name", "triviaqa-sample"], \
        ["someorg/some-model", "local", "offline"]


@pytest.mark.parametrize("case", ["model path missing", "neither model nor adapter", "dataset path missing",
                                  "malformed jsonl", "hub id offline"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_exits_2_with_one_line(script, case, tiny_llama, tmp_path, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    flags, words = _bad_input(case, tmp_path, tiny_llama)
    out = tmp_path / "out"
    extra = ["--max_steps", "1"] if script != "evaluate.py" else ["--dataset_split", "train"]
    assert run_script(script, [*flags, "--output_dir", out, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"{script}: error:")]
    assert len(errors) == 1, err
    for word in words:
        assert word.lower() in errors[0].lower(), errors[0]
    assert not is_finished_run(out) and not (out / "eval_results.json").exists()


# Resuming exactly, in any epoch, from any checkpoint -----------------------------------------

def _results(out) -> dict:
    return json.loads((Path(out) / "all_results.json").read_text())


def _summary(out) -> dict:
    info = json.loads((Path(out) / "run_config.json").read_text())["summary"]
    return {k: info[k] for k in ("steps", "train_loss")}


def test_resume_in_any_epoch_equals_the_uninterrupted_run(tiny_llama, tmp_path):
    # 16 rows in batches of 4: 4 steps an epoch, so checkpoint-6 lies in epoch 2 and checkpoint-10 is
    # the last step (what a failed final save leaves). Losses are logged every 3 steps, so each
    # checkpoint also holds loss not yet logged. The default length-grouped batches are used.
    argv = ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_train_samples", "16",
            "--per_device_train_batch_size", "4", "--max_steps", "10", "--save_strategy", "steps",
            "--save_steps", "2", "--save_total_limit", "5", "--logging_steps", "3", "--report_to", "none",
            "--learning_rate", "1e-2"]
    reference = tmp_path / "reference"
    assert run_script("lora.py", argv + ["--output_dir", reference]) == 0
    for step in (6, 10):
        out = tmp_path / f"from-{step}"
        out.mkdir()
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
        assert run_script("lora.py", argv + ["--output_dir", out, "--resume_from_checkpoint", "auto"]) == 0
        assert _state(out)["global_step"] == 10, step
        assert _tokens_seen(out)[-1] == _tokens_seen(reference)[-1], step  # the same batches
        assert losses(out)[-1] == pytest.approx(losses(reference)[-1], rel=1e-6), step
        resumed, uninterrupted = _weights(out), _weights(reference)
        for name in resumed:
            torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=1e-5)
        # The summary and all_results.json cover the whole run, not only the steps after the resume.
        assert _results(out)["train_loss"] == pytest.approx(_results(reference)["train_loss"], rel=1e-6), step
        assert _summary(out) == pytest.approx(_summary(reference), rel=1e-6), step


def test_checkpoint_missing_one_process_random_state_is_skipped(tmp_path):
    good, newer = _checkpoint(tmp_path, 4), _checkpoint(tmp_path, 8)
    for ckpt in (good, newer):  # as two processes write them, the process count recorded
        (ckpt / "rng_state.pth").rename(ckpt / "rng_state_0.pth")
        torch.save({"python": 1}, ckpt / "rng_state_1.pth")
        state = _state(ckpt)
        state["stateful_callbacks"] = {"ResumeState": {"args": {}, "attributes": {"world_size": 2}}}
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert last_complete_checkpoint(tmp_path) == str(newer)
    (newer / "rng_state_1.pth").unlink()  # rank 1 had not written it when rank 0 finished
    assert not is_complete_checkpoint(newer)
    assert last_complete_checkpoint(tmp_path) == str(good)


def test_save_total_limit_keeps_complete_checkpoints_and_drops_older_broken_ones(tmp_path):
    from common.recipe.outputs import rotate_checkpoints

    now = time.time()
    for step, age in ((40, 300), (48, 200), (99, 150), (52, 10), (56, 0)):
        ckpt = _checkpoint(tmp_path, step)
        for path in (ckpt, *ckpt.iterdir()):
            os.utime(path, (now - age, now - age))
    (tmp_path / "checkpoint-99" / "trainer_state.json").unlink()  # a run killed while writing it
    os.utime(tmp_path / "checkpoint-99", (now - 150, now - 150))
    _truncate(tmp_path / "checkpoint-56" / "optimizer.pt")  # newer than any complete one: may be in flight
    rotate_checkpoints(str(tmp_path), 2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-48", "checkpoint-52",
                                                                     "checkpoint-56"]


# One run per output directory ----------------------------------------------------------------

HOLD_LOCK = "import sys, time; from common.recipe.lock import lock_output_dir; lock_output_dir(sys.argv[1]); " \
            "print('locked', flush=True); time.sleep(120)"


def _hold(out, host=None) -> subprocess.Popen:
    """Another process holding `out`'s lock, named `host` when given (a run on another machine)."""
    fake = f"import socket; socket.gethostname = lambda: {host!r}; " if host else ""
    holder = subprocess.Popen([sys.executable, "-c", fake + HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_into_a_used_output_dir_exits_2_naming_the_holder(tiny_llama, tmp_path, capsys):
    out = tmp_path / "shared"
    holder = _hold(out)
    try:
        argv = ["--model_id", tiny_llama, "--max_steps", "1", "--output_dir", out, *FAST]
        assert run_script("lora.py", argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"process {holder.pid}" in err[0] and "--output_dir" in err[0], err
        assert not (out / "run_config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its stale lock is taken over with one line, and the run finishes.
    assert run_script("lora.py", argv) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of process {holder.pid}" in err
    assert is_finished_run(out) and not (out / ".lock").exists()


@pytest.mark.parametrize("host", [None, "gpu-7"])
def test_lock_held_by_another_process_refuses_naming_its_pid_and_other_host(tmp_path, host):
    holder = _hold(tmp_path, host)
    try:
        with pytest.raises(UsageError, match=f"in use by another run \\(process {holder.pid}"
                                             f"{' on ' + host if host else ''}\\)"):
            lock_output_dir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
        release_output_locks()
    assert (tmp_path / ".lock").exists()  # the refused run left the holder's file alone


@pytest.mark.parametrize("left", ["dead", "garbage", "empty"])
def test_lock_file_no_process_holds_is_taken_over_saying_whose_it_was(tmp_path, caplog, left):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    content = {"dead": json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}), "garbage": "\x00{not",
               "empty": ""}[left]
    (tmp_path / ".lock").write_text(content)
    logging.getLogger("finetune").addHandler(caplog.handler)
    try:
        lock_output_dir(str(tmp_path))
        assert json.loads((tmp_path / ".lock").read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    finally:
        logging.getLogger("finetune").removeHandler(caplog.handler)
        release_output_locks()
    said = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    expected = {"dead": f"of process {int(dead.stdout)}, which", "garbage": "left no readable name"}.get(left)
    assert (len(said) == 1 and expected in said[0]) if expected else said == [], said
    assert tmp_path.is_dir() and not (tmp_path / ".lock").exists()


def test_lock_is_kept_across_runs_in_one_process_and_released_at_exit(tmp_path):
    made, kept = tmp_path / "made" / "by_the_run", tmp_path / "kept"
    kept.mkdir()
    code = ("import sys; from common.recipe.lock import lock_output_dir\n"
            "for out in sys.argv[1:]: lock_output_dir(out); lock_output_dir(out)\n"
            "print(sorted(p.name for p in __import__('pathlib').Path(sys.argv[2]).iterdir()))")
    done = subprocess.run([sys.executable, "-c", code, str(made), str(kept)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == "['.lock']", done.stderr
    # At exit: the lock files are gone, and so is the (empty) directory made for the lock, not its parent.
    assert not made.exists() and (tmp_path / "made").is_dir()
    assert kept.is_dir() and list(kept.iterdir()) == []


def test_lock_is_taken_by_the_main_process_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # the other ranks of a torchrun launch write into the same directory
    lock_output_dir(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# Disk full -----------------------------------------------------------------------------------

def test_disk_full_on_the_final_save_is_one_line_and_the_printed_command_finishes(tiny_llama, tmp_path, capsys,
                                                                                 monkeypatch):
    import errno

    from common.recipe import outputs

    argv = ["--model_id", tiny_llama, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3", *FAST]
    reference, out = tmp_path / "reference", tmp_path / "full"
    assert run_script("lora.py", argv + ["--output_dir", reference]) == 0
    move = outputs.move_into_place

    def no_space(staging, final):
        raise OSError(errno.ENOSPC, "No space left on device", str(final / "adapter_model.safetensors"))

    monkeypatch.setattr(outputs, "move_into_place", no_space)
    capsys.readouterr()
    assert run_script("lora.py", argv + ["--output_dir", out]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert str(out) in err[0] and f"{out / 'checkpoint-3'} is intact" in err[0], err
    assert not is_finished_run(out) and not (out / ".final.tmp").exists()

    monkeypatch.setattr(outputs, "move_into_place", move)  # space freed
    command = shlex.split(err[0].split("finish the run with: ", 1)[1])
    assert command[:2] == ["python", "lora.py"] and command[-2:] == ["--resume_from_checkpoint", "auto"]
    assert run_script("lora.py", command[2:]) == 0
    assert is_finished_run(out)
    assert _state(out)["global_step"] == 3  # not one step more
    assert _summary(out) == pytest.approx(_summary(reference), rel=1e-6)
    for name, tensor in _weights(out).items():
        torch.testing.assert_close(tensor, _weights(reference)[name])


# Precision: the flags decide, the launcher agrees ----------------------------------------------

def test_shipped_accelerate_configs_leave_precision_to_the_flags():
    import yaml

    for config in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        assert yaml.safe_load(config.read_text())["mixed_precision"] == "no", config.name


def test_a_launcher_precision_the_flags_contradict_is_one_line_exit_2(tiny_llama, tmp_path, monkeypatch, capsys):
    # What `accelerate launch` with `mixed_precision: bf16` sets; on this CPU the flags give fp32.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    argv = ["--model_id", tiny_llama, "--max_steps", "1", "--output_dir", tmp_path / "o", *FAST]
    assert run_script("lora.py", argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "mixed_precision: bf16" in err[0], err
    assert not (tmp_path / "o" / "run_config.json").exists()


def test_run_config_records_the_precision_the_trainer_ran_with(tiny_llama, tmp_path, monkeypatch):
    from sft.run import train

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    result = train("lora", [str(a) for a in ["--model_id", tiny_llama, "--max_steps", "1", "--output_dir",
                                             tmp_path / "o", *FAST]])
    recorded = json.loads((tmp_path / "o" / "run_config.json").read_text())["model"]["precision"]
    ran = result.trainer.accelerator.mixed_precision
    assert {"no": "fp32"}.get(ran, ran) == recorded


def test_killed_dpo_run_resumes_to_the_uninterrupted_runs_summary_and_results(tiny_llama, tmp_path):
    # Issue repro: DPO resumed from checkpoint-4 of 8 reported the mean loss of steps 5-8 only.
    argv = ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_train_samples", "32",
            "--per_device_train_batch_size", "4", "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4",
            "--logging_steps", "1", "--report_to", "none", "--learning_rate", "1e-2"]
    reference, out = _killed_after_checkpoint_4(tmp_path, "dpo.py", argv)
    resumed = _start(tmp_path, "dpo.py", argv + ["--output_dir", out, "--resume_from_checkpoint", "auto"])
    assert resumed.wait(timeout=300) == 0, _stderr(resumed)[-3000:]
    assert f"resuming from {out / 'checkpoint-4'}" in _stderr(resumed)

    assert _state(out)["global_step"] == _state(reference)["global_step"] == 8
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    # The whole run's mean, as the uninterrupted run reports it, not the mean of steps 5-8.
    whole = sum(losses(reference)) / 8
    assert _results(reference)["train_loss"] == pytest.approx(whole, rel=1e-4)
    assert _results(out)["train_loss"] == pytest.approx(_results(reference)["train_loss"], rel=1e-5)
    assert _summary(out) == pytest.approx(_summary(reference), rel=1e-5)
    for name, tensor in _weights(reference).items():
        torch.testing.assert_close(_weights(out)[name], tensor, atol=1e-5, rtol=1e-4)
