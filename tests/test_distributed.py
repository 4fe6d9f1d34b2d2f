"""Multi-process runs on the CPU (gloo): the same scripts under torchrun and accelerate launch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _launch(launcher: list[str], script: str, argv: list, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([*launcher, script, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:  # the first failing rank's own lines, not only the other ranks' echo of it
        own = [line for line in done.stderr.splitlines() if "[rank0]" in line or not line.startswith("[rank")]
        pytest.fail(f"{script} exited {done.returncode}:\n" + "\n".join(own)[-6000:] + "\n--- end of stderr ---\n"
                    + done.stderr[-2000:])
    return done


def _free_port() -> str:
    """A free port below Linux's ephemeral range (32768-60999). A port the kernel hands out for
    port 0 is free again once we close it, and another test's gloo or store connections (run in
    parallel) may take it as their own ephemeral port before the launcher binds it; ports below
    the range are never handed out that way."""
    import random
    import socket

    for _ in range(100):
        port = random.SystemRandom().randrange(20000, 32000)  # never a state some test seeded
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return str(port)
    raise RuntimeError("no free port in 20000-31999")


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", _free_port()]

SINGLE = [sys.executable]


def _losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e]


def test_two_processes_match_one_process_with_twice_the_batch(tiny_llama, tmp_path):
    common = ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_steps", "12",
              "--learning_rate", "1e-2", "--lora_dropout", "0", "--logging_steps", "1", "--save_strategy", "no",
              "--report_to", "none", "--train_sampling_strategy", "random"]
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(SINGLE, "lora.py", [*common, "--output_dir", one, "--per_device_train_batch_size", "16"], tmp_path)
    done = _launch(torchrun(), "lora.py", [*common, "--output_dir", two, "--per_device_train_batch_size", "8"],
                   tmp_path)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 12
    # Same examples per step; only float summation order differs (one process with gradient
    # accumulation deviates as much). Another seed moves the curve by ~0.3 on average.
    diffs = [abs(x - y) for x, y in zip(a, b)]
    assert diffs[0] < 1e-4 and max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.04, (a, b)
    # Only the main process writes and logs.
    assert done.stderr.count("trainable parameters of") == 1
    assert done.stdout.count("run summary") == 1
    assert (two / "adapter_model.safetensors").is_file() and (two / "run_config.json").is_file()


def test_accelerate_launch_with_the_shipped_cpu_config(tiny_llama, tmp_path):
    out = tmp_path / "acc"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_ip", "127.0.0.1",
                "--main_process_port", _free_port()]
    _launch(launcher, "lora.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_steps", "4",
                                  "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to",
                                  "none", "--output_dir", out], tmp_path)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert state["epoch"] == pytest.approx(4 * 8 * 2 / 304, abs=0.02)  # each step saw two processes' batches


def test_dpo_and_ppo_run_with_two_processes(tiny_llama, tmp_path):
    dpo, ppo = tmp_path / "dpo", tmp_path / "ppo"
    _launch(torchrun(), "dpo.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_steps", "3",
                                 "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
                                 "--output_dir", dpo], tmp_path)
    assert (dpo / "adapter_model.safetensors").is_file()
    argv = ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--reward_function", "triviaqa_f1", "--save_strategy", "steps",
            "--save_steps", "2", "--report_to", "none"]
    _launch(torchrun(), "ppo.py", [*argv, "--output_dir", ppo], tmp_path)
    config = json.loads((ppo / "run_config.json").read_text())
    assert config["summary"]["rollouts"] == 4 * 4 * 2  # steps x per-process rollouts x processes
    assert sorted(f.name for f in (ppo / "checkpoint-2").glob("rng_state_*")) == \
        ["rng_state_0.safetensors", "rng_state_1.safetensors"]

    # Resumed on two processes from step 2, each process goes on with its own prompts and random state.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ppo / "checkpoint-2", resumed / "checkpoint-2")
    _launch(torchrun(), "ppo.py", [*argv, "--output_dir", resumed, "--resume_from_checkpoint", "auto"], tmp_path)
    history = [json.loads((d / "trainer_state.json").read_text())["log_history"] for d in (ppo, resumed)]
    for key in ("score", "kl", "policy_loss", "value_loss"):
        assert [e[key] for e in history[1]] == pytest.approx([e[key] for e in history[0]], rel=1e-4, abs=1e-6), key


# Put on the PYTHONPATH of the launched processes: rank 1 reaches the final save late, while rank 0
# is still writing into the staging folder.
SLOW_SAVE = """
import os, time

from common.recipe import outputs, training

_save_final, _absolute_base_path = outputs.save_final, outputs.absolute_base_path


