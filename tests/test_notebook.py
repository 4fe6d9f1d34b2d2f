"""Notebook cells (`!python ...` in Jupyter or Kaggle): the stop button leaves a resumable checkpoint,
`--save_minutes` bounds what a hard kill loses, a cell shows one progress bar, plots draw under the
kernel's inline MPLBACKEND, and examples/notebook.ipynb runs. The kernel tests use a real ipykernel
driven by nbclient, which runs `!` commands under a pseudo-terminal as Jupyter does."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import read_terminal

TINY_RUN = ["--dataset_name", "triviaqa-sample", "--report_to", "none", "--lora_r", "4"]


def _under_a_pty(argv: list, env: dict) -> tuple[int, str]:
    """Run a script with its output on a pseudo-terminal, as a notebook's `!python ...` does."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=env, stdout=slave, stderr=slave)
    os.close(slave)
    text = read_terminal(master)
    return proc.wait(timeout=600), text


def _kernel_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_DATASETS_DISABLE", "HF_HUB_DISABLE_PROGRESS",
                                                                     "FINETUNE_", "JPY_", "MPLBACKEND"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `!python` is this venv's
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_a_notebook_cell_shows_one_bar_no_cursor_codes_and_each_evaluation_on_its_steps_line(tiny_llama, tmp_path):
    """JPY_PARENT_PID is what Jupyter's kernels pass to `!` commands; the output area understands
    carriage returns and nothing else."""
    code, text = _under_a_pty(["lora.py", "--model_id", tiny_llama, *TINY_RUN, "--max_train_samples", "16",
                               "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1",
                               "--eval_strategy", "steps", "--eval_steps", "1", "--max_eval_samples", "4",
                               "--eval_em_samples", "4", "--save_strategy", "no", "--output_dir", tmp_path / "run"],
                              _kernel_env(JPY_PARENT_PID="1"))
    assert code == 0, text[-3000:]
    assert "\x1b[A" not in text  # no bar drawn under another
    assert not re.search(r"Loading weights|examples/s\]|Map|Tokenizing", text), text  # no library bars
    bars = set(re.findall(r"\| *\d+/(\d+) \[", text))
    assert bars == {"2"}, text  # the training bar only: 2 steps (no evaluation or answering bar)
    lines = re.findall(r"^step (\d)/2 \(epoch [0-9.]+\): loss [0-9.]+, .*eval_loss [0-9.]+, eval_em [0-9.]+, "
                       r"eval_f1 [0-9.]+$", text.replace("\r", "\n"), re.MULTILINE)
    assert lines == ["1", "2"], text[-3000:]


