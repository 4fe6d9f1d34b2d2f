"""kto.py reports the desirable and undesirable examples it trains on, and rebalances them to the
KTO paper's range (desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3])."""

import json
from fractions import Fraction

import pytest

from tests.helpers import run_script, write_jsonl

RUN = ["--max_steps", "1", "--per_device_train_batch_size", "8", "--report_to", "none", "--save_strategy", "no"]


def _feedback(tmp_path, desirable, undesirable):
    rows = [{"prompt": f"Question: item {i}?\nAnswer:", "completion": " good" if i < desirable else " bad",
             "label": i < desirable} for i in range(desirable + undesirable)]
    return write_jsonl(tmp_path / "feedback.jsonl", rows)


def _ratio(flags, counts):
    return Fraction(str(flags["desirable_weight"])) * counts[0] / (Fraction(str(flags["undesirable_weight"])) * counts[1])


def test_kto_summary_counts_both_kinds_of_example_built_from_pairs(tiny_llama, tmp_path):
    out = tmp_path / "k"
    assert run_script("kto.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample",
                                 "--max_train_samples", "8", "--output_dir", out, *RUN]) == 0
    data = json.loads((out / "run_config.json").read_text())["data"]
    assert data["examples"] == {"desirable": 8, "undesirable": 8}  # 8 pairs -> 8 + 8 examples
    assert data["pairs"]["built"] == 8


@pytest.mark.parametrize("desirable,undesirable", [(6, 18), (20, 5)])
def test_kto_unbalanced_feedback_gets_weights_in_the_paper_range(desirable, undesirable, tiny_llama, tmp_path,
                                                                 capsys):
    out = tmp_path / "k"
    assert run_script("kto.py", ["--model_id", tiny_llama, "--dataset_name", _feedback(tmp_path, desirable, undesirable),
                                 "--output_dir", out, *RUN]) == 0
    err = capsys.readouterr().err
    config = json.loads((out / "run_config.json").read_text())
    assert config["data"]["examples"] == {"desirable": desirable, "undesirable": undesirable}
    assert 1 <= _ratio(config["flags"], (desirable, undesirable)) <= Fraction(4, 3)
    said = [line for line in err.splitlines() if "rebalance" in line]
    assert len(said) == 1 and "--desirable_weight" in said[0], err
    assert "You have different amounts" not in err  # TRL's multi-line advice is not repeated


def test_kto_explicit_weights_are_kept_with_one_warning(tiny_llama, tmp_path, capsys):
    out = tmp_path / "k"
    assert run_script("kto.py", ["--model_id", tiny_llama, "--dataset_name", _feedback(tmp_path, 6, 18),
                                 "--output_dir", out, "--undesirable_weight", "1.0", *RUN]) == 0
    err = capsys.readouterr().err
    flags = json.loads((out / "run_config.json").read_text())["flags"]
    assert (flags["desirable_weight"], flags["undesirable_weight"]) == (1.0, 1.0)
    said = [line for line in err.splitlines() if "KTO paper" in line]
    assert len(said) == 1 and "WARNING" in said[0] and "--desirable_weight 3" in said[0], err
    assert "You have different amounts" not in err


def test_rebalanced_weights_reach_the_trainer_that_trains(tiny_llama, tmp_path):
    """The trainer configuration is built before the data is paired; the weights that rebalance the
    examples must still be the ones KTOTrainer uses (reference: run_config.json's flags)."""
    from rlhf.run import train

    out = tmp_path / "k"
    result = train("kto", ["--model_id", tiny_llama, "--dataset_name", _feedback(tmp_path, 6, 18),
                           "--output_dir", str(out), *RUN])
    flags = json.loads((out / "run_config.json").read_text())["flags"]
    assert (flags["desirable_weight"], flags["undesirable_weight"]) != (1.0, 1.0)
    trainer = result.trainer
    assert (trainer.args.desirable_weight, trainer.args.undesirable_weight) == (flags["desirable_weight"],
                                                                                flags["undesirable_weight"])
    assert (trainer.desirable_weight, trainer.undesirable_weight) == (flags["desirable_weight"],
                                                                      flags["undesirable_weight"])
