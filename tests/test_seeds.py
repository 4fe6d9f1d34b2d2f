"""`--seed` alone decides a run: two runs of every training script with the same flags save the same
adapter (and value or score head) bit for bit. Here on one process, both runs in this process one
after the other, so anything drawn from a random state that the run did not seed itself (the
first run has moved it on) shows up. On two processes: tests/test_deepspeed.py."""

import pytest
import torch

from tests.helpers import run_script
from tests.training_jobs import SCRIPTS, assert_bit_identical, jobs


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_runs_with_the_same_seed_save_identical_weights(script, tiny_llama, tmp_path):
    (_, first), = jobs(tiny_llama, tmp_path / "first", per_device=4, scripts=[script])
    (_, second), = jobs(tiny_llama, tmp_path / "second", per_device=4, scripts=[script])
    assert run_script(script, first) == 0
    torch.rand(7)  # whatever ran in this process before the second run
    assert run_script(script, second) == 0
    name = script.removesuffix(".py")
    assert_bit_identical(tmp_path / "first" / name, tmp_path / "second" / name)


def test_another_seed_saves_other_weights(tiny_llama, tmp_path):
    """The comparison above can fail: a different `--seed` gives a different adapter."""
    (_, first), = jobs(tiny_llama, tmp_path / "first", per_device=4, scripts=["reward_model.py"])
    (_, second), = jobs(tiny_llama, tmp_path / "second", per_device=4, scripts=["reward_model.py"])
    second[second.index("--seed") + 1] = "8"
    assert run_script("reward_model.py", first) == 0 and run_script("reward_model.py", second) == 0
    with pytest.raises(AssertionError, match="differs"):
        assert_bit_identical(tmp_path / "first" / "reward_model", tmp_path / "second" / "reward_model")
