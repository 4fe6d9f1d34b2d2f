"""What a plain run prints: the progress bar, one readable line per logging step and the run
summary; no library noise the user cannot act on, and no wrong figures. The runs are the
subprocess runs of the `plain_runs` fixture (conftest.py): lora.py, evaluate.py, prefix_tuning.py,
orpo.py, reward_model.py and ppo.py on a tiny local model."""

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
}
SCRIPTS = ["lora.py", "evaluate.py", "prefix_tuning.py", "orpo.py", "reward_model.py", "ppo.py"]


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
