"""reward_model.py: the held-out accuracy it reports, recounted on the saved model; and a held-out
share that no training pair borrows its rejected answer from."""

import json

import pytest
import torch

from tests.helpers import run_script, write_jsonl

WORDS = ["red", "blue", "green", "Paris", "Rome", "seven", "a cat", "the moon", "never", "1066", "gold", "tea"]


def _pairs(n, start):
    return [{"prompt": f"Question: what goes with item {start + i}?\nAnswer:", "chosen": " " + WORDS[(start + i) % 12],
             "rejected": " " + WORDS[(start * 7 + 5 * i + 3) % 12]} for i in range(n)]


def _mirrored_heldout():
    """Seven held-out pairs: three pairs, each followed by itself with chosen and rejected swapped (the
    two cannot both be won, nor both lost), and one more. Any trained model is then neither all right
    nor all wrong, which is what lets the recount tell pooled accuracy from a mean of batch means."""
    rows = []
    for p in _pairs(3, 100):
        rows += [p, {**p, "chosen": p["rejected"], "rejected": p["chosen"]}]
    rows += _pairs(1, 103)
    assert all(p["chosen"] != p["rejected"] for p in rows)
    return rows


def test_heldout_accuracy_equals_recount_of_saved_model(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", _pairs(16, 0))
    heldout = _mirrored_heldout()  # batches of 3, 3 and 1: a mean of batch means weighs the last pair 3x
    write_jsonl(data / "validation.jsonl", heldout)
    out = tmp_path / "rm"
    assert run_script("reward_model.py", ["--model_id", tiny_llama, "--dataset_name", data, "--output_dir", out,
                                          "--max_steps", "3", "--per_device_train_batch_size", "4",
                                          "--per_device_eval_batch_size", "3", "--learning_rate", "1e-3",
                                          "--report_to", "none", "--save_strategy", "no"]) == 0
    reported = json.loads((out / "run_config.json").read_text())["summary"]["heldout_accuracy"]

    # Independent recount: the saved adapter and head, one unpadded sequence at a time.
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, out).eval()

    def score(text):
        ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt")
        with torch.no_grad():
            return model(**ids).logits[0, 0].item()

    wins = sum(score(p["prompt"] + p["chosen"]) > score(p["prompt"] + p["rejected"]) for p in heldout)
    # Three mirrored pairs give exactly three wins between them, so wins is 3 or 4 of 7 whatever the
    # trained weights: pooled 3/7 or 4/7, while every mean of the batch means is 1/3, 4/9, 5/9 or 2/3.
    assert wins in (3, 4), wins
    assert reported == pytest.approx(wins / len(heldout), abs=1e-9), (reported, wins)


class _Captured(Exception):
    pass


def test_training_pairs_never_reject_with_a_heldout_answer(tiny_llama, tmp_path, monkeypatch):
    import trl

    seen = {}

    class Recorder:  # stands in for TRL's RewardTrainer: records the pairs it would be given
        def __init__(self, *args, train_dataset=None, eval_dataset=None, **kwargs):
            seen["train"], seen["eval"] = train_dataset, eval_dataset
            raise _Captured

    monkeypatch.setattr(trl, "RewardTrainer", Recorder)
    rows = [{"question": f"Which answer belongs to question {i}?", "answer": f"answer number {i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)  # a train split only: 10% of it is held out
    from rlhf import reward

    with pytest.raises(_Captured):
        reward.main(["--model_id", tiny_llama, "--dataset_name", data, "--output_dir", tmp_path / "rm",
                     "--report_to", "none"])
    train, heldout = seen["train"], seen["eval"]
    assert len(train) + len(heldout) == 40 and len(heldout) == 4
    heldout_answers = {c.strip() for c in heldout["chosen"]}
    train_answers = {c.strip() for c in train["chosen"]}
    assert heldout_answers.isdisjoint(train_answers)
    borrowed = heldout_answers & {r.strip() for r in train["rejected"]}
    assert not borrowed, f"training pairs reject with held-out answers: {sorted(borrowed)}"
    assert {r.strip() for r in train["rejected"]} <= train_answers


def test_4bit_reward_model_scores_equal_hand_loaded_4bit_base_adapter_and_head(tiny_llama, tmp_path):
    """A 4-bit reward model trains on the CPU (TRL's bf16 score head used to meet float32 hidden
    states); its reported accuracy, and the scores ppo.py/grpo.py get from RewardModelScorer, are those
    of the saved adapter and head on a 4-bit base loaded here by hand."""
    from types import SimpleNamespace

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from rlhf.rewards import RewardModelScorer

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", _pairs(16, 0))
    heldout = _pairs(7, 100)
    write_jsonl(data / "validation.jsonl", heldout)
    out = tmp_path / "rm"
    assert run_script("reward_model.py", ["--model_id", tiny_llama, "--dataset_name", data, "--output_dir", out,
                                          "--load_in_4bit", "True", "--max_steps", "3",
                                          "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3",
                                          "--learning_rate", "1e-3", "--report_to", "none",
                                          "--save_strategy", "no"]) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["model"]["quantized"] is True

    tokenizer = AutoTokenizer.from_pretrained(out)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32,
                                                              quantization_config=quant, device_map={"": "cpu"})
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, out).eval()

    def score(text):
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()

    eos = tokenizer.eos_token
    wins = sum(score(p["prompt"] + p["chosen"] + eos) > score(p["prompt"] + p["rejected"] + eos) for p in heldout)
    assert config["summary"]["heldout_accuracy"] == pytest.approx(wins / len(heldout), abs=1e-9)

    scorer = RewardModelScorer(str(out), tokenizer, SimpleNamespace(trust_remote_code=False), "cpu")
    texts = [p["prompt"] + p[side] for p in heldout for side in ("chosen", "rejected")]
    assert scorer(texts) == pytest.approx([score(t) for t in texts], abs=1e-4)


