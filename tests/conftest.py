"""Fixtures: tiny models built locally from a config, with a tokenizer trained on the bundled
sample. Nothing touches the network."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# No hub, no wandb account, no telemetry: tests must behave like an offline user machine.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)
# Under pytest-xdist each worker (and every script it launches) computes on one thread: the tiny
# models are bound by Python overhead, so two single-threaded workers beat one two-threaded run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_environment():
    """Scripts called in-process may set variables for their run (HF_TOKEN from --hub_token,
    WANDB_DIR, a benchmark's datasets cache); later tests, and the processes they launch, start
    from the environment as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from common.model.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory):
    """Like an instruct model: ships a chat template."""
    from common.model.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-chat"), "llama", chat=True)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    from common.model.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def gpt2_base_shaped(tmp_path_factory):
    """GPT-2 base's shape (768 wide, 12 layers, 12 heads) with a small vocabulary and MLP, for the
    seed commands that pass those dimensions explicitly."""
    from common.model.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "gpt2-shaped"), "gpt2",
                            n_embd=768, n_layer=12, n_head=12, n_inner=128)


@pytest.fixture
def sample():
    return "triviaqa-sample"


@pytest.fixture(scope="session")
def plain_runs(tiny_llama, tmp_path_factory):
    """Scripts run once each as a user runs them: in a subprocess, with local inputs, without the
    HF_*_OFFLINE variables set above, and with tests/network_spy recording (and refusing) every
    network attempt; every script once.
    -> (folder holding network.log, {script: CompletedProcess})."""
    import subprocess

    tmp = tmp_path_factory.mktemp("plain-runs")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                        "TRL_EXPERIMENTAL_SILENCE")}
    env.update(PYTHONPATH=str(ROOT / "tests" / "network_spy"), NETWORK_SPY_LOG=str(tmp / "network.log"),
               HF_HOME=str(tmp / "hf"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    small = ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_train_samples", "16",
             "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
             "--lora_r", "4"]
    commands = {
        "lora.py": [*small, "--output_dir", tmp / "lora", "--eval_strategy", "steps", "--eval_steps", "2",
                    "--max_eval_samples", "4", "--eval_em_samples", "4"],
        "evaluate.py": ["--model_id", tmp / "lora", "--dataset_name", "triviaqa-sample", "--dataset_split",
                        "validation", "--max_samples", "4", "--output_dir", tmp / "eval"],
        "prefix_tuning.py": [*small, "--output_dir", tmp / "prefix"],
        "orpo.py": [*small, "--output_dir", tmp / "orpo"],
        "reward_model.py": [*small, "--output_dir", tmp / "rm"],
        "ppo.py": ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--reward_function", "triviaqa_f1",
                   "--per_device_train_batch_size", "4", "--max_steps", "2", "--response_length", "4",
                   "--save_strategy", "no", "--lora_r", "4", "--logging_steps", "1", "--output_dir", tmp / "ppo"],
        "dora.py": [*small, "--output_dir", tmp / "dora"],
        "qlora.py": [*small, "--output_dir", tmp / "qlora"],
        "p_tuning.py": [*small, "--output_dir", tmp / "p-tuning"],
        "prompt_tuning.py": [*small, "--output_dir", tmp / "prompt-tuning"],
        "dpo.py": [*small, "--model_id", tmp / "lora", "--rejected_source", "other", "--output_dir", tmp / "dpo"],
        "kto.py": [*small, "--model_id", tmp / "lora", "--rejected_source", "other", "--output_dir", tmp / "kto"],
        "simpo.py": [*small, "--rejected_source", "other", "--output_dir", tmp / "simpo"],
        "grpo.py": [*small, "--reward_function", "triviaqa_f1", "--num_generations", "4", "--max_completion_length", "4",
                    "--output_dir", tmp / "grpo"],
        "merge.py": ["--adapter", tmp / "lora", "--output_dir", tmp / "merged"],
        "compare.py": ["--runs", tmp / "lora", tmp / "dora", "--eval_samples", "4", "--train_eval_samples", "4",
                       "--output_dir", tmp / "compare"],
    }
    runs = {}
    for script, argv in commands.items():
        runs[script] = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=600)
    return tmp, runs


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    """Every generated file would otherwise leave an entry in the user's datasets cache."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets-cache"))
        yield
