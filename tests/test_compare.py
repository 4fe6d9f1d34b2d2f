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


# Preference and RL techniques from one SFT start --------------------------------------------

@pytest.fixture(scope="module")
def sft_start(tiny_llama, tmp_path_factory):
    """One SFT LoRA run that every preference and RL comparison of this module starts from."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_steps", "2",
                                  "--save_strategy", "no", "--report_to", "none", "--output_dir", out]) == 0
    return out


@pytest.fixture(scope="module")
def compared_from_sft(sft_start, tmp_path_factory):
    """`--techniques dpo,orpo,ppo,grpo --reward_function triviaqa_f1 --model_id outputs/sft`: the
    reward flag goes to PPO and GRPO only (the test of technique_argv covers the routing)."""
    out = tmp_path_factory.mktemp("compare-sft") / "out"
    code = run_script("compare.py", ["--techniques", "dpo,orpo,ppo,grpo", "--reward_function", "triviaqa_f1",
                                     "--model_id", sft_start, *FAST, "--output_dir", out])
    assert code == 0
    return out


@pytest.mark.slow
def test_preference_and_rl_comparison_from_sft_start_equals_each_runs_own_files(compared_from_sft, sft_start):
    out = compared_from_sft
    rows = _rows(out)
    assert list(rows) == ["dpo", "orpo", "ppo", "grpo"]
    table = (out / "comparison.md").read_text()
    assert all(f"| {t} |" in table for t in rows)
    assert all((out / "plots" / name).stat().st_size > 1000 for name in ("loss.png", "exact_match.png", "cost.png"))
    for technique, row in rows.items():
        run = out / technique
        config = _json(run / "run_config.json")
        assert row["status"] == "trained" and row["steps"] == 2, (technique, row)
        assert config["model"]["start_adapter"] == str(sft_start)  # trained from the SFT run, not the base
        scores = _json(run / "eval-heldout" / "eval_results.json")
        assert (row["exact_match"], row["f1"]) == (scores["exact_match"], scores["f1"])
        assert (row["exact_match_percent"], row["f1_percent"]) == (scores["exact_match_percent"],
                                                                   scores["f1_percent"])
        assert row["eval_n"] == scores["n"] == 4
        assert row["train_exact_match"] == _json(run / "eval-train" / "eval_results.json")["exact_match"]
        assert row["trainable_params"] == config["parameters"]["trainable"]
        assert row["peak_memory_gib"] == config["summary"]["peak_memory_gib"]
        if technique == "ppo":  # ppo.py writes no all_results.json; its summary has the time
            assert row["train_runtime"] == config["summary"]["runtime_s"]
        else:
            assert row["train_runtime"] == _json(run / "all_results.json")["train_runtime"]
        assert row["adapter_bytes"] == (run / "adapter_model.safetensors").stat().st_size
        history = _json(run / "trainer_state.json")["log_history"]
        if technique == "ppo":  # the loss ppo.py minimises: policy loss + vf_coef x value loss
            last = [e for e in history if "policy_loss" in e][-1]
            assert row["final_train_loss"] == last["policy_loss"] + config["flags"]["vf_coef"] * last["value_loss"]
        else:
            assert row["final_train_loss"] == [e["loss"] for e in history if "loss" in e][-1]
    # Held-out loss: DPO's and ORPO's objective on the held-out pairs, as each run wrote it.
    for technique in ("dpo", "orpo"):
        assert rows[technique]["eval_loss"] == _json(out / technique / "all_results.json")["eval_loss"]
    # PPO and GRPO have no held-out loss; nothing made one up.
    assert rows["ppo"]["eval_loss"] is None and rows["grpo"]["eval_loss"] is None
    # Tokens: DPO counts its own; GRPO counts them in the Trainer's state; ORPO and PPO count none.
    dpo, grpo = (_json(out / t / "run_config.json")["summary"] for t in ("dpo", "grpo"))
    assert rows["dpo"]["train_tokens_per_s"] == dpo["tokens_per_s"]
    seen = _json(out / "grpo" / "trainer_state.json")["num_input_tokens_seen"]
    assert seen > 0 and rows["grpo"]["train_tokens"] == seen
    assert rows["grpo"]["train_tokens_per_s"] == round(seen / grpo["runtime_s"], 1)
    assert rows["orpo"]["train_tokens_per_s"] is None and rows["ppo"]["train_tokens_per_s"] is None


@pytest.mark.slow
def test_each_run_under_torchrun_uses_two_processes(tiny_llama, tmp_path):
    """`torchrun --nproc_per_node 2 compare.py ...`: the run and its scoring are each started with
    torchrun on two processes. The reference for "two processes" is the epoch reached after 2 steps
    of 4 examples per process: 2 / ceil(300 / (4 x 2)) of the bundled 300 training rows, where one
    process would reach 2 / 75. (One technique keeps it short; each one is started the same way.)"""
    import math
    import subprocess

    from tests.conftest import ROOT
    from tests.test_distributed import torchrun

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([*torchrun(), "compare.py", "--techniques", "lora", "--model_id", tiny_llama, *FAST,
                           "--train_eval_samples", "0", "--per_device_train_batch_size", "4", "--output_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    state = _json(out / "lora" / "trainer_state.json")
    assert state["global_step"] == 2
    assert state["epoch"] == pytest.approx(2 / math.ceil(300 / (4 * 2)))
    commands = [line for line in (out / "lora" / "compare.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2  # training, then scoring
    assert all("torch.distributed.run --standalone --nproc_per_node=2" in c for c in commands)
    assert _rows(out)["lora"]["exact_match"] == _json(out / "lora" / "eval-heldout/eval_results.json")["exact_match"]
    assert done.stdout.count("# Technique comparison") == 1  # one table, from the main process


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


def test_each_run_gets_the_launch_compare_was_started_with(monkeypatch):
    from comparison.launch import child_env, launch_prefix
    from common.recipe import progress as quiet
    from common.flags.errors import UsageError

    monkeypatch.setattr(quiet, "interactive", lambda stream=None: False)  # compare.py's output goes to a file

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
    assert quiet.TERMINAL_VAR not in env  # the runs log as to a file


def test_runs_relayed_to_a_terminal_draw_their_bars_as_in_one(monkeypatch):
    """A run's output reaches compare.py through a pipe and goes on to compare.py's stdout; where that
    is a terminal the run is told so, and draws its bars as it would there."""
    import io
    import sys

    from comparison.launch import child_env
    from common.recipe import progress as quiet

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv(quiet.TERMINAL_VAR, raising=False)
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert child_env({"PATH": "/bin"})[quiet.TERMINAL_VAR] == "1"
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # `compare.py ... > out.txt` from a terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert quiet.TERMINAL_VAR not in child_env({"PATH": "/bin"})


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


def _fake_run(path, summary=None, state=None, flags=None, heldout=None):
    path.mkdir(parents=True)
    (path / "run_config.json").write_text(json.dumps({"technique": path.name, "flags": flags or {},
                                                      "summary": summary or {}}))
    (path / "trainer_state.json").write_text(json.dumps(state or {"global_step": 1, "log_history": []}))
    if heldout is not None:
        (path / "eval-heldout").mkdir()
        (path / "eval-heldout" / "eval_results.json").write_text(json.dumps(heldout))
    return path


def test_scores_take_their_scale_from_the_keys_of_eval_results(tmp_path):
    """evaluate.py writes `exact_match`/`f1` as fractions and `*_percent` as percentages
    (common.evaluation.answers.summarize); nothing is inferred from the size of a value."""
    from comparison.report import collect, markdown

    now = _fake_run(tmp_path / "now", heldout={"n": 4, "exact_match": 0.25, "f1": 0.5, "exact_match_percent": 25.0,
                                               "f1_percent": 50.0})
    before = _fake_run(tmp_path / "before", heldout={"n": 4, "exact_match": 0.75, "f1": 1.0})  # no percent keys
    rows = [collect(now), collect(before)]
    assert [(r["exact_match"], r["f1"], r["exact_match_percent"], r["f1_percent"]) for r in rows] == [
        (0.25, 0.5, 25.0, 50.0), (0.75, 1.0, 75.0, 100.0)]
    table = markdown(rows, "m")
    assert "| now |" in table and "0.250 | 0.500" in table and "**0.750** | **1.000**" in table
    assert "EM and F1 are fractions (0-1)" in table


def test_ppo_loss_and_trainer_state_tokens_are_read_from_the_runs_files(tmp_path):
    """PPO's loss is ppo.py's `pg + vf_coef * vf` (its logged terms are means over the same updates);
    GRPO's tokens are the Trainer's `num_input_tokens_seen` when the summary has none."""
    from comparison.report import collect

    ppo = _fake_run(tmp_path / "ppo", flags={"vf_coef": 0.1}, summary={"runtime_s": 2.0},
                    state={"global_step": 2, "log_history": [{"step": 1, "policy_loss": -0.5, "value_loss": 2.0},
                                                            {"step": 2, "policy_loss": 0.25, "value_loss": 1.5}]})
    grpo = _fake_run(tmp_path / "grpo", summary={"runtime_s": 0.5, "tokens_trained": None, "tokens_per_s": None},
                     state={"global_step": 2, "num_input_tokens_seen": 588,
                            "log_history": [{"step": 2, "loss": 0.125}]})
    row = collect(ppo)
    assert row["final_train_loss"] == 0.25 + 0.1 * 1.5
    assert row["train_tokens_per_s"] is None  # PPO counts rollouts, not tokens
    row = collect(grpo)
    assert (row["train_tokens"], row["train_tokens_per_s"], row["final_train_loss"]) == (588, 1176.0, 0.125)


def test_preference_runs_report_their_held_out_loss_where_the_split_exists(tmp_path):
    from comparison.run import parse, run_argv
    from comparison.techniques import runner

    def argv(technique, dataset):
        plan = parse(["--techniques", technique, "--model_id", "m", "--dataset_name", dataset])
        return run_argv(runner(technique), plan, tmp_path)

    for technique in ("lora", "dpo", "orpo", "simpo", "kto"):
        assert argv(technique, "triviaqa-sample")[-2:] == ["--eval_strategy", "epoch"], technique
    for technique in ("ppo", "grpo"):  # no held-out loss to report
        assert "--eval_strategy" not in argv(technique, "triviaqa-sample")
    assert "--eval_strategy" not in argv("dpo", "my/pairs")  # a split named `validation` may not exist


def test_help_says_config_goes_to_every_run(capsys):
    with pytest.raises(SystemExit):
        run_script("compare.py", ["--help"])
    out = capsys.readouterr().out
    line = " ".join(out[out.index("--config FILE"):out.index("CompareArguments")].split())
    assert "given to every run" in line and "compare.py's own flags" in line


def test_a_failed_scoring_is_reported_and_the_comparison_exits_1(tmp_path, caplog):
    from comparison.report import collect
    from comparison.run import write_outputs

    rows = [collect(_fake_run(tmp_path / "a", heldout={"n": 4, "exact_match": 0.5, "f1": 0.5})),
            collect(_fake_run(tmp_path / "b"))]
    rows[1]["eval_error"] = "NameError: name 'prompts' is not defined (exit code 1)"
    assert write_outputs(rows, tmp_path / "cmp") == 1
    assert "scoring failed for b" in caplog.text
    b = next(line for line in (tmp_path / "cmp" / "comparison.md").read_text().splitlines() if line.startswith("| b |"))
    assert "scoring failed: NameError: name 'prompts' is not defined" in b
