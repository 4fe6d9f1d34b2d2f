"""Every training script under the shipped DeepSpeed configs (ZeRO-2, ZeRO-3), launched as users launch
them (`accelerate launch --config_file configs/accelerate/deepspeed_zero*.yaml --num_processes 2`), on
2 CPU processes (DS_ACCELERATOR=cpu; DeepSpeed compiles one communication op at the first launch and
later launches reuse it). Checked against the same run on 1 process with the same global batch
(losses, adapters within 1e-5, greedy answers through evaluate.py); GRPO and PPO, which sample on each
process, against a 2-process data-parallel run with the same seeds. Also: two 2-process runs with the
same seed save bit-identical weights; ZeRO-3 partitions the weights as they load, and each process's
memory during loading is below one process's; FSDP on a CPU stops with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import run_script
from tests.test_distributed import _free_port, torchrun
from tests.training_jobs import SAMPLED, SCRIPTS, assert_bit_identical, jobs, losses, saved_weights, write_jobs

pytestmark = pytest.mark.slow

CONFIGS = ROOT / "configs" / "accelerate"
# A freed block stays in glibc's heap once its dynamic threshold has grown, and the resident size
# would show what the allocator kept, not what the load needed.
DS_ENV = {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
GENERATIVE = [s for s in SCRIPTS if s != "reward_model.py"]
PPO_RESUME = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


def accelerate_launch(config: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", _free_port()]


def launch(launcher: list[str], argv: list, env: dict = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **DS_ENV, **(env or {})}
    done = subprocess.run([*launcher, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    if check and done.returncode != 0:
        own = [line for line in done.stderr.splitlines() if not line.startswith("[rank1]")]
        pytest.fail(f"{argv[0]} exited {done.returncode}:\n" + "\n".join(own)[-6000:])
    return done


def drop(argv: list, flag: str) -> list:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def more_jobs(job_list: list, root: Path, reward_model: Path, other_stage: Path = None) -> list:
    """PPO again for 4 steps with a checkpoint at step 2, then resumed from that checkpoint; PPO and
    GRPO scored by a reward model (loaded whole on each process under ZeRO-3); with `other_stage`
    (a checkpoint written under the other ZeRO stage), last, a resume from it, which must stop."""
    argv = {script: a for script, a in job_list}
    full = drop(drop(drop(argv["ppo.py"], "--max_steps"), "--save_strategy"), "--output_dir") + PPO_RESUME
    scored = {s: drop(drop(argv[s], "--reward_function"), "--output_dir") + ["--reward_model", str(reward_model)]
              for s in SAMPLED}
    more = [["ppo.py", [*full, "--output_dir", str(root / "ppo-full")]],
            ["ppo.py", [*full, "--output_dir", str(root / "ppo-resumed"), "--resume_from_checkpoint",
                        str(root / "ppo-full" / "checkpoint-2")]],
            *[[s, [*a, "--output_dir", str(root / f"{_name(s)}-rm")]] for s, a in scored.items()]]
    if other_stage:
        more.append(["ppo.py", [*full, "--output_dir", str(root / "ppo-other-stage"), "--resume_from_checkpoint",
                                str(other_stage)]])
    return [*job_list, *more]


def run_jobs(model: str, launcher: list[str], root: Path, reward_model: Path, env: dict = None,
             other_stage: Path = None) -> Path:
    """Runs the jobs in one launch; every one must succeed but the last with `other_stage` (exit 2).
    The launch's stderr is kept in root/stderr.txt."""
    job_list = more_jobs(jobs(model, root, per_device=2, dropout=False), root, reward_model, other_stage)
    done = launch(launcher, [ROOT / "tests" / "launch_jobs.py", write_jobs(root / "jobs.json", job_list)], env=env,
                  check=False)
    (root / "stderr.txt").write_text(done.stderr)
    expected = [0] * (len(job_list) - 1) + [2 if other_stage else 0]
    codes = [json.loads((root / f"jobs.json.rank{rank}").read_text()) if (root / f"jobs.json.rank{rank}").is_file()
             else None for rank in (0, 1)]
    if codes != [expected, expected]:
        own = [line for line in done.stderr.splitlines() if not line.startswith("[rank1]")]
        pytest.fail(f"exit codes {codes}, expected {expected}:\n" + "\n".join(own)[-6000:])
    return root


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory):
    """Every script on one process with the global batch of two processes (2 x 2 rows)."""
    root = tmp_path_factory.mktemp("one-process")
    for script, argv in jobs(model, root, per_device=4, dropout=False):
        assert run_script(script, argv) == 0, script
    return root


@pytest.fixture(scope="module")
def data_parallel(model, one_process, tmp_path_factory):
    """Every script on 2 processes without DeepSpeed, twice."""
    return [run_jobs(model, torchrun(), tmp_path_factory.mktemp(f"ddp-{i}"), one_process / "reward_model")
            for i in (1, 2)]