def test_plots_draw_under_an_inherited_inline_backend_that_this_venv_cannot_import(tmp_path):
    """A kernel exports MPLBACKEND=module://matplotlib_inline.backend_inline; the project's venv may
    not have that module."""
    hide = tmp_path / "hide" / "matplotlib_inline"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('No module named matplotlib_inline')\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 2.0},
                                                                        {"step": 2, "loss": 1.0}]}))
    env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "PYTHONPATH": str(hide.parent)}
    result = subprocess.run([sys.executable, "-m", "common.recipe.plotting", str(run)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "plots" / "loss.png").stat().st_size > 1000


def test_use_bfloat16_help_says_what_it_does_on_the_cpu_as_the_docs_do(capsys):
    from common.model.precision import CPU_BF16_MIN_PARAMETERS
    from lora import make_parser

    threshold = f"{CPU_BF16_MIN_PARAMETERS / 1e6:.0f}M parameters"
    help_text = " ".join(make_parser().parser.format_help().split())
    entry = help_text.split("--use_bfloat16", 1)[1][:400]
    assert "autocast" in entry and threshold in entry and "float32 elsewhere" in entry, entry
    docs = " ".join((ROOT / "docs" / "every-script.md").read_text().split())
    assert "bf16 autocast (weights stay fp32) where the CPU has bf16 instructions" in docs
    assert f"at least {threshold}" in docs


def test_a_local_model_dir_without_tokenizer_files_says_they_are_missing(tiny_llama, tmp_path, capsys):
    import shutil

    from lora import main

    model = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama, model)
    for f in model.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    assert main(["--model_id", str(model), *TINY_RUN, "--max_steps", "1", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "tokenizer.json" in err and "cache" not in err, err


@pytest.mark.parametrize("script", ["lora.py", "ppo.py"])
def test_save_minutes_writes_checkpoints_by_time_without_a_step_schedule(tiny_llama, tmp_path, script):
    """--save_minutes with --save_strategy no: a checkpoint whenever the time has passed (here
    0.0001 minutes, so after every step but the last, whose result is the output itself)."""
    extra = (["--reward_function", "triviaqa_f1", "--response_length", "4"] if script == "ppo.py" else
             ["--max_train_samples", "16"])
    result = subprocess.run([sys.executable, script, "--model_id", tiny_llama, *TINY_RUN, *extra,
                             "--per_device_train_batch_size", "4", "--max_steps", "3", "--save_strategy", "no",
                             "--save_minutes", "0.0001", "--save_total_limit", "5", "--output_dir", tmp_path / "run"],
                            cwd=ROOT, env=_kernel_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert {"checkpoint-1", "checkpoint-2"} <= set(saved), (saved, result.stderr[-2000:])


def _notebook(*sources: str):
    from nbformat.v4 import new_code_cell, new_notebook

    return new_notebook(cells=[new_code_cell(s) for s in sources],
                        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def _client(nb, **kwargs):
    from nbclient import NotebookClient

    return NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}},
                          coalesce_streams=True, **kwargs)


def _wait_until_unlocked(out: Path, seconds: float) -> None:
    """The stopped run exits (and frees its lock) once its checkpoint is saved."""
    from filelock import FileLock, Timeout

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with FileLock(str(out / ".lock"), timeout=0):
                return
        except Timeout:
            time.sleep(0.5)
    raise AssertionError(f"{out}: still locked after {seconds} s")


@pytest.mark.slow
def test_the_stop_button_in_a_real_kernel_leaves_a_checkpoint_that_resumes(tiny_llama, tmp_path):
    """The kernel is interrupted (what the stop button does) once the first step is logged. IPython
    then gives the `!` command 0.2 s before it kills it; a step here takes seconds (150 micro-batches)."""
    pytest.importorskip("nbclient")
    import asyncio

    from nbclient import NotebookClient

    out = tmp_path / "run"
    argv = ["lora.py", "--model_id", tiny_llama, *TINY_RUN, "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "150", "--max_steps", "4", "--logging_steps", "1", "--save_strategy",
            "no", "--output_dir", str(out)]

    class StopButton(NotebookClient):
        pressed = False

        def output(self, outs, msg, display_id, cell_index):
            if not self.pressed and "step 1/4" in msg["content"].get("text", ""):
                self.pressed = True
                asyncio.ensure_future(self.km.interrupt_kernel())
            return super().output(outs, msg, display_id, cell_index)

    nb = _notebook("!python " + " ".join(argv))
    client = StopButton(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}},
                        coalesce_streams=True)
    client.execute(env=_kernel_env())
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert client.pressed, text[-3000:]
    _wait_until_unlocked(out, 300)
    checkpoints = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    assert checkpoints, (text[-3000:], sorted(p.name for p in out.iterdir()))
    resumed = subprocess.run([sys.executable, *argv, "--resume_from_checkpoint", "auto"], cwd=ROOT, env=_kernel_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert "resum" in resumed.stderr.lower(), resumed.stderr[-3000:]


@pytest.mark.slow
def test_the_example_notebook_runs_headless_with_bounded_output_per_cell(tiny_llama, tmp_path):
    """examples/notebook.ipynb with its parameters set to the demo's tiny model and the bundled sample,
    without the install step; each cell's output, as a notebook shows it, stays short and clean."""
    pytest.importorskip("nbclient")
    import nbformat

    nb = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 6  # parameters, install, SFT, DPO, evaluate, compare
    code[0].source += (f"\nMODEL, DATA, TRAIN_SPLIT, EVAL_SPLIT, EVAL_N = {str(tiny_llama)!r}, 'triviaqa-sample', "
                       f"'train', 'validation', 8\nSFT_STEPS, DPO_STEPS, PRECISION = 10, 4, ''\n"
                       f"OUT, REPO, INSTALL = {str(tmp_path / 'outputs')!r}, '', False")
    _client(nb).execute(env=_kernel_env())
    # Lines a notebook shows per cell: the training cells' summaries and log lines, evaluate.py's
    # result, compare.py's scoring of two runs (4 lines per scoring) and its table.
    for cell, most in zip(code[2:], (20, 20, 8, 40)):
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert not any(o.output_type == "error" for o in cell.outputs), text[-3000:]
        assert "\x1b[A" not in text, text
        assert len(text.splitlines()) <= most and len(text) <= 6000, (len(text.splitlines()), len(text), text)
    assert (tmp_path / "outputs" / "dpo" / "adapter_config.json").is_file()
    assert "| dpo |" in "".join(o.get("text", "") for o in code[-1].outputs)


def test_a_run_into_the_directory_of_a_stopping_run_waits_for_its_checkpoint(tmp_path):
    """The stop button, then the same cell again with `--resume_from_checkpoint auto` at once: the
    stopped run still holds the output directory while it saves, and the new run waits for it."""
    from common.recipe import lock

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)  # what the stopped run is writing
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom common.recipe import lock\nlock.lock_output_dir(sys.argv[1])\n"
         "lock.mark_stopping()\nprint('held', flush=True)\ntime.sleep(3)\n", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    try:
        lock.lock_output_dir(str(out))  # a UsageError ("in use by another run") unless it waits
        assert time.monotonic() - start > 1
    finally:
        lock.release_output_locks()
        holder.wait(timeout=60)
