"""PPO and GRPO sample answers to the prompt ids SFT trained on, and their reward model scores
answers in the format it was trained on.

Prompts: the reference is SFTTrainer's own `input_ids` for a row up to its first trained label
(as in tests/test_inference_prompt.py), for a GPT-2-style tokenizer, one that adds BOS, one with a
chat template and a BERT tokenizer (which closes every text it encodes with [SEP], its
end-of-answer token), on TriviaQA-template and prompt-completion data. PPO's ids are those its
first rollout receives; GRPO's are what its trainer's prompt tokenisation gives for its dataset.
The runs stop before any sampling.

Reward model: the reference is the ids TRL's RewardTrainer trained it on (SFT's ids for prompt +
chosen answer, tests/test_pref_tokens.py) and the reward model run by hand on them, for
conversational pairs, from a base with a chat template and from ones without (rendered as plain
`User: ... Assistant:` text, with the BOS a BOS-adding tokenizer wants), scoring a chat policy's
prompts."""

import json

import pytest
import torch

from tests.helpers import prompt_ids_before_labels, write_jsonl
from tests.test_inference_prompt import tiny_bert  # noqa: F401 (fixture)
from tests.test_pref_tokens import _Built, _sft_ids, stop_before_training, tiny_llama_bos  # noqa: F401 (fixtures)

N = 4
COMMON = ["--max_train_samples", str(N), "--report_to", "none", "--save_strategy", "no"]
MODELS = {"gpt2": "tiny_gpt2", "llama_bos": "tiny_llama_bos", "chat": "tiny_chat_llama", "bert": "tiny_bert"}


