"""Every preference trainer trains on the token ids SFT trains on, for the same question and answer.

The reference is what sft/run.py's SFTTrainer holds as `input_ids` for a row; each preference
trainer's own processed dataset gives prompt + chosen (DPO, ORPO, SimPO, the reward model) or
prompt + desirable completion (KTO). The runs stop right after the trainer is built: tokenisation
happens there. Question-answer data for every trainer; conversation data (message-list pairs
against SFT on the chosen conversation) for the reward model, which renders them itself."""

import shutil

import pytest

ARGV = ["--dataset_name", "triviaqa-sample", "--max_train_samples", "6", "--report_to", "none",
        "--save_strategy", "no"]


class _Built(Exception):
    def __init__(self, trainer):
        super().__init__("trainer built")
        self.trainer = trainer


@pytest.fixture
def stop_before_training(monkeypatch):
    from common import training

    def stop(trainer, *_):
        raise _Built(trainer)

    monkeypatch.setattr(training, "train_guarded", stop)


@pytest.fixture(scope="module")
def tiny_llama_bos(tmp_path_factory, tiny_llama):
    """A Llama-style tokenizer that adds BOS itself (`<s> $A`), unlike the GPT-2 family."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("models") / "tiny-llama-bos"
    shutil.copytree(tiny_llama, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("Question")["input_ids"][0] == tok.bos_token_id
    return str(path)


@pytest.fixture(scope="module")
def tiny_chat_bos(tmp_path_factory, tiny_llama_bos):
    """A BOS-adding tokenizer with a chat template that writes no BOS: SFT's chat ids have none."""
    from transformers import AutoTokenizer

    from common.tiny_model import CHAT_TEMPLATE

    path = tmp_path_factory.mktemp("models") / "tiny-chat-bos"
    shutil.copytree(tiny_llama_bos, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return str(path)


MODELS = {"gpt2": "tiny_gpt2", "llama_bos": "tiny_llama_bos", "chat": "tiny_chat_llama", "chat_bos": "tiny_chat_bos"}


def _trainer(fn, argv):
    with pytest.raises(_Built) as built:
        fn(argv)
    return built.value.trainer


def _sft_ids(model, tmp_path, argv=ARGV):
    from sft.run import train

    ds = _trainer(lambda a: train("lora", a), ["--model_id", model, "--output_dir", tmp_path / "sft", *argv]).train_dataset
    return sorted(ds["input_ids"])


def _train_reward_model(argv):
    from common.args import check_common, check_preference
    from rlhf import reward

    args = reward.make_parser().parse(argv)
    check_common(args)
    check_preference(args, "reward")
    reward.run_reward_model(args)


def _preference_ids(kind, model, tmp_path, argv=ARGV):
    from rlhf.run import train

    if kind == "reward":
        ds = _trainer(_train_reward_model, ["--model_id", model, "--output_dir", tmp_path / kind, *argv]).train_dataset
        return sorted(ds["chosen_ids"])
    ds = _trainer(lambda a: train(kind, a), ["--model_id", model, "--output_dir", tmp_path / kind, *argv]).train_dataset
    if kind == "dpo":
        return sorted(p + c for p, c in zip(ds["prompt_ids"], ds["chosen_ids"]))
    if kind == "kto":
        return sorted(p + c for p, c, good in zip(ds["prompt_ids"], ds["completion_ids"], ds["label"]) if good)
    return sorted(ds["chosen_input_ids"])  # ORPO and SimPO (CPO) keep whole sequences


@pytest.mark.parametrize("kind", ["dpo", "orpo", "kto", "simpo", "reward"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_preference_ids_equal_sft_trainer_ids(arch, kind, request, tmp_path, stop_before_training):
    model = request.getfixturevalue(MODELS[arch])
    expected = _sft_ids(model, tmp_path)
    got = _preference_ids(kind, model, tmp_path)
    assert len(got) == len(expected) == 6
    for mine, ref in zip(got, expected):
        assert mine == ref, f"{kind} on {arch}: {mine} != SFT's {ref}"


CONVERSATION_MODELS = {"no_template": "tiny_llama", **MODELS}


@pytest.mark.parametrize("arch", list(CONVERSATION_MODELS))
def test_reward_model_ids_on_conversations_equal_sft_trainer_ids(arch, request, tmp_path, stop_before_training):
    """Message-list pairs (prompt, chosen, rejected) against SFT on `messages` = prompt + chosen: with a
    chat template, and with none (common.chat's plain rendering, BOS-adding or not)."""
    pairs, chats = _conversation_files(tmp_path)
    common = ["--report_to", "none", "--save_strategy", "no", "--eval_split", "none"]
    model = request.getfixturevalue(CONVERSATION_MODELS[arch])
    expected = _sft_ids(model, tmp_path, ["--dataset_name", chats, *common])
    got = _preference_ids("reward", model, tmp_path, ["--dataset_name", pairs, *common])
    assert len(expected) == 6
    # 10% of the rows are kept aside for accuracy (no held-out split): the rest equal SFT's rows.
    stray = [ids for ids in got if ids not in expected]
    assert got and not stray, f"reward model on {arch}: {stray[:1]} not among SFT's {expected}"


def _conversation_files(tmp_path):
    import json

    from tests.helpers import write_jsonl

    with open("data/triviaqa_sample/train.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(6), fh)]
    qa = [(r["question"], r["answer"]["value"]) for r in rows]
    head = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}] for q, _ in qa]
    reply = [[{"role": "assistant", "content": a}] for _, a in qa]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": h, "chosen": c, "rejected": reply[i - 1]}
                                                   for i, (h, c) in enumerate(zip(head, reply))])
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": h + c} for h, c in zip(head, reply)])
    return pairs, chats


