"""compare.py: several techniques, one table. The references are each run's own files
(eval_results.json, run_config.json, all_results.json) and hand-computed values."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import run_script

FAST = ["--dataset_name", "triviaqa-sample", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--eval_samples", "4", "--train_eval_samples", "4"]


def _rows(out) -> dict:
    return {r["technique"]: r for r in json.loads((Path(out) / "comparison.json").read_text())["runs"]}


def _json(path) -> dict:
    return json.loads(Path(path).read_text())


def _commands(run_dir) -> int:
    """Child processes compare.py started for this run (each one is logged as `$ command`)."""
    log = Path(run_dir) / "compare.log"
    return sum(1 for line in log.read_text(errors="replace").splitlines() if line.startswith("$ ")) if log.exists() else 0


@pytest.fixture(scope="module")
def compared(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    code = run_script("compare.py", ["--techniques", "lora,prompt_tuning", "--model_id", tiny_llama, *FAST,
                                     "--output_dir", out])
    assert code == 0
    return out


@pytest.mark.slow
def test_comparison_writes_table_json_and_plots(compared):
    table = (compared / "comparison.md").read_text()
    for technique in ("lora", "prompt_tuning"):
        assert f"| {technique} |" in table
    assert "Machine:" in table and "held-out EM" in table
    rows = _rows(compared)
    assert set(rows) == {"lora", "prompt_tuning"}
    for row in rows.values():
        assert row["status"] == "trained" and row["reason"] is None
        assert row["steps"] == 2
        for key in ("technique", "output_dir", "exact_match", "f1", "trainable_params", "train_runtime",
                    "peak_memory_gib", "status"):
            assert key in row
    for name in ("loss.png", "exact_match.png", "cost.png"):
        assert (compared / "plots" / name).stat().st_size > 1000


@pytest.mark.slow
def test_comparison_json_equals_each_runs_own_files(compared):
    for technique, row in _rows(compared).items():
        run = compared / technique
        assert Path(row["output_dir"]) == run
        scores = _json(run / "eval-heldout" / "eval_results.json")
        assert row["exact_match"] == scores["exact_match"] and row["f1"] == scores["f1"]
        assert row["eval_n"] == scores["n"] == 4
        train_scores = _json(run / "eval-train" / "eval_results.json")
        assert row["train_exact_match"] == train_scores["exact_match"]
        config = _json(run / "run_config.json")
        assert row["trainable_params"] == config["parameters"]["trainable"]
        assert row["peak_memory_gib"] == config["summary"]["peak_memory_gib"]
        assert row["train_runtime"] == _json(run / "all_results.json")["train_runtime"]
        history = _json(run / "trainer_state.json")["log_history"]
        assert row["final_train_loss"] == [e["loss"] for e in history if "loss" in e][-1]
        # The held-out split is TriviaQA's validation: SFT runs report their loss on it too.
        assert row["eval_loss"] == _json(run / "all_results.json")["eval_loss"]
    rows = _rows(compared)
    # Each technique keeps its own script's learning rate (prompt tuning's is far higher).
    lrs = {t: _json(compared / t / "run_config.json")["flags"]["learning_rate"] for t in rows}
    assert lrs == {"lora": 2e-4, "prompt_tuning": 3e-2}


@pytest.mark.slow
def test_second_invocation_reuses_finished_runs_and_scores(compared, tiny_llama):
    files = [compared / t / name for t in ("lora", "prompt_tuning")
             for name in ("adapter_model.safetensors", "run_config.json", "eval-heldout/eval_results.json")]
    before = {f: f.stat().st_mtime_ns for f in files}
    started = {t: _commands(compared / t) for t in ("lora", "prompt_tuning")}
    code = run_script("compare.py", ["--techniques", "lora,prompt_tuning", "--model_id", tiny_llama, *FAST,
                                     "--output_dir", compared])
    assert code == 0
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert {t: _commands(compared / t) for t in started} == started  # no training, no scoring started
    assert {r["status"] for r in _rows(compared).values()} == {"reused"}


@pytest.mark.slow
def test_a_failing_technique_is_reported_while_the_others_finish(compared, tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(compared / "prompt_tuning", out / "prompt_tuning")  # finished: reused, not retrained
    code = run_script("compare.py", ["--techniques", "lora,prompt_tuning", "--model_id", tiny_llama, *FAST,
                                     "--max_steps", "3", "--prompt_tuning.max_steps", "2",
                                     "--lora.learning_rate", "1e30", "--output_dir", out])
    assert code == 1
    rows = _rows(out)
    assert rows["lora"]["status"] == "failed"
    assert rows["lora"]["reason"].startswith("lora.py: error: the training loss became nan")
    assert rows["lora"]["exact_match"] is None
    assert rows["prompt_tuning"]["status"] == "reused"
    assert rows["prompt_tuning"]["exact_match"] == _json(out / "prompt_tuning/eval-heldout/eval_results.json")[
        "exact_match"]
    table = (out / "comparison.md").read_text()
    assert "failed: lora.py: error: the training loss became nan" in table
    lora_line = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert lora_line.count("n/a") == 11  # every figure of a run that never finished
    assert "1 of 2 techniques failed: lora" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_compares_existing_directories_without_training(compared, tmp_path):
    runs = [compared / "lora", compared / "prompt_tuning"]
    before = {r: (r / "adapter_model.safetensors").stat().st_mtime_ns for r in runs}
    code = run_script("compare.py", ["--runs", *runs, "--eval_samples", "4", "--train_eval_samples", "4",
                                     "--output_dir", tmp_path / "cmp"])
    assert code == 0
    rows = _rows(tmp_path / "cmp")
    assert set(rows) == {"lora", "prompt_tuning"}
    for technique, row in rows.items():
        assert row["status"] == "finished"
        assert row["exact_match"] == _json(compared / technique / "eval-heldout/eval_results.json")["exact_match"]
    assert {r: (r / "adapter_model.safetensors").stat().st_mtime_ns for r in runs} == before
    assert (tmp_path / "cmp" / "plots" / "loss.png").is_file()


def test_runs_refuses_a_directory_that_is_not_a_finished_run(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert run_script("compare.py", ["--runs", tmp_path / "half", "--output_dir", tmp_path / "cmp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("compare.py: error: `--runs`") and "not a finished run" in err[-1]


@pytest.mark.slow
def test_changed_settings_refuse_to_reuse_a_finished_run(compared, tiny_llama, capsys):
    code = run_script("compare.py", ["--techniques", "lora", "--model_id", tiny_llama, *FAST, "--max_steps", "5",
                                     "--output_dir", compared])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "finished lora run made with other `--max_steps`" in err and "--lora.overwrite_output_dir" in err


# Flags, launching and the table, without training --------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--techniques", "lora,lorra"], "did you mean 'lora'"),
    (["--techniques", "lora", "--lora_rr", "8"], "did you mean `--lora_r`"),
    (["--techniques", "lora", "--runs", "x"], "not both"),
    ([], "not neither"),
    (["--techniques", "lora", "--dora.lora_r", "8"], "dora is not in `--techniques`"),
    (["--techniques", "lora", "--lora.beta", "0.1", "--model_id", "m"], "lora.py has no flag `--beta`"),
])
def test_flag_mistakes_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert run_script("compare.py", [*argv, "--output_dir", tmp_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("compare.py: error:") and message in err[-1]


def test_shared_flags_go_only_to_the_techniques_they_apply_to(tmp_path):
    from comparison.run import parse, technique_argv
    from comparison.techniques import runner

    plan = parse(["--techniques", "lora,prompt_tuning,dpo", "--model_id", "m", "--lora_r", "8",
                  "--num_virtual_tokens", "5", "--max_steps=7", "--prompt_tuning.learning_rate", "0.1"])
    argv = {t: technique_argv(runner(t), plan, tmp_path) for t in ("lora", "prompt_tuning", "dpo")}
    assert argv["lora"] == ["--model_id", "m", "--lora_r", "8", "--max_steps=7", "--output_dir",
                            str(tmp_path / "lora"), "--resume_from_checkpoint", "auto"]
    assert argv["prompt_tuning"] == ["--model_id", "m", "--num_virtual_tokens", "5", "--max_steps=7",
                                     "--learning_rate", "0.1", "--output_dir", str(tmp_path / "prompt_tuning"),
                                     "--resume_from_checkpoint", "auto"]
    assert argv["dpo"][:5] == ["--model_id", "m", "--lora_r", "8", "--max_steps=7"]


def test_each_run_gets_the_launch_compare_was_started_with():
    from comparison.launch import child_env, launch_prefix
    from common.args import UsageError

    assert launch_prefix({}) == [sys.executable]
    assert launch_prefix({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with pytest.raises(UsageError, match="one node"):
        launch_prefix({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    env = child_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
                     "ACCELERATE_MIXED_PRECISION": "bf16", "PATH": "/bin"})
    assert "RANK" not in env and "WORLD_SIZE" not in env and "MASTER_PORT" not in env
    assert "TORCHELASTIC_RUN_ID" not in env
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["PATH"] == "/bin"


@pytest.mark.parametrize("output, code, reason", [
    ("step 1\nlora.py: error: the training loss became nan at step 3; lower it.\n", 2,
     "lora.py: error: the training loss became nan at step 3; lower it. (exit code 2)"),
    ("Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\n", 1,
     "torch.OutOfMemoryError: CUDA out of memory. (exit code 1)"),
    ("[rank1]: Traceback\n[rank1]: ValueError: bad shape\nE0101 torchrun failed\n", 1,
     "ValueError: bad shape (exit code 1)"),
    ("loading\n", -9, "loading (killed by SIGKILL (out of memory?))"),
])
def test_failure_reason_is_the_runs_own_last_error_line(output, code, reason):
    from comparison.launch import failure_reason

    assert failure_reason(output, code) == reason


def test_best_value_of_each_column_is_marked():
    from comparison.report import COLUMNS, markdown

    def row(name, **values):
        base = {key: None for _, key, _ in COLUMNS}
        base.update(technique=name, output_dir=name, status="trained", reason=None, eval_error=None,
                    trainable_percent=None, peak_memory_kind="process RSS", score_scale="fraction (0-1)",
                    eval_split="validation", eval_n=4, train_eval_n=4, model="m", dataset="d", dataset_split="train")
        base.update(values)
        return base

    rows = [row("a", train_runtime=10.0, exact_match=0.25, eval_loss=2.0, steps=5),
            row("b", train_runtime=20.0, exact_match=0.5, eval_loss=None, steps=5)]
    table = markdown(rows, "test machine")
    line_a = next(line for line in table.splitlines() if line.startswith("| a |")).split(" | ")
    line_b = next(line for line in table.splitlines() if line.startswith("| b |")).split(" | ")
    headers = ["technique"] + [h for h, _, _ in COLUMNS]
    col = {h: i for i, h in enumerate(headers)}
    assert line_a[col["train time (s)"]] == "**10.0**" and line_b[col["train time (s)"]] == "20.0"
    assert line_a[col["held-out EM"]] == "0.250" and line_b[col["held-out EM"]] == "**0.500**"
    assert line_a[col["held-out loss"]] == "2.0000" and line_b[col["held-out loss"]] == "n/a"  # one value: unranked
    assert line_a[col["steps"]] == line_b[col["steps"]] == "5"  # the budget is not ranked
    assert "test machine" in table
