"""The one training recipe (common/recipe/pipeline.py): its order of steps, the same for every
technique, and what that order guarantees. References: the order in which transformers sees the
trainer configuration and the model weights, and a second run of the same command."""

import pytest
from safetensors.torch import load_file

from tests.helpers import run_script

ARGV = {  # one family of each kind the recipe runs
    "lora.py": [],
    "dpo.py": [],
    "reward_model.py": [],
    "grpo.py": ["--reward_function", "triviaqa_em", "--per_device_train_batch_size", "4", "--num_generations", "2",
                "--max_completion_length", "4"],
}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("script", list(ARGV))
def test_trainer_configuration_exists_before_the_model_loads(script, tiny_llama, tmp_path, monkeypatch):
    """transformers shards a model at load under DeepSpeed ZeRO-3 only when the training
    arguments that carry the DeepSpeed config exist before `from_pretrained`."""
    from transformers import PreTrainedModel, TrainingArguments

    from common.recipe import training

    events = []
    post_init, from_pretrained = TrainingArguments.__post_init__, PreTrainedModel.from_pretrained.__func__

    def config_made(self):
        events.append("configuration")
        post_init(self)

    def model_loaded(cls, *args, **kwargs):
        events.append("model")
        return from_pretrained(cls, *args, **kwargs)

    def stop(*_):
        raise _Stop

    monkeypatch.setattr(TrainingArguments, "__post_init__", config_made)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(model_loaded))
    monkeypatch.setattr(training, "train_guarded", stop)
    with pytest.raises(_Stop):
        run_script(script, ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--output_dir",
                            tmp_path / "out", "--max_train_samples", "16", *ARGV[script]])
    assert "model" in events and events.index("configuration") < events.index("model")


def test_reward_model_runs_with_one_seed_are_bit_identical(tiny_llama, tmp_path):
    """Its score head is initialised as the model loads: --seed must be set before that."""
    saved = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert run_script("reward_model.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample",
                                              "--output_dir", out, "--max_train_samples", "32", "--max_steps", "2",
                                              "--seed", "7", "--eval_split", "none"]) == 0
        saved.append(load_file(str(out / "adapter_model.safetensors")))
    assert saved[0].keys() == saved[1].keys() and any("score" in k for k in saved[0])
    for key in saved[0]:
        assert saved[0][key].equal(saved[1][key]), key
