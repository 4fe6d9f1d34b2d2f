"""Preference data in every common shape: explicit prompt (text or messages) and implicit prompt
(Anthropic HH text with a shared beginning, or message lists whose last assistant turn differs),
for dpo.py, orpo.py, simpo.py, kto.py and reward_model.py."""

import json

import pytest

from tests.helpers import run_script, write_jsonl

FORMATS = "data/formats"
SHAPES = ["pref_explicit", "pref_hh", "pref_implicit_messages"]
FAST = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
        "--eval_split", "none"]


def _rows(name):
    with open(f"{FORMATS}/{name}.jsonl") as fh:
        return [json.loads(line) for line in fh]


def test_hh_prompt_is_the_shared_beginning_by_hand(caplog):
    from datasets import Dataset

    from rlhf.pref_formats import implicit_prompt_pairs

    raw = _rows("pref_hh")
    pairs, ties = implicit_prompt_pairs(Dataset.from_list(raw), "hh")
    assert ties == 1 and len(pairs) == len(raw) - 1
    assert "skipped 1 pairs whose chosen equals rejected" in caplog.text
    assert pairs[0] == {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:", "chosen": " Paris.",
                        "rejected": " London."}
    assert pairs[1]["prompt"] == ("\n\nHuman: Hello!\n\nAssistant: Hi, ask me anything.\n\nHuman: How many legs "
                                  "does a spider have?\n\nAssistant:")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (" Eight.", " Six.")
    # Answers sharing their first word still split at the turn, not inside the answer.
    assert (pairs[3]["chosen"], pairs[3]["rejected"]) == (" The Pacific Ocean.", " The Atlantic Ocean.")
    for row, pair in zip([r for r in raw if r["chosen"] != r["rejected"]], pairs):
        assert pair["prompt"] + pair["chosen"] == row["chosen"] and pair["prompt"] + pair["rejected"] == row["rejected"]


def test_text_without_turn_markers_splits_at_a_word():
    from rlhf.pref_formats import split_text

    assert split_text("The answer is Paris", "The answer is Pisa", "r") == ("The answer is", " Paris", " Pisa")


def test_message_lists_prompt_is_everything_before_the_last_turn():
    from datasets import Dataset

    from rlhf.pref_formats import implicit_prompt_pairs

    raw = _rows("pref_implicit_messages")
    pairs, _ = implicit_prompt_pairs(Dataset.from_list(raw), "m")
    for row, pair in zip(raw, pairs):
        assert pair["prompt"] == row["chosen"][:-1] == row["rejected"][:-1]
        assert pair["chosen"] == row["chosen"][-1:] and pair["rejected"] == row["rejected"][-1:]


