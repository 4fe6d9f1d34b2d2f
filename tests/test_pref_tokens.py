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
    from common.recipe import training

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

    from common.model.tiny_model import CHAT_TEMPLATE

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


def _sft_rows(model, tmp_path, argv=ARGV):
    """The dataset SFTTrainer holds (input_ids, labels) for `argv`."""
    from sft.run import train

    return _trainer(lambda a: train("lora", a), ["--model_id", model, "--output_dir", tmp_path / "sft", *argv]).train_dataset


def _sft_ids(model, tmp_path, argv=ARGV):
    return sorted(_sft_rows(model, tmp_path, argv)["input_ids"])


def _through_last_label(rows) -> list:
    """SFT's ids of each row up to its last trained token (the untrained whitespace a rendering
    writes after the end of turn cut off), sorted."""
    out = []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        last = max(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[last + 1:])
        out.append(ids[:last + 1])
    return sorted(out)


def _train_reward_model(argv):
    from common.flags.checks import check_common, check_preference
    from rlhf import reward

    args = reward.make_parser().parse(argv)
    check_common(args)
    check_preference(args, "reward")
    reward.run_reward_model(args)


def _train_fn(kind):
    if kind == "reward":
        return _train_reward_model
    from rlhf.run import train

    return lambda a: train(kind, a)


def _chosen_ids(kind, ds) -> list:
    """Prompt + chosen ids (KTO: prompt + desirable completion) of each row a trainer holds, sorted."""
    if kind == "reward":
        return sorted(ds["chosen_ids"])
    if kind == "dpo":
        return sorted(p + c for p, c in zip(ds["prompt_ids"], ds["chosen_ids"]))
    if kind == "kto":
        return sorted(p + c for p, c, good in zip(ds["prompt_ids"], ds["completion_ids"], ds["label"]) if good)
    return sorted(ds["chosen_input_ids"])  # ORPO and SimPO (CPO) keep whole sequences


def _preference_ids(kind, model, tmp_path, argv=ARGV):
    return _chosen_ids(kind, _trainer(_train_fn(kind), ["--model_id", model, "--output_dir", tmp_path / kind,
                                                        *argv]).train_dataset)


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
    chat template, and with none (common.data.chat's plain rendering, BOS-adding or not)."""
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
    from common.data.templates import has_template

    pairs, chats = _conversation_files(tmp_path)
    common = ["--report_to", "none", "--save_strategy", "no", "--eval_split", "none", "--use_chat_template", "false"]
    model = request.getfixturevalue(MODELS[arch])
    sft = _sft_rows(model, tmp_path, ["--dataset_name", chats, *common])
    expected = sorted(sft["input_ids"])
    templated = _sft_ids(model, tmp_path, ["--dataset_name", chats, *common[:-1], "auto"])
    assert not set(map(tuple, expected)) & set(map(tuple, templated))  # the two renderings differ

    trainer = _trainer(_train_fn(kind), ["--model_id", model, "--output_dir", tmp_path / kind, "--dataset_name", pairs,
                                         *common])
    # What the run saves: later runs from it (PPO's reward-model scoring too) render the same way.
    assert not has_template(trainer.processing_class)
    got = _chosen_ids(kind, trainer.train_dataset)
    if kind == "reward":  # 10% of the rows are kept aside for accuracy; the rest equal SFT's whole rows
        assert got and all(ids in expected for ids in got), (got[:1], expected)
        return
    # The pair trainers end each sequence at the answer's EOS; SFT's rows go on with the untrained
    # whitespace the rendering writes after it.
    trained = _through_last_label(sft)
    assert got == trained, f"{kind} on {arch}: {got[:1]} != SFT's {trained[:1]}"


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_conversations_only_in_the_eval_split_get_the_same_rendering_as_sft(kind, tiny_chat_llama, tiny_llama,
                                                                         tmp_path, stop_before_training, capsys):
    """Text pairs to train on, message-list pairs to evaluate on: `--use_chat_template false` applies
    to the held-out pairs too; and a model without a template says once that they are rendered plain."""
    from common.data.templates import has_template
    from tests.helpers import write_jsonl

    pairs, chats = _conversation_files(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"prompt": "Question: 1+1?\nAnswer:", "chosen": " 2", "rejected": " 3"}] * 4)
    shutil.copy(pairs, data / "validation.jsonl")
    flags = ["--dataset_name", data, "--eval_strategy", "epoch", "--report_to", "none", "--save_strategy", "no",
             "--use_chat_template", "false"]
    fn = _train_fn(kind)
    trainer = _trainer(fn, ["--model_id", tiny_chat_llama, "--output_dir", tmp_path / kind, *flags])
    assert not has_template(trainer.processing_class)
    got = _chosen_ids(kind, trainer.eval_dataset)
    sft = _sft_rows(tiny_chat_llama, tmp_path, ["--dataset_name", chats, "--report_to", "none", "--save_strategy",
                                                "no", "--eval_split", "none", "--use_chat_template", "false"])
    assert got == (sorted(sft["input_ids"]) if kind == "reward" else _through_last_label(sft))

    from common.recipe.cli import setup_logging

    setup_logging(f"{kind}.py")  # the run's log lines, to the stderr captured here
    capsys.readouterr()
    _trainer(fn, ["--model_id", tiny_llama, "--output_dir", tmp_path / f"{kind}-plain", *flags[:-2]])
    assert capsys.readouterr().err.count("has no chat template: conversations are rendered as plain text") == 1


@pytest.mark.parametrize("script, data", [("lora.py", "chats"), ("dpo.py", "pairs"), ("reward_model.py", "pairs")])
def test_use_chat_template_true_without_a_template_exits_2(script, data, tiny_llama, tmp_path, capsys):
    from tests.helpers import run_script

    files = dict(zip(("pairs", "chats"), _conversation_files(tmp_path)))
    assert run_script(script, ["--model_id", tiny_llama, "--dataset_name", files[data], "--use_chat_template", "true",
                               "--output_dir", tmp_path / "out", "--report_to", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"{script}: error: `--use_chat_template true`: the tokenizer has no chat template; use "
                       f"`auto` or `false`.")
    assert not (tmp_path / "out" / "run_config.json").exists()
