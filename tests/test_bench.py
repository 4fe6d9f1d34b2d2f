"""The benchmarks run end to end at toy sizes (their figures are only meaningful at full size,
on a quiet machine, and are never asserted here)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import bench_ppo, bench_sft
from tests.conftest import ROOT


def test_bench_sft_three_variants_large_vocabulary_train_the_same_tokens(tmp_path, capsys):
    """Ours against TRL with group_by_length and TRL at its defaults, one optimizer, a vocabulary
    wider than the tokenizer's (as --vocab_size 128256 does at full size)."""
    out = tmp_path / "sft.json"
    assert bench_sft.main(["--num_examples", "32", "--hidden_size", "64", "--num_layers", "1", "--vocab_size", "3000",
                           "--baseline_sampling", "group_by_length", "--plain_baseline", "True",
                           "--optimizer", "adamw_torch", "--ours_gradient_checkpointing", "False",
                           "--baseline_gradient_checkpointing", "False",
                           "--work_dir", str(tmp_path / "work"), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"ours", "baseline", "baseline_plain"}
    assert len({r["real_tokens"] for r in results.values()}) == 1
    assert results["baseline"]["sampling"] == "group_by_length" and results["baseline_plain"]["sampling"] == "random"
    assert {r["optimizer"] for r in results.values()} == {"adamw_torch"}
    assert "peak_memory" in report["ratio_ours_over_baseline_plain"]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "work" / "model").vocab_size == 3000
    assert "ours/baseline_plain" in capsys.readouterr().out


def test_bench_sft_compares_both_variants_on_the_same_tokens(tmp_path, capsys):
    out = tmp_path / "sft.json"
    assert bench_sft.main(["--num_examples", "48", "--hidden_size", "64", "--num_layers", "1",
                           "--work_dir", str(tmp_path / "work"), "--output", str(out),
                           "--ours_flags", "--logging_steps 1"]) == 0
    report = json.loads(out.read_text())
    ours, base = report["results"]["ours"], report["results"]["baseline"]
    assert ours["real_tokens"] == base["real_tokens"] > 0 and ours["steps"] == base["steps"] == 3
    assert ours["gradient_checkpointing"] and base["gradient_checkpointing"]  # both at their defaults
    assert set(report["ratio_ours_over_baseline"]) >= {"tokens_per_s", "peak_memory"}
    assert "ours/baseline" in capsys.readouterr().out


def test_bench_ppo_reports_rollouts_and_the_time_split(tmp_path, capsys):
    out = tmp_path / "ppo.json"
    assert bench_ppo.main(["--num_prompts", "16", "--hidden_size", "64", "--num_layers", "1", "--steps", "2",
                           "--per_device_train_batch_size", "4", "--response_length", "4", "--ppo_epochs", "1",
                           "--output", str(out)]) == 0
    result = json.loads(out.read_text())["result"]
    assert result["rollouts"] == 16 and result["rollouts_per_s"] > 0
    assert abs(sum(result["share"].values()) - 1) < 0.01 and min(result["share"].values()) > 0
    assert "rollouts/s" in capsys.readouterr().out


def test_bench_bad_flags_exit_2(capsys):
    assert bench_sft.main(["--hidden_size", "100"]) == 2
    assert bench_ppo.main(["--ppo_flags", "'unclosed"]) == 2
    err = capsys.readouterr().err
    assert "--hidden_size 100" in err and "--ppo_flags" in err and "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_bench_sft_stops_its_worker(signum, tmp_path):
    """`timeout` (SIGTERM) or Ctrl-C (SIGINT to the benchmark): no worker is left training, orphaned."""
    work = tmp_path / "work"
    bench = subprocess.Popen([sys.executable, "-m", "bench.bench_sft", "--num_examples", "48", "--hidden_size", "64",
                              "--num_layers", "1", "--work_dir", str(work), "--output", str(tmp_path / "o.json")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")
    deadline = time.monotonic() + 120
    workers = []
    while not workers and time.monotonic() < deadline and bench.poll() is None:
        workers = [int(p) for p in children.read_text().split()] if children.exists() else []
        time.sleep(0.05)
    assert workers, "the benchmark never started its worker"
    bench.send_signal(signum)
    assert bench.wait(timeout=60) == 128 + signum, bench.stderr.read()[-2000:]
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