@pytest.mark.parametrize("row,problem", [
    ({"chosen": "abc", "rejected": "xyz"}, "row 1: `chosen` and `rejected` share no prompt"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     "row 1: `chosen` and `rejected` must be the same conversation up to their last assistant turn"),
])
def test_bad_implicit_pair_exits_2_naming_the_row(row, problem, tiny_llama, tmp_path, capsys):
    ok = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    if isinstance(row["chosen"], list):
        ok = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
              "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    data = write_jsonl(tmp_path / "pairs.jsonl", [ok, row])
    assert run_script("dpo.py", ["--model_id", tiny_llama, "--dataset_name", data, "--output_dir", tmp_path / "o",
                                 *FAST]) == 2
    err = capsys.readouterr().err
    assert problem in err and "pairs.jsonl" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["dpo", "orpo", "simpo", "kto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_trains_every_preference_script(kind, shape, tiny_chat_llama, tmp_path):
    from rlhf.run import train

    result = train(kind, ["--model_id", tiny_chat_llama, "--dataset_name", f"{FORMATS}/{shape}.jsonl",
                          "--output_dir", tmp_path / "o", *FAST])
    pairs = len([r for r in _rows(shape) if r["chosen"] != r["rejected"]])
    assert len(result.trainer.train_dataset) == pairs * (2 if kind == "kto" else 1)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_dpo_token_ids_equal_sft_conversation_ids(chat, tiny_llama, tiny_chat_llama, tmp_path):
    """DPO on message pairs sees the token ids SFT sees for the same conversation."""
    from common.data.masking import conversation_rows
    from rlhf.run import train

    result = train("dpo", ["--model_id", tiny_chat_llama if chat else tiny_llama, "--dataset_name",
                           f"{FORMATS}/pref_explicit.jsonl", "--output_dir", tmp_path / "o", *FAST])
    tok = result.trainer.processing_class
    for raw, row in zip(_rows("pref_explicit"), result.trainer.train_dataset):
        for side in ("chosen", "rejected"):
            [sft] = conversation_rows(tok, raw["prompt"] + raw[side])
            dpo = row["prompt_ids"] + row[f"{side}_ids"]
            n, start = len(sft["input_ids"]), len(row["prompt_ids"])
            assert dpo[:n] == sft["input_ids"] and all(label == -100 for label in sft["labels"][:start])
            assert sft["labels"][start:] == sft["input_ids"][start:] and sft["labels"][-1] == tok.eos_token_id
            assert len(dpo) == n  # both stop after the end-of-turn token


def test_hh_file_trains_a_reward_model_and_reports_heldout_accuracy(tiny_llama, tmp_path):
    out = tmp_path / "rm"
    assert run_script("reward_model.py", ["--model_id", tiny_llama, "--dataset_name", f"{FORMATS}/pref_hh.jsonl",
                                          "--output_dir", out, "--max_steps", "2", "--per_device_train_batch_size",
                                          "4", "--report_to", "none", "--save_strategy", "no"]) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["data"]["pairs"]["built"] == 18 and config["data"]["heldout_pairs"] == 2  # 10% of 20 distinct
    assert config["summary"]["heldout_accuracy"] in (0.0, 0.5, 1.0)  # pooled over the 2 held-out pairs


def test_chat_sft_then_dpo_uses_the_sft_model_as_reference(tiny_chat_llama, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import use_adapter

    from common.data.templates import render
    from rlhf.run import train

    sft = tmp_path / "sft"
    assert run_script("lora.py", ["--model_id", tiny_chat_llama, "--dataset_name", f"{FORMATS}/messages.jsonl",
                                  "--output_dir", sft, "--max_steps", "3", "--learning_rate", "1e-2",
                                  "--per_device_train_batch_size", "4", "--report_to", "none",
                                  "--save_strategy", "no"]) == 0
    result = train("dpo", ["--model_id", sft, "--dataset_name", f"{FORMATS}/pref_implicit_messages.jsonl",
                           "--output_dir", tmp_path / "dpo", *FAST])
    tok = result.trainer.processing_class
    assert tok.chat_template  # the SFT run's rendering is inherited with its tokenizer
    text = render(tok, _rows("pref_implicit_messages")[0]["chosen"])
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    policy = result.trainer.model.eval()
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), sft).eval()
    with torch.no_grad(), use_adapter(policy, "ref"):
        reference = policy(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(reference, sft_model(**batch).logits, atol=1e-5, rtol=1e-5)


class _Captured(Exception):
    pass


@pytest.mark.parametrize("shape", ["pref_explicit", "pref_implicit_messages"])
def test_reward_model_message_pairs_are_chat_template_ids(shape, tiny_chat_llama, tmp_path, monkeypatch):
    """reward_model.py on message-list pairs (it crashed: its renderer shadowed common.data.chat.render) trains
    on the ids of the tokenizer's own chat template for the prompt and the last assistant turn, through its
    end-of-turn token, as SFT trains a conversation."""
    import trl
    from transformers import AutoTokenizer

    seen = {}

    class Recorder:  # stands in for TRL's RewardTrainer: records the pairs it would be given
        def __init__(self, *args, train_dataset=None, eval_dataset=None, **kwargs):
            seen["pairs"] = [*train_dataset, *eval_dataset]
            raise _Captured

    monkeypatch.setattr(trl, "RewardTrainer", Recorder)
    from rlhf import reward

    with pytest.raises(_Captured):
        reward.main(["--model_id", tiny_chat_llama, "--dataset_name", f"{FORMATS}/{shape}.jsonl",
                     "--output_dir", tmp_path / "rm", "--report_to", "none"])
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    expected = set()
    for row in _rows(shape):
        if row["chosen"] == row["rejected"]:
            continue
        prompt = row.get("prompt", row["chosen"][:-1])
        ids = [tok.apply_chat_template(prompt + [row[side][-1]], return_dict=True)["input_ids"]
               for side in ("chosen", "rejected")]
        # through the last turn's end-of-turn token (this template's `</s>`), not the newline after it
        expected.add(tuple(tuple(i[:len(i) - i[::-1].index(tok.eos_token_id)]) for i in ids))
    assert {(tuple(p["chosen_ids"]), tuple(p["rejected_ids"])) for p in seen["pairs"]} == expected


@pytest.mark.parametrize("script", ["dpo.py", "kto.py", "reward_model.py"])
@pytest.mark.parametrize("shape,value,problem", [
    ("pref_explicit", "messages", "`--dataset_format messages` is an SFT format"),
    ("pref_hh", "preference", "has the columns of 'implicit-prompt'"),
    ("pref_explicit", "triviaqa", "has the columns of 'preference'"),
    ("pref_hh", "chat", "`--dataset_format chat` is unknown"),
])
def test_preference_dataset_format_that_does_not_fit_exits_2(script, shape, value, problem, tiny_llama, tmp_path,
                                                             capsys):
    assert run_script(script, ["--model_id", tiny_llama, "--dataset_name", f"{FORMATS}/{shape}.jsonl",
                               "--dataset_format", value, "--output_dir", tmp_path / "o", *FAST]) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err and len([ln for ln in err.splitlines() if "error" in ln]) == 1


@pytest.mark.parametrize("shape,value", [("pref_hh", "implicit-prompt"), ("pref_explicit", "preference")])
def test_preference_dataset_format_that_fits_counts_every_tie_as_skipped(shape, value, tiny_llama, tmp_path):
    """The pairs `skipped` in run_config.json are the rows whose chosen equals rejected, counted here by hand
    (implicit-prompt ties were logged but not counted)."""
    rows = _rows(shape)
    if not any(r["chosen"] == r["rejected"] for r in rows):
        rows.append({**rows[0], "rejected": rows[0]["chosen"]})
    data = write_jsonl(tmp_path / f"{shape}.jsonl", rows)
    out = tmp_path / "o"
    assert run_script("dpo.py", ["--model_id", tiny_llama, "--dataset_name", data, "--dataset_format", value,
                                 "--output_dir", out, *FAST]) == 0
    ties = sum(r["chosen"] == r["rejected"] for r in rows)
    pairs = json.loads((out / "run_config.json").read_text())["data"]["pairs"]
    assert pairs == {"built": len(rows) - ties, "skipped": ties}
