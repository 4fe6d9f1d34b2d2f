"""DPO and ORPO: pair building, bad preference data, chaining after SFT, learning signals."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import run_script, write_jsonl

FAST = ["--dataset_name", "triviaqa-sample", "--max_train_samples", "64", "--per_device_train_batch_size", "16",
        "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none"]


def _rows():
    from datasets import Dataset

    return Dataset.from_dict({
        "question": ["Capital of France?", "Capital of Italy?", "Capital of Spain?", "Largest planet?"],
        "answer": ["Paris", "Rome", "Madrid", "Jupiter"],
        "aliases": [["Paris"], ["Rome", "Roma"], ["Madrid"], ["Jupiter"]],
    })


def test_other_answers_are_reproducible_and_never_correct():
    from common.evaluation.metrics import exact_match
    from rlhf.preference import other_answers

    rows = _rows()
    picks = other_answers(rows, seed=1)
    assert picks == other_answers(rows, seed=1)
    assert any(other_answers(rows, seed=s) != picks for s in range(2, 8))
    for pick, aliases in zip(picks, rows["aliases"]):
        assert pick is not None and not any(exact_match(pick, a) for a in aliases)


def test_model_answers_keep_only_wrong_ones(monkeypatch):
    from common.evaluation import answers
    from common.data.prompts import PromptFormat
    from rlhf import preference

    monkeypatch.setattr(answers, "generate_answers", lambda *a, **k: ["paris", "Milan", "", "Saturn"])
    rejected = preference.model_answers(None, None, _rows(), PromptFormat(), batch_size=2)
    assert rejected == [None, "Milan", None, "Saturn"]  # right or empty answers are skipped
    pairs, stats = preference.build_pairs(_rows(), PromptFormat(), rejected, "src", "model")
    assert stats == {"built": 2, "skipped": 2}
    assert pairs[0] == {"prompt": "Question: Capital of Italy?\nAnswer:", "chosen": " Rome", "rejected": " Milan"}


def test_conversational_pairs_for_chat_models():
    from common.data.prompts import PromptFormat
    from rlhf.preference import build_pairs

    pairs, _ = build_pairs(_rows(), PromptFormat(use_chat=True, system_prompt="Be brief."),
                           ["Lyon", None, None, None], "src", "other")
    assert pairs[0]["prompt"][-1] == {"role": "user", "content": "Capital of France?"}
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Paris"}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "Lyon"}]


@pytest.mark.parametrize("rows,match", [
    ([{"prompt": "p", "chosen": "a"}], "missing rejected"),
    ([{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3, "equals `rejected` in every row"),
    ([{"prompt": "p", "chosen": "", "rejected": "b"}], "`chosen` must be non-empty"),
    ([{"prompt": "p", "completion": "a"}], "no rejected answer"),
])
def test_bad_preference_data_exits_2(rows, match, tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert run_script("dpo.py", ["--model_id", tiny_llama, "--dataset_name", data, "--output_dir", tmp_path / "o",
                                 "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert match in err and "pairs.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "adapter_config.json").exists()


def test_empty_after_filtering_exits_2(tiny_llama, tmp_path, monkeypatch, capsys):
    from common.evaluation import answers

    monkeypatch.setattr(answers, "generate_answers", lambda model, tok, questions, *a, **k: [""] * len(questions))
    assert run_script("dpo.py", ["--model_id", tiny_llama, "--output_dir", tmp_path / "o", "--max_steps", "1",
                                 "--rejected_source", "model", *FAST]) == 2
    assert "no preference pairs left" in capsys.readouterr().err


@pytest.mark.parametrize("flags,name", [(["--beta", "0"], "--beta"), (["--loss_type", "sigmod"], "--loss_type"),
                                        (["--max_prompt_length", "600"], "--max_prompt_length")])
def test_bad_preference_flags(flags, name, capsys):
    assert run_script("dpo.py", ["--model_id", "m", *flags]) == 2
    assert name in capsys.readouterr().err


def test_text_and_conversational_pair_files_train(tiny_llama, tiny_chat_llama, tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"}
                                                 for i in range(8)])
    conv = write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]} for i in range(8)])
    for model, data, name in ((tiny_llama, text, "t"), (tiny_chat_llama, conv, "c")):
        assert run_script("dpo.py", ["--model_id", model, "--dataset_name", data, "--output_dir", tmp_path / name,
                                     "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to",
                                     "none", "--save_strategy", "no"]) == 0


def _history(out):
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "lora"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "20",
                                  "--learning_rate", "1e-2", *FAST]) == 0
    return out


def test_dpo_after_sft_learns_the_preference_against_the_sft_reference(sft_adapter, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import use_adapter

    from rlhf.run import train

    out = tmp_path / "dpo"
    result = train("dpo", ["--model_id", sft_adapter, "--output_dir", out, "--max_steps", "40", "--learning_rate",
                           "5e-3", "--beta", "0.5", *FAST])
    steps = [e for e in _history(out) if "rewards/margins" in e]
    margins = [e["rewards/margins"] for e in steps]
    accuracies = [e["rewards/accuracies"] for e in steps]
    assert _mean(margins[-2:]) > _mean(margins[:2]) + 0.05, margins
    assert _mean(accuracies[-2:]) > _mean(accuracies[:2]), accuracies
    assert result.pairs["built"] == 64
    assert not (out / "ref").exists()  # only the trained policy adapter is saved

    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["Question: Who wrote Hamlet?\nAnswer: Shakespeare"], return_tensors="pt")
    policy = result.trainer.model
    policy.eval()
    with torch.no_grad(), use_adapter(policy, "ref"):
        reference = policy(**batch).logits
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), sft_adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference, sft(**batch).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(reference, base(**batch).logits, atol=1e-3)
        trained = policy(**batch).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
        torch.testing.assert_close(reloaded(**batch).logits, trained, atol=1e-4, rtol=1e-4)
    assert (out / "plots" / "margins.png").is_file()


def test_dpo_ipo_loss_and_model_rejected_answers(sft_adapter, tmp_path):
    out = tmp_path / "ipo"
    assert run_script("dpo.py", ["--model_id", sft_adapter, "--output_dir", out, "--max_steps", "2",
                                 "--loss_type", "ipo", "--rejected_source", "model", *FAST]) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["data"]["rejected_source"] == "model" and config["data"]["pairs"]["built"] > 0


def test_orpo_loss_falls_and_log_odds_ratio_rises(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.run import train

    out = tmp_path / "orpo"
    result = train("orpo", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "40", "--learning_rate",
                            "1e-2", *FAST])
    steps = [e for e in _history(out) if "log_odds_ratio" in e]
    losses = [e["loss"] for e in steps]
    ratios = [e["log_odds_ratio"] for e in steps]
    assert _mean(losses[-2:]) < _mean(losses[:2]) - 0.1, losses
    assert _mean(ratios[-2:]) > _mean(ratios[:2]), ratios
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["Question: Who wrote Hamlet?\nAnswer:"], return_tensors="pt")
    policy = result.trainer.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, policy(**batch).logits, atol=1e-4, rtol=1e-4)
    assert (out / "plots" / "odds_ratio.png").is_file()


def test_dpo_on_a_4bit_sft_adapter(tiny_llama, tmp_path):
    from rlhf.run import train

    sft = tmp_path / "qlora"
    assert run_script("qlora.py", ["--model_id", tiny_llama, "--output_dir", sft, "--max_steps", "2", *FAST]) == 0
    result = train("dpo", ["--model_id", sft, "--output_dir", tmp_path / "dpo", "--max_steps", "2", *FAST])
    assert "Linear4bit" in {type(m).__name__ for m in result.trainer.model.modules()}  # 4-bit taken over
    # Without bf16 training (the CPU, a T4) the adapter trains in float32, as qlora.py's does: TRL's
    # trainers store a quantized model's adapters in bf16, where small updates round away.
    trainable = {p.dtype for p in result.trainer.model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}, trainable


@pytest.mark.slow
def test_sft_then_dpo_example_script(tiny_llama, tmp_path):
    # The script calls `python`, as a user's activated environment provides it: this interpreter's.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, MODEL=tiny_llama, DATA="triviaqa-sample", MAX_STEPS="4", OUT=str(tmp_path / "chain"),
               PRECISION="--use_bfloat16 False", PATH=path)
    done = subprocess.run(["bash", "examples/sft_then_dpo.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("sft", "dpo"):
        assert (tmp_path / "chain" / stage / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / "chain" / stage / "eval" / "eval_results.json").read_text())["n"] == 60
    start = json.loads((tmp_path / "chain" / "dpo" / "run_config.json").read_text())["model"]["start_adapter"]
    assert start.endswith("sft")
