"""--push_to_hub: no credentials stop the run before any model loads (exit 2, one line); an upload
that fails at the end keeps the finished local result and exits with code 3, naming the command
that uploads it later."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.recipe.outputs import is_finished_run
from helpers import run_script

ROOT = Path(__file__).resolve().parent.parent


def test_push_to_hub_without_credentials_exits_2_before_any_model_loads(tiny_llama, tmp_path, monkeypatch, capsys):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token file from `hf auth login` either
    import common.model.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(common.model.loading, "load_model", no_loading)
    monkeypatch.setattr(common.model.loading, "load_tokenizer", no_loading)
    out = tmp_path / "out"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--output_dir", out,
                                  "--push_to_hub", "True", "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lora.py: error: `--push_to_hub True` needs Hugging Face "
                                                   "credentials: set HF_TOKEN or run `hf auth login`"), err
    assert not out.exists()


@pytest.mark.parametrize("script,flags", [
    ("lora.py", ["--max_train_samples", "8"]),
    ("ppo.py", ["--reward_function", "triviaqa_f1", "--per_device_train_batch_size", "4", "--response_length", "4"]),
])
def test_failed_upload_keeps_the_finished_run_and_exits_3(script, flags, tiny_llama, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_TOKEN="hf_not_a_real_token", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "tests" / "network_spy"))  # no network: the upload cannot go through
    out = tmp_path / "my-run"
    done = subprocess.run([sys.executable, script, "--model_id", tiny_llama, "--dataset_name", "triviaqa-sample",
                           "--output_dir", str(out), "--push_to_hub", "True", "--max_steps", "1",
                           "--save_strategy", "no", "--lora_r", "2", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]
    assert is_finished_run(str(out)) and (out / "adapter_model.safetensors").is_file()
    failures = [line for line in done.stderr.splitlines() if "upload failed" in line]
    assert failures == [f"{script}: upload failed: the run is saved in {out}, but the hub (huggingface.co) could not "
                        f"be reached to upload it; upload it later with: hf upload my-run {out} . --exclude "
                        f"'checkpoint-*/**'"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "hf_not_a_real_token" not in done.stdout + done.stderr