def save_final(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        time.sleep(1.0)
    return _save_final(*args, **kwargs)


def absolute_base_path(folder):
    time.sleep(3.0)  # rank 0, half-way through writing the staging folder
    return _absolute_base_path(folder)


training.save_final, outputs.absolute_base_path = save_final, absolute_base_path
"""


def test_a_late_rank_never_clears_what_the_main_process_is_saving(tiny_llama, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SAVE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*torchrun(), "lora.py", "--model_id", tiny_llama, "--dataset_name", "triviaqa-sample",
                           "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                           "--report_to", "none", "--output_dir", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "run_config.json").is_file()


@pytest.mark.parametrize("script,extra", [
    ("orpo.py", []), ("kto.py", []), ("simpo.py", []), ("reward_model.py", []),
    ("grpo.py", ["--reward_function", "triviaqa_f1", "--num_generations", "4", "--max_completion_length", "4"]),
])
def test_every_training_script_runs_with_two_processes(script, extra, tiny_llama, tmp_path):
    out = tmp_path / "run"
    done = _launch(torchrun(), script, ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_steps",
                                        "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                                        "--report_to", "none", "--output_dir", out, *extra], tmp_path)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "run_config.json").is_file() and done.stdout.count("run summary") == 1


def test_evaluate_and_merge_with_two_processes(tiny_llama, tmp_path):
    from tests.helpers import run_script

    adapter = tmp_path / "adapter"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_steps", "2",
                                  "--save_strategy", "no", "--report_to", "none", "--output_dir", adapter]) == 0
    flags = ["--model_id", adapter, "--dataset_name", "triviaqa-sample", "--dataset_split", "train", "--max_samples",
             "41", "--batch_size", "8"]
    assert run_script("evaluate.py", [*flags, "--output_dir", tmp_path / "one"]) == 0
    done = _launch(torchrun(), "evaluate.py", [*flags, "--output_dir", tmp_path / "two"], tmp_path)
    assert done.stdout.count("TriviaQA  n=41") == 1  # each process answered half; one report
    one, two = ([json.loads(line) for line in open(tmp_path / d / "predictions.jsonl")] for d in ("one", "two"))
    assert [(r["question"], r["prediction"]) for r in two] == [(r["question"], r["prediction"]) for r in one]
    assert json.loads((tmp_path / "two" / "eval_results.json").read_text())["processes"] == 2

    done = _launch(torchrun(), "merge.py", ["--adapter", adapter, "--output_dir", tmp_path / "merged"], tmp_path)
    assert done.stdout.count("wrote the merged model to") == 1
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_two_process_resume_past_the_first_epoch_equals_the_uninterrupted_run(tiny_llama, tmp_path):
    # 16 rows, 2 processes with batches of 2: 4 steps an epoch, so checkpoint-6 lies in epoch 2. The
    # default length-grouped batches; losses logged every 3 steps, so the checkpoint holds loss not yet
    # logged.
    from safetensors.torch import load_file

    argv = ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_train_samples", "16",
            "--per_device_train_batch_size", "2", "--max_steps", "10", "--save_strategy", "steps", "--save_steps",
            "6", "--logging_steps", "3", "--report_to", "none", "--learning_rate", "1e-2"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _launch(torchrun(), "lora.py", [*argv, "--output_dir", reference], tmp_path)
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-6", resumed / "checkpoint-6")
    _launch(torchrun(), "lora.py", [*argv, "--output_dir", resumed, "--resume_from_checkpoint", "auto"], tmp_path)

    def state(out):
        return json.loads((out / "trainer_state.json").read_text())

    def seen(out):
        return [e["num_input_tokens_seen"] for e in state(out)["log_history"] if "loss" in e]

    def summary(out):
        info = json.loads((out / "run_config.json").read_text())["summary"]
        return {k: info[k] for k in ("steps", "train_loss")}

    assert state(resumed)["global_step"] == state(reference)["global_step"] == 10
    assert seen(resumed)[-1] == seen(reference)[-1]  # the same batches after the resume
    assert _losses(resumed)[-1] == pytest.approx(_losses(reference)[-1], rel=1e-6)
    assert summary(resumed) == pytest.approx(summary(reference), rel=1e-6)
    results = [json.loads((out / "all_results.json").read_text())["train_loss"] for out in (resumed, reference)]
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    weights = [load_file(out / "adapter_model.safetensors") for out in (resumed, reference)]
    for name in weights[1]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=1e-5)


def _run_cli_worker(rank, port, out):
    import torch.distributed as dist

    from common.recipe.cli import run_cli

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")

    def work():  # evaluate.py's shape: gather the answers, then the second process returns at once
        dist.init_process_group("gloo", rank=rank, world_size=2)
        gathered = [None, None]
        dist.all_gather_object(gathered, rank * 10)
        assert gathered == [0, 10]

    code = run_cli("evaluate.py", work)
    (out / f"rank{rank}.json").write_text(json.dumps({"code": code, "in_group": dist.is_initialized()}))


def test_every_script_leaves_its_process_group_before_exiting(tmp_path):
    """run_cli (every script's main) destroys the gloo/NCCL group once the work is done. A group left
    for the interpreter's exit can abort a finished process with "terminate called without an active
    exception" (exit -6): evaluate.py under torchrun did so once in a full suite run, after writing
    every file."""
    import torch.multiprocessing as mp

    mp.spawn(_run_cli_worker, args=(_free_port(), tmp_path), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"code": 0, "in_group": False}


def _scoring_worker(rank, port, model, out):
    import torch.distributed as dist

    from comparison import scoring

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    job = ["--model_id", model, "--dataset_name", "triviaqa-sample", "--max_samples", "5", "--batch_size", "2"]
    code = scoring.main([*job, "--output_dir", str(out / "heldout"), "+", *job, "--dataset_split", "train",
                         "--output_dir", str(out / "train")])
    (out / f"rank{rank}.json").write_text(json.dumps({"code": code, "in_group": dist.is_initialized()}))


def test_compare_scoring_under_two_processes_scores_every_split_then_leaves_the_group(tiny_llama, tmp_path):
    """compare.py's scoring child runs evaluate.py's scorer for the held-out split, then a sample of
    training questions, in one process: the group stays joined for the second and is left after it."""
    import torch.multiprocessing as mp

    mp.spawn(_scoring_worker, args=(_free_port(), tiny_llama, tmp_path), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"code": 0, "in_group": False}
    for split in ("heldout", "train"):
        assert json.loads((tmp_path / split / "eval_results.json").read_text())["processes"] == 2