@pytest.fixture(scope="module")
def zero(model, one_process, tmp_path_factory):
    """Every script under each shipped DeepSpeed config; under ZeRO-3 with the load probe
    (tests/load_probe), which records what each process holds once a model has loaded."""
    roots = {}
    for stage in (2, 3):
        root = tmp_path_factory.mktemp(f"zero{stage}")
        probe = {}
        if stage == 3:
            (root / "probe").mkdir()
            probe = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "load_probe"), str(ROOT)]),
                     "LOAD_PROBE_DIR": str(root / "probe")}
        roots[stage] = run_jobs(model, accelerate_launch(CONFIGS / f"deepspeed_zero{stage}.yaml"), root,
                                one_process / "reward_model", env=probe,
                                other_stage=roots[2] / "ppo-full" / "checkpoint-2" if stage == 3 else None)
    return roots


def _name(script: str) -> str:
    return script.removesuffix(".py")


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in SAMPLED and s != "orpo.py"])
def test_deepspeed_equals_one_process_with_the_same_global_batch(script, stage, zero, one_process):
    ours, reference = zero[stage] / _name(script), one_process / _name(script)
    assert losses(ours) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)
    mine, theirs = saved_weights(ours), saved_weights(reference)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=0, msg=name)


def test_orpo_depends_on_the_process_count_alike_with_and_without_deepspeed(zero, data_parallel, one_process):
    """ORPO's NLL term (TRL's) is a token mean on each process, so 2 processes with 2 rows each train
    on another loss than 1 process with 4 rows, with DeepSpeed or without (docs/multi-gpu.md): the
    DeepSpeed runs equal the data-parallel run instead."""
    for stage in (2, 3):
        assert losses(zero[stage] / "orpo") == pytest.approx(losses(data_parallel[0] / "orpo"), rel=1e-5)
        for name, w in saved_weights(data_parallel[0] / "orpo").items():
            torch.testing.assert_close(saved_weights(zero[stage] / "orpo")[name], w, atol=1e-5, rtol=0)
    first = losses(data_parallel[0] / "orpo")[0]
    assert first == pytest.approx(losses(one_process / "orpo")[0], rel=1e-4)  # the same rows, before any step


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("script", SAMPLED)
def test_sampling_scripts_under_deepspeed_equal_data_parallel_with_the_same_seeds(script, stage, zero,
                                                                                  data_parallel):
    ours, reference = zero[stage] / _name(script), data_parallel[0] / _name(script)
    assert losses(ours) == pytest.approx(losses(reference), rel=1e-4, abs=1e-6)
    for name, w in saved_weights(reference).items():
        torch.testing.assert_close(saved_weights(ours)[name], w, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("script", SAMPLED)
def test_a_reward_model_scores_under_deepspeed_as_under_data_parallel(script, stage, zero, data_parallel):
    ours, reference = zero[stage] / f"{_name(script)}-rm", data_parallel[0] / f"{_name(script)}-rm"
    assert losses(ours) == pytest.approx(losses(reference), rel=1e-4, abs=1e-6)
    key = "score" if script == "ppo.py" else "reward"
    scores = [[e[key] for e in json.loads((d / "trainer_state.json").read_text())["log_history"] if key in e]
              for d in (ours, reference)]
    assert scores[0] and scores[0] == pytest.approx(scores[1], rel=1e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_ppo_under_deepspeed_resumes_as_if_never_stopped(stage, zero):
    full, resumed = zero[stage] / "ppo-full", zero[stage] / "ppo-resumed"
    assert (full / "checkpoint-2" / "deepspeed").is_dir()  # each process's part of the optimizer state
    history = [json.loads((d / "trainer_state.json").read_text())["log_history"] for d in (full, resumed)]
    assert len(history[0]) == len(history[1]) == 4
    for key in ("score", "kl", "policy_loss", "value_loss", "learning_rate"):
        assert [e[key] for e in history[1]] == pytest.approx([e[key] for e in history[0]], rel=1e-5, abs=1e-7), key
    for name, w in saved_weights(full).items():
        torch.testing.assert_close(saved_weights(resumed)[name], w, atol=1e-6, rtol=0)


def test_ppo_refuses_a_checkpoint_of_the_other_zero_stage(zero):
    errors = [line for line in (zero[3] / "stderr.txt").read_text().splitlines()
              if line.startswith("ppo.py: error: `--resume_from_checkpoint`")]
    assert errors and "written under ZeRO stage 2, this run is under stage 3" in errors[0], errors
    assert not (zero[3] / "ppo-other-stage" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_with_the_same_seed_save_identical_weights(script, data_parallel):
    assert_bit_identical(data_parallel[0] / _name(script), data_parallel[1] / _name(script))


def test_zero3_partitions_every_model_as_it_loads(zero):
    """Right after from_pretrained, each of the 2 processes holds half of every weight; 4-bit
    weights cannot be partitioned at load (they are at the engine's start), and a reward model that
    only scores (the -rm runs) loads whole."""
    records = {rank: [json.loads(line) for line in (zero[3] / "probe" / f"rank{rank}.jsonl").read_text().splitlines()]
               for rank in (0, 1)}
    assert len(records[0]) == len(records[1]) >= len(SCRIPTS)
    by_run = {}
    for record in records[0]:
        by_run.setdefault(record["job"], []).append(record)
    assert set(by_run) >= {_name(s) for s in SCRIPTS} | {"ppo-rm", "grpo-rm"}
    for run, loads in by_run.items():
        policy, *scorers = loads
        if run == "qlora":
            assert policy["unpartitioned"] > 0
        else:
            assert policy["unpartitioned"] == 0, (run, policy)
            assert abs(2 * policy["held"] - policy["total"]) <= 0.01 * policy["total"], (run, policy)  # halves
        if run.endswith("-rm"):
            assert [s["class"] for s in scorers] == ["LlamaForSequenceClassification"]
            assert scorers[0]["held"] == scorers[0]["total"]
        else:
            assert not scorers, (run, scorers)
    assert by_run["reward_model"][0]["class"] == "LlamaForSequenceClassification"


def test_zero3_adapters_load_in_evaluate_with_the_same_answers(zero, one_process, data_parallel, tmp_path):
    """evaluate.py reads what ZeRO-3 saved (gathered from both processes) and answers as it answers
    with the reference run's adapter."""
    for script in GENERATIVE:
        reference = (data_parallel[0] if script in (*SAMPLED, "orpo.py") else one_process) / _name(script)
        answers = []
        for i, adapter in enumerate((zero[3] / _name(script), reference)):
            out = tmp_path / f"{_name(script)}-{i}"
            assert run_script("evaluate.py", ["--model_id", adapter, "--dataset_name", "triviaqa-sample",
                                              "--max_samples", "8", "--batch_size", "8", "--output_dir", out]) == 0
            answers.append([json.loads(line)["prediction"] for line in open(out / "predictions.jsonl")])
        assert answers[0] == answers[1], script


def test_zero3_halves_what_each_process_holds_while_loading(model, tmp_path):
    """A 79M-parameter model saved in bfloat16, loaded for float32 training as on a CPU (on a GPU the
    weights land in its memory instead): one process holds all of it; under ZeRO-3 (persistence
    threshold 0, so no weight stays whole) each of 2 processes holds half, plus one layer's weights
    gathered while that layer is filled. Measured: docs/multi-gpu.md."""
    from common.model.tiny_model import build_tiny_model
    from transformers import AutoModelForCausalLM

    wide = tmp_path / "wide"
    build_tiny_model(str(wide), hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=8)
    AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32).to(torch.bfloat16).save_pretrained(wide)
    config = tmp_path / "zero3-t0.json"
    config.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    yaml = tmp_path / "zero3-t0.yaml"
    yaml.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n"
                    f"  deepspeed_config_file: {config}\n  zero3_init_flag: true\n"
                    "num_machines: 1\nmachine_rank: 0\nnum_processes: 2\nrdzv_backend: static\nsame_network: true\n"
                    "use_cpu: false\n")
    argv = ["--model_id", wide, "--dataset_name", "triviaqa-sample", "--max_train_samples", "8",
            "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--lora_r", "4"]
    peaks = {}
    for n, launcher in ((1, [sys.executable]), (2, accelerate_launch(yaml))):
        probe = tmp_path / f"probe{n}"
        probe.mkdir()
        launch([*launcher, "lora.py"], [*argv, "--output_dir", tmp_path / f"run{n}"],
               env={"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "load_probe"), str(ROOT)]),
                    "LOAD_PROBE_DIR": str(probe)})
        records = [json.loads(f.read_text()) for f in sorted(probe.glob("rank*.jsonl"))]
        assert len(records) == n
        for r in records:
            assert r["held"] * n == r["total"], r
        peaks[n] = max(r["peak_mib"] for r in records)
    print(f"peak memory while loading: 1 process {peaks[1]:.0f} MiB, each of 2 under ZeRO-3 {peaks[2]:.0f} MiB "
          f"(ratio {peaks[2] / peaks[1]:.2f})")
    assert peaks[1] > 250  # the whole model in float32 (302 MiB)
    assert peaks[2] < 0.8 * peaks[1]


def test_fsdp_on_a_machine_without_gpus_stops_with_one_line(model, tmp_path):
    out = tmp_path / "fsdp"
    done = launch([*accelerate_launch(CONFIGS / "fsdp.yaml"), "lora.py"],
                  ["--model_id", model, "--dataset_name", "triviaqa-sample", "--max_steps", "1", "--report_to", "none",
                   "--output_dir", out], check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("lora.py: error:")]
    assert errors and "FSDP" in errors[0] and "cpu_2proc.yaml" in errors[0]
    # The launcher reports a process that exited non-zero with its own traceback; none comes from
    # the script.
    ours = [line for line in done.stderr.splitlines()
            if f'File "{ROOT}' in line and "site-packages" not in line]
    assert not ours, ours
    assert not out.exists()