def _sample_rows(n):
    with open("data/triviaqa_sample/train.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh)]
    return [(r["question"], r["answer"]["value"]) for r in rows]


@pytest.fixture(scope="module")
def prompt_completion(tmp_path_factory):
    rows = [{"prompt": f"Q: {q}\nA:", "completion": f" {a}"} for q, a in _sample_rows(N)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pc.jsonl", rows)


class _Rolled(Exception):
    def __init__(self, prompt_ids):
        super().__init__("first rollout")
        self.prompt_ids = prompt_ids


def _sft_prompt_ids(argv):
    from sft.run import train

    with pytest.raises(_Built) as built:
        train("lora", argv)
    return sorted(prompt_ids_before_labels(built.value.trainer.train_dataset))


def _ppo_prompt_ids(argv, monkeypatch):
    from rlhf import ppo, ppo_loop

    def first_rollout(unwrapped, accelerator, tokenizer, prompt_ids, *_, **__):
        raise _Rolled(prompt_ids)

    monkeypatch.setattr(ppo_loop, "sample_rollouts", first_rollout)
    with pytest.raises(_Rolled) as rolled:
        ppo.train(argv + ["--reward_function", "triviaqa_em", "--per_device_train_batch_size", str(N),
                          "--num_mini_batches", "1"])
    return sorted(rolled.value.prompt_ids)


def _grpo_prompt_ids(argv):
    from rlhf.grpo import train

    with pytest.raises(_Built) as built:
        train(argv + ["--reward_function", "triviaqa_em", "--per_device_train_batch_size", str(N),
                      "--num_generations", str(N)])
    trainer = built.value.trainer
    ids = trainer._tokenize_prompts(list(trainer.train_dataset["prompt"]))[0]  # what TRL's _generate samples from
    return sorted(list(i) for i in ids)


@pytest.mark.parametrize("data", ["triviaqa", "prompt_completion"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_ppo_and_grpo_prompt_ids_equal_sft_trainer_prompt_ids(arch, data, request, prompt_completion, tmp_path,
                                                             stop_before_training, monkeypatch):
    model = request.getfixturevalue(MODELS[arch])
    argv = ["--model_id", model, "--dataset_name", "triviaqa-sample" if data == "triviaqa" else prompt_completion,
            *COMMON, *(["--target_modules", "query,value"] if arch == "bert" else [])]
    expected = _sft_prompt_ids([*argv, "--output_dir", tmp_path / "sft"])
    assert len(expected) == N
    got = {"ppo": _ppo_prompt_ids([*argv, "--output_dir", tmp_path / "ppo"], monkeypatch),
           "grpo": _grpo_prompt_ids([*argv, "--output_dir", tmp_path / "grpo"])}
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(model).convert_ids_to_tokens
    wrong = [f"{name}: {tokens(ids[0][:2])} ... {tokens(ids[0][-3:])}" for name, ids in got.items() if ids != expected]
    assert not wrong, f"SFT's: {tokens(expected[0][:2])} ... {tokens(expected[0][-3:])}; " + "; ".join(wrong)


# The reward model -------------------------------------------------------------------------------

SYSTEM = "Answer briefly."


@pytest.fixture(scope="module")
def chat_pairs(tmp_path_factory):
    """Message-list pairs on the sample's questions, the same questions as question-answer rows, and
    the chosen conversations as SFT data."""
    rows = _sample_rows(8)
    folder = tmp_path_factory.mktemp("chat-pairs")
    pairs = []
    for i, (q, a) in enumerate(rows):
        head = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        pairs.append({"chosen": head + [{"role": "assistant", "content": a}],
                      "rejected": head + [{"role": "assistant", "content": rows[(i + 1) % len(rows)][1]}]})
    return (write_jsonl(folder / "pairs.jsonl", pairs),
            write_jsonl(folder / "qa.jsonl", [{"question": q, "answer": a} for q, a in rows]), dict(rows),
            write_jsonl(folder / "chats.jsonl", [{"messages": p["chosen"]} for p in pairs]))


def _reward_model_on_training_ids(base, pairs, out, monkeypatch):
    """Trains a reward model for one step; -> {text: (the ids RewardTrainer trained on for (prompt,
    chosen answer), the score of the model loaded by hand on them)}."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from common.recipe import training
    from rlhf import reward

    built, guarded = [], training.train_guarded

    def record(trainer, *args):
        built.append(trainer)
        return guarded(trainer, *args)

    monkeypatch.setattr(training, "train_guarded", record)
    assert reward.main(["--model_id", base, "--dataset_name", pairs, "--output_dir", out, "--max_steps", "1",
                        "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
                        "--eval_split", "none"]) == 0
    monkeypatch.setattr(training, "train_guarded", guarded)  # (the test stops GRPO itself)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1),
                                      out).eval()
    scores = {}
    for ds in (built[0].train_dataset, built[0].eval_dataset):
        for row in ds:
            with torch.no_grad():
                scores[tokenizer.decode(row["chosen_ids"])] = (row["chosen_ids"], model(
                    input_ids=torch.tensor([row["chosen_ids"]])).logits[0, 0].item())
    return scores


@pytest.mark.parametrize("rm_base", ["tiny_chat_llama", "tiny_llama", "tiny_llama_bos"])
def test_rl_reward_model_scores_equal_reward_model_on_its_training_ids(rm_base, request, chat_pairs, tiny_chat_llama,
                                                                      tmp_path, monkeypatch):
    """A chat policy (tiny_chat_llama) scored by a reward model trained on conversations, from a base
    with the same chat template or from one without (its conversations were plain text)."""
    from rlhf import ppo
    from rlhf.grpo import train as grpo_train
    from rlhf.rewards import RewardModelScorer

    pairs, qa, answers, chats = chat_pairs
    rm = tmp_path / "rm"
    base = request.getfixturevalue(rm_base)
    trained = _reward_model_on_training_ids(base, pairs, rm, monkeypatch)
    argv = ["--model_id", tiny_chat_llama, "--dataset_name", qa, "--reward_model", rm, "--system_prompt", SYSTEM,
            "--max_train_samples", "8", "--report_to", "none", "--save_strategy", "no"]

    # PPO: the prompts it hands the scorer
    calls, score_answers = [], RewardModelScorer.score_answers

    def stop(self, prompts, *_):
        calls.append((self, list(prompts)))
        raise _Rolled(None)

    monkeypatch.setattr(RewardModelScorer, "score_answers", stop)
    with pytest.raises(_Rolled):
        ppo.train([*argv, "--output_dir", tmp_path / "ppo", "--per_device_train_batch_size", "8",
                   "--num_mini_batches", "1", "--response_length", "2"])
    monkeypatch.setattr(RewardModelScorer, "score_answers", score_answers)
    scorer, prompts = calls[0]

    def question(prompt):  # (the prompt as text, where the old code rendered it)
        return next(q for q in answers if q in (prompt if isinstance(prompt, str) else prompt[-1]["content"]))

    from peft import PeftModelForSequenceClassification

    fed, forward = [], PeftModelForSequenceClassification.forward

    def spy(self, input_ids=None, attention_mask=None, **kwargs):  # the ids the reward model is run on
        fed.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(PeftModelForSequenceClassification, "forward", spy)
    got = {"ppo": [(p, score_answers(scorer, [p], [answers[question(p)]], [True])[0], fed[-1]) for p in prompts]}

    # GRPO: its reward function on its own dataset's prompts, each answered by the chosen answer
    from common.recipe import training

    def stop_before_training(trainer, *_):
        raise _Built(trainer)

    monkeypatch.setattr(training, "train_guarded", stop_before_training)
    with pytest.raises(_Built) as built:
        grpo_train([*argv, "--output_dir", tmp_path / "grpo", "--per_device_train_batch_size", "8",
                    "--num_generations", "8"])
    trainer = built.value.trainer
    reward_fn = trainer.reward_funcs[-1]
    eos = trainer.processing_class.eos_token_id
    prompts = list(trainer.train_dataset["prompt"])
    got["grpo"] = [(p, reward_fn(prompts=[p], completions=[[{"role": "assistant", "content": answers[question(p)]}]],
                                 completion_ids=[[5, eos]])[0], fed[-1]) for p in prompts]

    # The references: SFT's ids for the chosen conversations, and the reward model on RewardTrainer's
    # ids for the same question and chosen answer
    sft = _sft_ids(base, tmp_path, ["--dataset_name", chats, "--report_to", "none", "--eval_split", "none"])
    assert len(trained) == 8 and all(ids in sft for ids, _ in trained.values())
    for name, scored in got.items():
        assert len(scored) == 8
        for p, score, ids in scored:
            text = next(text for text in trained if question(p) in text)
            assert ids == trained[text][0] and ids in sft, (name, text)
            assert score == pytest.approx(trained[text][1], abs=1e-5), (name, text)


def test_rl_reward_model_ids_equal_its_training_ids_without_tokenizer_files_or_eos(tiny_bert, tmp_path,
                                                                                  monkeypatch):
    """A reward model dir without its tokenizer files, from a base whose tokenizer has no EOS (BERT):
    the scorer loads the base's tokenizer as reward_model.py did (SEP ends answers, common.model.
    ensure_eos_token), so a finished answer is scored on the ids RewardTrainer trained on."""
    from types import SimpleNamespace

    from peft import PeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from common.recipe import training
    from rlhf import reward
    from rlhf.rewards import RewardModelScorer

    rows = _sample_rows(4)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Question: {q}\nAnswer:", "chosen": f" {a}",
                                                    "rejected": f" {rows[i - 1][1]}"} for i, (q, a) in enumerate(rows)])
    built, guarded = [], training.train_guarded

    def record(trainer, *args):
        built.append(trainer)
        return guarded(trainer, *args)

    monkeypatch.setattr(training, "train_guarded", record)
    rm = tmp_path / "rm"
    assert reward.main(["--model_id", tiny_bert, "--dataset_name", pairs, "--output_dir", rm, "--max_steps", "1",
                        "--target_modules", "query,value", "--report_to", "none", "--save_strategy", "no",
                        "--eval_split", "none"]) == 0
    trained = {tuple(ids) for ds in (built[0].train_dataset, built[0].eval_dataset) for ids in ds["chosen_ids"]}
    for name in ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        (rm / name).unlink(missing_ok=True)

    fed, forward = [], PeftModelForSequenceClassification.forward

    def spy(self, input_ids=None, attention_mask=None, **kwargs):  # the ids the reward model is run on
        fed.extend(tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask))
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(PeftModelForSequenceClassification, "forward", spy)
    scorer = RewardModelScorer(str(rm), AutoTokenizer.from_pretrained(tiny_bert),
                               SimpleNamespace(trust_remote_code=False), "cpu")
    scorer.score_answers([f"Question: {q}\nAnswer:" for q, _ in rows], [f" {a}" for _, a in rows], [True] * 4)
    assert len(trained) == 4 and set(fed) == trained
