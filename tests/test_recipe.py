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


SCRIPTS = ["lora.py", "dora.py", "qlora.py", "prefix_tuning.py", "p_tuning.py", "prompt_tuning.py", "dpo.py",
           "orpo.py", "kto.py", "simpo.py", "reward_model.py", "grpo.py", "ppo.py"]
EXTRA = {"grpo.py": ["--reward_function", "triviaqa_em"], "ppo.py": ["--reward_function", "triviaqa_em"],
         "prefix_tuning.py": ["--gradient_checkpointing", "False"]}  # (else a warning that it is turned off)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_data_file_stops_every_script_before_torch_is_imported(script, tiny_llama, tmp_path):
    """The output dir, the model source and the data are checked before anything heavy is imported,
    so a mistake there is one line within about a second."""
    import subprocess
    import sys
    from pathlib import Path

    argv = ["--model_id", tiny_llama, "--dataset_name", str(tmp_path / "missing.jsonl"), "--output_dir",
            str(tmp_path / "out"), *EXTRA.get(script, [])]
    code = (f"import sys, {script[:-3]} as script\ncode = script.main({argv!r})\n"
            f"print('torch imported' if 'torch' in sys.modules else 'torch not imported')\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.strip() == "torch not imported"
    assert done.stderr.count("\n") == 1 and "missing.jsonl" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "run_config.json").exists()


def test_reward_model_refuses_an_adapter_before_taking_over_its_settings(tiny_llama, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    adapter = tmp_path / "sft"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--output_dir",
                                  adapter, "--max_steps", "1", "--max_train_samples", "8",
                                  "--prompt_template", "Q: {question}\nA:"]) == 0
    done = subprocess.run([sys.executable, "reward_model.py", "--model_id", str(adapter), "--dataset_name",
                           "triviaqa-sample", "--output_dir", str(tmp_path / "rm")],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is an adapter" in done.stderr, done.stderr


@pytest.mark.parametrize("script", ["dpo.py", "orpo.py", "simpo.py", "reward_model.py"])
def test_unpaired_feedback_is_refused_before_torch_is_imported(script, tiny_llama, tmp_path):
    """KTO's prompt/completion/label rows have no pairs; the other preference scripts say so before
    any model loads (dpo/orpo/simpo said it after loading the model; reward_model.py ended in a
    traceback)."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import write_jsonl

    data = write_jsonl(tmp_path / "feedback.jsonl", [{"prompt": f"Question: item {i}?\nAnswer:", "completion": " a",
                                                      "label": i % 2 == 0} for i in range(8)])
    argv = ["--model_id", tiny_llama, "--dataset_name", data, "--output_dir", str(tmp_path / "out")]
    code = (f"import sys, {script[:-3]} as script\ncode = script.main({argv!r})\n"
            f"print('torch imported' if 'torch' in sys.modules else 'torch not imported')\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "unpaired feedback" in done.stderr, done.stderr
    assert done.stdout.strip() == "torch not imported"


@pytest.mark.parametrize("rank", [0, 1])
def test_weight_check_reads_a_zero3_part_without_its_padding(rank, monkeypatch):
    """Under ZeRO-3 each of 2 processes holds half of each weight, padded to equal parts: a 1-element
    bias is [value] on process 0 and [padding] on process 1, and the padding is uninitialised memory,
    NaN at times (a ZeRO-3 PPO run stopped with "weights became NaN" that way, at random). The check
    reads the values the process holds (the reference: the weight's own value, finite) and a real
    NaN still stops the run."""
    import torch
    import torch.distributed as dist

    from common.recipe.callbacks import NonFiniteLoss, check_finite_weights

    class Part(torch.nn.Module):
        def __init__(self, part, numel):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.empty(0))
            self.bias.ds_tensor, self.bias.ds_numel = part, numel

    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    held = torch.tensor([0.5]) if rank == 0 else torch.tensor([float("nan")])  # process 1: padding only
    check_finite_weights(Part(held, numel=1), step=1)
    if rank == 0:
        with pytest.raises(NonFiniteLoss):
            check_finite_weights(Part(torch.tensor([float("nan")]), numel=1), step=1)
