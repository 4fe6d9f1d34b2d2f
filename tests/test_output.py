"""What a plain run prints: the progress bar, one readable line per logging step and the run
summary; no library noise the user cannot act on, and no wrong figures. The runs are the
subprocess runs of the `plain_runs` fixture (conftest.py): every script, on a tiny local model.
The venv has the optional `kernels` package (bitsandbytes fetches a CPU kernel with it) and not
DeepSpeed, whose notice is checked on its logger below."""

import re

import pytest

NOISE = {
    "deprecation warning": re.compile(r"deprecat", re.IGNORECASE),
    "orphaned warnings.warn source line": re.compile(r"^\s*(warnings\.warn\(|return forward_call)", re.MULTILINE),
    "FutureWarning/UserWarning": re.compile(r"(Future|User|Deprecation|TRLExperimental)Warning"),
    "raw metric dict": re.compile(r"\{'(loss|eval_loss|train_runtime)'"),
    "HF train metrics block": re.compile(r"\*\*\*\*\* \w+ metrics \*\*\*\*\*"),
    "ORPO collator advice": re.compile(r"we have set it for you"),
    "LOAD REPORT table": re.compile(r"LOAD REPORT"),
    "raw ANSI colour codes": re.compile(r"\x1b\[[0-9;]*m"),
    "zero throughput": re.compile(r"tokens/s\s+0\.0|total_flos|\b0 non-padding tokens"),
    "generation settings conflict": re.compile(r"seem to have been set"),
    # The runs write to pipes, as to a log file: no bar drawn under another (its cursor-up codes show
    # as `^[[A` in a file), no library bar for each dataset pass or for loading weights.
    "cursor-up code of a nested bar": re.compile(r"\x1b\[A"),
    "library progress bar in a log": re.compile(r"Loading weights|Generating \w+ split|examples/s\]"),
    # `kernels` (bitsandbytes' optional CPU kernel) under the offline mode the scripts set themselves
    "kernels' publisher trust notice": re.compile(r"Skipping publisher trust check"),
    "DeepSpeed's accelerator notice": re.compile(r"Setting accelerator to CPU"),
    "kernels fetch failure": re.compile(r"Failed to load CPU gemm_4bit_forward"),
}
SCRIPTS = ["lora.py", "evaluate.py", "prefix_tuning.py", "orpo.py", "reward_model.py", "ppo.py", "dora.py", "qlora.py",
           "p_tuning.py", "prompt_tuning.py", "dpo.py", "kto.py", "simpo.py", "grpo.py", "merge.py", "compare.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_plain_run_prints_no_library_noise(plain_runs, script):
    result = plain_runs[1][script]
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    found = {name: pattern.search(text).group(0) for name, pattern in NOISE.items() if pattern.search(text)}
    assert not found, found


@pytest.mark.parametrize("script", ["lora.py", "prefix_tuning.py", "orpo.py", "reward_model.py"])
def test_training_run_prints_one_line_per_log_step_and_the_summary(plain_runs, script):
    text = plain_runs[1][script].stdout + plain_runs[1][script].stderr
    lines = re.findall(r"^step (\d+)/2 \(epoch [0-9.]+\): loss [0-9.]+, .*$", text.replace("\r", "\n"), re.MULTILINE)
    assert lines == ["1", "2"], text[-3000:]  # --logging_steps 1 over 2 steps
    assert "── run summary" in text and "train loss" in text


def test_ppo_prints_one_line_per_log_step_and_its_summary(plain_runs):
    text = plain_runs[1]["ppo.py"].stdout + plain_runs[1]["ppo.py"].stderr
    lines = re.findall(r"^step (\d+)/2: score [0-9.e-]+, kl [0-9.e-]+, policy_loss [0-9.e-]+, value_loss [0-9.e-]+, "
                       r"learning_rate [0-9.e+-]+$", text.replace("\r", "\n"), re.MULTILINE)
    assert lines == ["1", "2"], text[-3000:]
    assert "── PPO summary" in text


def test_orpo_summary_omits_the_token_count_it_does_not_have(plain_runs):
    text = plain_runs[1]["orpo.py"].stdout
    assert "tokens/s     not counted by this trainer" in text


def test_bars_in_a_log_are_redrawn_at_most_every_30_s_and_in_a_terminal_as_tqdm_draws_them(monkeypatch):
    import io
    import sys

    from common.recipe import progress as quiet

    monkeypatch.delenv(quiet.TERMINAL_VAR, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
    with quiet.progress_bar(total=3, file=io.StringIO()) as bar:
        assert bar.mininterval == bar.maxinterval == quiet.LOG_BAR_INTERVAL == 30.0
    monkeypatch.setenv(quiet.TERMINAL_VAR, "1")  # what compare.py sets for the runs whose output it relays
    with quiet.progress_bar(total=3, file=io.StringIO()) as bar:
        assert (bar.mininterval, bar.maxinterval) == (0.1, 10.0)  # tqdm's own defaults


def test_a_run_in_a_terminal_keeps_every_bar(tiny_llama, tmp_path):
    """The same run with stderr on a pseudo-terminal (a shell, or a notebook's `!python ...`): the
    weight-loading, dataset and evaluation bars are drawn as the libraries draw them."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from tests.conftest import ROOT
    from tests.helpers import read_terminal

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_DATASETS_DISABLE", "HF_HUB_DISABLE_PROGRESS",
                                                                     "FINETUNE_", "JPY_", "MPLBACKEND"))}
    proc = subprocess.Popen([sys.executable, "lora.py", "--model_id", tiny_llama, "--dataset_name", "triviaqa-sample",
                             "--max_train_samples", "16", "--max_steps", "2", "--eval_strategy", "steps",
                             "--eval_steps", "1", "--max_eval_samples", "4", "--save_strategy", "no", "--report_to",
                             "none", "--output_dir", str(tmp_path / "run")], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    text = read_terminal(master)
    assert proc.wait(timeout=600) == 0
    assert "Loading weights" in text and "examples/s]" in text
    assert "\x1b[A" in text  # the evaluation bar, drawn under the training bar


def test_deepspeed_and_kernels_notices_are_dropped_and_their_other_messages_kept():
    """DeepSpeed is not installed in the test venv: its logger ("DeepSpeed", own handler, no
    propagation) is fed the record its real_accelerator.py logs on a machine without a GPU."""
    import io
    import logging

    from common.recipe.progress import quiet_libraries

    quiet_libraries()
    for name, noise, kept in [("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we "
                               "were unable to detect it.", "ZeRO stage 3 needs more memory"),
                              ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"
                               "quantization-bitsandbytes' because Hugging Face Hub is in offline mode.",
                               "Kernel repository could not be found")]:
        logger, stream = logging.getLogger(name), io.StringIO()
        handler = logging.StreamHandler(stream)
        logger.addHandler(handler)
        try:
            logger.warning(noise)
            logger.warning(kept)
        finally:
            logger.removeHandler(handler)
        assert stream.getvalue() == kept + "\n", name
