"""Local inputs never reach for the network; a name that is neither local nor reachable on the hub
is one line and exit code 2, not minutes of retries.

The scripts run in subprocesses, as a user runs them, without the HF_*_OFFLINE variables the
rest of the suite sets, and with tests/network_spy on their PYTHONPATH: it records every DNS
look-up or connection to another host and makes it fail, like a machine without network.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPY = ROOT / "tests" / "network_spy"


def user_env(tmp_path: Path, **extra) -> dict:
    """A user's environment: no offline switches, an empty Hugging Face cache, the network spy on."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    env.update(PYTHONPATH=str(SPY), NETWORK_SPY_LOG=str(tmp_path / "network.log"), HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run(script: str, argv: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def attempts(tmp_path: Path) -> str:
    log = tmp_path / "network.log"
    return log.read_text() if log.exists() else ""


def test_local_runs_make_no_network_attempt(plain_runs):
    """Every script on local inputs (conftest.py's plain_runs)."""
    tmp, runs = plain_runs
    for script, result in runs.items():
        assert result.returncode == 0, (script, result.stderr[-3000:])
    assert attempts(tmp) == "", attempts(tmp)[:3000]


@pytest.mark.parametrize("case", ["mistyped local path", "hub id, hub unreachable", "hub id, HF_HUB_OFFLINE",
                                  "triviaqa, hub unreachable", "adapter on a hub base, hub unreachable"])
def test_name_neither_local_nor_reachable_is_one_line_exit_2(case, tiny_llama, tmp_path):
    env = user_env(tmp_path)
    model, data, words = "models/tiny_llama", "triviaqa-sample", ["`--model_id` models/tiny_llama",
                                                                   "not a local directory", "could not be reached"]
    if case == "hub id, hub unreachable":
        model, words[0] = "someorg/some-model", "`--model_id` someorg/some-model"
    elif case == "hub id, HF_HUB_OFFLINE":
        model, words = "someorg/some-model", ["`--model_id` someorg/some-model", "not a local directory",
                                              "HF_HUB_OFFLINE"]
        env["HF_HUB_OFFLINE"] = "1"
    elif case == "triviaqa, hub unreachable":
        model, data, words = tiny_llama, "triviaqa", ["`--dataset_name triviaqa`", "not a local file",
                                                      "could not be reached"]
    elif case == "adapter on a hub base, hub unreachable":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "someorg/base", "peft_type": "LORA"}')
        model, words = adapter, [f"`--model_id` {adapter}", "'someorg/base' is not a local directory",
                                 "could not be reached"]
    result = run("lora.py", ["--model_id", model, "--dataset_name", data, "--output_dir", tmp_path / "out"], env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lora.py: error: "), result.stderr[-3000:]
    for word in words:
        assert word in result.stderr
    assert "Retrying" not in result.stderr and not (tmp_path / "out").exists()