@pytest.fixture(scope="module")
def padless_gpt2(tmp_path_factory):
    """GPT-2's tokenizer shape: BOS, EOS and the unknown token are one token and there is no pad token,
    so the scripts pad with EOS."""
    from transformers import AutoTokenizer

    from common.model.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("models") / "padless-gpt2"), "gpt2")
    tok = AutoTokenizer.from_pretrained(path)
    tok.unk_token = tok.bos_token = tok.eos_token
    tok.save_pretrained(path)
    return path


def test_reward_model_scores_a_finished_answer_apart_from_a_cut_off_one_on_a_padless_tokenizer(
        padless_gpt2, tmp_path, monkeypatch):
    """The reference is transformers' own score for one unpadded row with no pad token configured,
    which is read at the row's last token. Training (the trainer's model on a padded batch) and PPO's
    and GRPO's scoring (RewardModelScorer) must both equal it; with the pad token = EOS, the score of
    "Paris" + EOS was read before the EOS, equal to "Paris" cut off."""
    from types import SimpleNamespace

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.model.loading import load_tokenizer
    from common.model.source import resolve_model
    from common.recipe import training
    from rlhf.pair_tokens import sft_ids
    from rlhf.rewards import RewardModelScorer

    seen = {}
    real = training.train_guarded

    def keep(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "train_guarded", keep)
    out = tmp_path / "rm"
    from rlhf.reward import main

    assert main(["--model_id", padless_gpt2, "--dataset_name", "triviaqa-sample", "--max_train_samples", "16",
                 "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--learning_rate", "5e-2", "--report_to", "none", "--save_strategy", "no", "--seed", "3"]) == 0
    args = SimpleNamespace(model_id=str(out), revision=None, trust_remote_code=False)
    tok = load_tokenizer(resolve_model(str(out)), args)
    assert tok.pad_token_id == tok.eos_token_id  # the case at hand
    prompt = "Question: What is the capital of France?\nAnswer:"
    finished, cut = sft_ids(tok, prompt, " Paris", True), sft_ids(tok, prompt, " Paris", False)
    assert finished == cut + [tok.eos_token_id]

    base = AutoModelForSequenceClassification.from_pretrained(padless_gpt2, num_labels=1)
    base.config.pad_token_id = None  # one unpadded row: transformers reads its last token
    reference = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        expected = [reference(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in (finished, cut)]
    assert abs(expected[0] - expected[1]) > 1e-4

    scorer = RewardModelScorer(str(out), tok, args, torch.device("cpu"))
    assert scorer.score_answers([prompt, prompt], [" Paris", " Paris"], [True, False]) == pytest.approx(
        expected, abs=1e-5)

    trainer = seen["trainer"]
    batch = trainer.data_collator([{"chosen_ids": finished, "rejected_ids": cut}])
    model = trainer.model.eval()
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].tolist()
    assert got == pytest.approx(expected, abs=1e-5)
