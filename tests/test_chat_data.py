"""Your own data for SFT: conversations (messages, ShareGPT), Alpaca and plain text, with the loss
on the assistant's tokens checked token by token against tests/chat_oracle.py."""

import json

import pytest

from common.data.chat import load_sft_data
from common.data.masking import conversation_rows
from common.data.templates import render
from tests.chat_oracle import oracle_rows, trained_text
from tests.helpers import run_script, write_jsonl

FORMATS = "data/formats"
CONVERSATION = [
    {"role": "system", "content": "You are a quiz assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none",
        "--logging_steps", "1", "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def base_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _conversations():
    with open(f"{FORMATS}/messages.jsonl") as fh:
        return [CONVERSATION] + [json.loads(line)["messages"] for line in fh]


def test_plain_rendering_without_chat_template(base_tokenizer):
    assert not base_tokenizer.chat_template
    text = render(base_tokenizer, CONVERSATION)
    assert text == ("You are a quiz assistant.\n\nUser: What is the capital of France?\n\nAssistant: Paris.</s>\n\n"
                    "User: And of Italy?\n\nAssistant: Rome, since 1871.</s>\n\n")
    [got] = conversation_rows(base_tokenizer, CONVERSATION)
    expected = oracle_rows(base_tokenizer, CONVERSATION, base_tokenizer.eos_token_id, render=render)
    assert [(got["input_ids"], got["labels"])] == expected
    assert trained_text(base_tokenizer, got["labels"]) == " Paris.</s> Rome, since 1871.</s>"


@pytest.mark.parametrize("name,schema", [("messages", "messages"), ("sharegpt", "sharegpt"), ("alpaca", "alpaca"),
                                         ("text", "text")])
def test_format_detected_and_run_trains_on_oracle_labels(name, schema, tiny_chat_llama, tmp_path, caplog):
    from sft.run import train

    caplog.set_level("INFO", logger="finetune")
    path = f"{FORMATS}/{name}.jsonl"
    result = train("lora", ["--model_id", tiny_chat_llama, "--dataset_name", path, "--output_dir", tmp_path / "o",
                            *FAST])
    assert f"(schema: {schema})" in caplog.text
    tok = result.trainer.processing_class
    rows = load_sft_data(_Args(path), need_eval=False).train
    trained = result.trainer.train_dataset
    assert len(trained) == len(rows)
    for row, example in zip(rows, trained):
        if schema == "text":
            ids = tok(row["text"])["input_ids"] + [tok.eos_token_id]
            assert example["input_ids"] == ids and example["labels"] == ids
        else:
            assert [(example["input_ids"], example["labels"])] == oracle_rows(tok, row["messages"], tok.eos_token_id)


class _Args:
    def __init__(self, path, **kw):
        self.dataset_name, self.dataset_config, self.dataset_split = path, None, "train"
        self.eval_split, self.max_train_samples, self.max_eval_samples, self.dataset_num_proc = "none", None, None, None
        self.dataset_format = kw.get("dataset_format", "auto")


def test_alpaca_and_sharegpt_read_as_messages():
    alpaca = load_sft_data(_Args(f"{FORMATS}/alpaca.jsonl"), False).train
    assert alpaca[0]["messages"] == [
        {"role": "user", "content": "Answer the quiz question.\n\nWhat is the capital of France?"},
        {"role": "assistant", "content": "Paris."}]
    assert alpaca[1]["messages"][0] == {"role": "user", "content": "How many legs does a spider have?"}
    sharegpt = load_sft_data(_Args(f"{FORMATS}/sharegpt.jsonl"), False).train
    assert [m["role"] for m in sharegpt[0]["messages"]] == ["system", "user", "assistant"]


def test_dataset_format_overrides_detection(tmp_path):
    # `text` beside `messages`: detected as messages, read as text when asked.
    path = write_jsonl(tmp_path / "both.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "ho"}],
                                                  "text": "plain words"}])
    assert load_sft_data(_Args(path), False).schema == "messages"
    data = load_sft_data(_Args(path, dataset_format="text"), False)
    assert data.schema == "text" and data.train[0]["text"] == "plain words"


@pytest.mark.parametrize("row,problem", [
    ({"foo": "bar"}, "row 0 has the columns ['foo'], which fit no format"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "row 1: the assistant turn 1 is empty"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "row 1: roles out of order: turn 0 is 'assistant' where 'user' was expected"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
     "row 1: roles out of order: turn 1 is 'user'"),
    ({"instruction": "do it", "output": ""}, "row 1: `output` (the assistant turn) is empty"),
])
def test_bad_row_exits_2_with_one_line_naming_file_row_and_problem(row, problem, tiny_chat_llama, tmp_path, capsys):
    first = {k: v for k, v in {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                               "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                               "instruction": "q", "output": "a"}.items() if k in row} or {"foo": "baz"}
    path = write_jsonl(tmp_path / "bad.jsonl", [first, row])
    code = run_script("lora.py", ["--model_id", tiny_chat_llama, "--dataset_name", path, "--output_dir",
                                  tmp_path / "o", *FAST])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line]  # datasets' progress bars aside
    assert len(lines) == 1 and path in lines[0] and problem in lines[0], err
    assert "Traceback" not in err


def test_length_grouping_on_multi_turn_conversations(tiny_chat_llama, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from sft.run import train

    result = train("lora", ["--model_id", tiny_chat_llama, "--dataset_name", f"{FORMATS}/messages.jsonl",
                            "--output_dir", tmp_path / "o", *FAST])
    trainer = result.trainer
    sampler = trainer._get_train_sampler(trainer.train_dataset)
    assert isinstance(sampler, LengthGroupedSampler)
    assert list(sampler.lengths) == [len(x) for x in trainer.train_dataset["input_ids"]]
    assert len(set(sampler.lengths)) > 1  # multi-turn rows are longer: there is something to group


def test_plain_rendering_run_says_so_once(tiny_llama, tmp_path, caplog):
    from sft.run import train

    caplog.set_level("INFO", logger="finetune")
    result = train("lora", ["--model_id", tiny_llama, "--dataset_name", f"{FORMATS}/messages.jsonl",
                            "--output_dir", tmp_path / "o", *FAST])
    said = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(said) == 1
    tok = result.trainer.processing_class
    row = load_sft_data(_Args(f"{FORMATS}/messages.jsonl"), False).train[0]["messages"]
    expected = oracle_rows(tok, row, tok.eos_token_id, render=render)
    assert [(result.trainer.train_dataset[0]["input_ids"], result.trainer.train_dataset[0]["labels"])] == expected


@pytest.mark.parametrize("script", ["evaluate.py", "lora.py"])
def test_question_answer_data_is_loaded_once(script, tiny_llama, tmp_path, monkeypatch):
    """Format detection and the question-answer reader share one load: for a hub dataset each load
    is a hub check (common.data.sources.load_splits counted here)."""
    from common.data import sources

    calls = []
    real = sources.load_splits

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sources, "load_splits", counting)
    argv = {"evaluate.py": ["--dataset_split", "validation", "--max_samples", "2", "--max_new_tokens", "2"],
            "lora.py": ["--max_train_samples", "8", "--per_device_train_batch_size", "4", "--max_steps", "1",
                        "--save_strategy", "no", "--report_to", "none", "--lora_r", "2"]}[script]
    assert run_script(script, ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample",
                               "--output_dir", tmp_path / "o", *argv]) == 0
    assert calls == [("triviaqa-sample", None)]