@pytest.mark.parametrize("kind", ["dpo", "orpo", "kto", "simpo", "reward"])
@pytest.mark.parametrize("arch", ["chat", "chat_bos"])
def test_use_chat_template_false_on_conversation_pairs_trains_sfts_plain_ids(arch, kind, request, tmp_path,
                                                                             stop_before_training):
    """`--use_chat_template false` on message-list pairs, with a tokenizer that has a chat template:
    every preference trainer trains on the plain rendering, the ids SFT trains on for the same
    conversations with the same flag (and not on the template's rendering, which it used to)."""
    from common.chat import has_template

    pairs, chats = _conversation_files(tmp_path)
    common = ["--report_to", "none", "--save_strategy", "no", "--eval_split", "none", "--use_chat_template", "false"]
    model = request.getfixturevalue(MODELS[arch])
    expected = _sft_ids(model, tmp_path, ["--dataset_name", chats, *common])
    templated = _sft_ids(model, tmp_path, ["--dataset_name", chats, *common[:-1], "auto"])
    assert not set(map(tuple, expected)) & set(map(tuple, templated))  # the two renderings differ
    from rlhf.run import train

    fn = _train_reward_model if kind == "reward" else (lambda a: train(kind, a))
    trainer = _trainer(fn, ["--model_id", model, "--output_dir", tmp_path / kind, "--dataset_name", pairs, *common])
    # What the run saves: later runs from it (PPO's reward-model scoring too) render the same way.
    assert not has_template(trainer.processing_class)
    ds = trainer.train_dataset
    if kind == "reward":  # 10% of the rows are kept aside for accuracy; the rest equal SFT's whole rows
        assert ds["chosen_ids"] and all(ids in expected for ids in ds["chosen_ids"]), (ds["chosen_ids"][:1], expected)
        return
    if kind == "dpo":
        got = sorted(p + c for p, c in zip(ds["prompt_ids"], ds["chosen_ids"]))
    elif kind == "kto":
        got = sorted(p + c for p, c, good in zip(ds["prompt_ids"], ds["completion_ids"], ds["label"]) if good)
    else:
        got = sorted(ds["chosen_input_ids"])
    # The pair trainers end each sequence at the answer's EOS; SFT's rows go on with the untrained
    # whitespace the rendering writes after it.
    trained = sorted(_through_last_label(model, tmp_path, ["--dataset_name", chats, *common]))
    assert got == trained, f"{kind} on {arch}: {got[:1]} != SFT's {trained[:1]}"


def _through_last_label(model, tmp_path, argv):
    from sft.run import train

    ds = _trainer(lambda a: train("lora", a), ["--model_id", model, "--output_dir", tmp_path / "sft", *argv]).train_dataset
    out = []
    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        last = max(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[last + 1:])
        out.append(ids[:last + 1])
    return out


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_conversations_only_in_the_eval_split_get_the_same_rendering_as_sft(kind, tiny_chat_llama, tiny_llama,
                                                                         tmp_path, stop_before_training, capsys):
    """Text pairs to train on, message-list pairs to evaluate on: `--use_chat_template false` applies
    to the held-out pairs too; and a model without a template says once that they are rendered plain."""
    from common.chat import has_template
    from rlhf.run import train
    from tests.helpers import write_jsonl

    pairs, chats = _conversation_files(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"prompt": "Question: 1+1?\nAnswer:", "chosen": " 2", "rejected": " 3"}] * 4)
    shutil.copy(pairs, data / "validation.jsonl")
    flags = ["--dataset_name", data, "--eval_strategy", "epoch", "--report_to", "none", "--save_strategy", "no",
             "--use_chat_template", "false"]
    fn = _train_reward_model if kind == "reward" else (lambda a: train(kind, a))
    trainer = _trainer(fn, ["--model_id", tiny_chat_llama, "--output_dir", tmp_path / kind, *flags])
    assert not has_template(trainer.processing_class)
    ds = trainer.eval_dataset
    got = sorted(ds["chosen_ids"]) if kind == "reward" else sorted(p + c for p, c in zip(ds["prompt_ids"],
                                                                                         ds["chosen_ids"]))
    sft = ["--dataset_name", chats, "--report_to", "none", "--save_strategy", "no", "--eval_split", "none",
           "--use_chat_template", "false"]
    expected = _sft_ids(tiny_chat_llama, tmp_path, sft) if kind == "reward" else sorted(
        _through_last_label(tiny_chat_llama, tmp_path, sft))
    assert got == expected

    from common.training import setup_logging

    setup_logging(f"{kind}.py")  # the run's log lines, to the stderr captured here
    capsys.readouterr()
    _trainer(fn, ["--model_id", tiny_llama, "--output_dir", tmp_path / f"{kind}-plain", *flags[:-2]])
    assert capsys.readouterr().err.count("has no chat template: conversations are rendered as plain text") == 1
