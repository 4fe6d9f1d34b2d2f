"""Data: every accepted schema loads to the same rows; slices; bad data is reported, not crashed on."""

import json

import pytest

from common.data import prompts
from common.data import qa
from common.data import sources
from common.flags.errors import UsageError
from tests.helpers import write_jsonl

ROWS = [("What is the capital of France?", "Paris", ["Paris", "Paree"]),
        ("How many legs does a spider have?", "8", ["8", "Eight"]),
        ("Who wrote Hamlet?", "William Shakespeare", ["William Shakespeare", "Shakespeare"])]


class Args:
    """The data flags with their defaults."""

    def __init__(self, **kw):
        from common.flags.groups import DataArguments

        self.__dict__.update(DataArguments().__dict__)
        self.__dict__.update(kw)


def _load(name, **kw):
    return qa.load_qa_data(Args(dataset_name=str(name), **kw), need_eval=False)


def _hub_rows():
    return [{"question": q, "question_id": f"q{i}", "answer": {"value": a, "aliases": al, "normalized_value": a.lower()}}
            for i, (q, a, al) in enumerate(ROWS)]


def _official_doc():
    return {"Data": [{"Question": q, "QuestionId": f"q{i}", "Answer": {"Value": a, "Aliases": al, "Type": "Free"},
                      "EntityPages": [], "SearchResults": []} for i, (q, a, al) in enumerate(ROWS)],
            "Domain": "Web", "Version": 1.0}


def _expected():
    return [{"question": q, "answer": a, "aliases": [a] + [x for x in al if x != a]} for q, a, al in ROWS]


@pytest.mark.parametrize("fmt", ["hub-jsonl", "hub-json-list", "hub-parquet", "official-json", "official-json-indented",
                                 "flat-csv", "flat-jsonl", "saved-dataset-dir"])
def test_every_schema_loads_to_the_same_rows(fmt, tmp_path):
    from datasets import Dataset

    if fmt == "hub-jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", _hub_rows())
    elif fmt == "hub-json-list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(_hub_rows()))
    elif fmt == "hub-parquet":
        path = tmp_path / "d.parquet"
        Dataset.from_list(_hub_rows()).to_parquet(str(path))
    elif fmt.startswith("official"):
        path = tmp_path / "wikipedia-dev.json"
        path.write_text(json.dumps(_official_doc(), indent=2 if "indented" in fmt else None))
    elif fmt == "flat-csv":
        path = tmp_path / "d.csv"
        path.write_text("question,answer\n" + "".join(f'"{q}","{a}"\n' for q, a, _ in ROWS))
    elif fmt == "flat-jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", [{"question": q, "answer": a, "aliases": al} for q, a, al in ROWS])
    else:
        path = tmp_path / "saved"
        Dataset.from_list(_hub_rows()).save_to_disk(str(path))
    loaded = _load(path)
    rows = loaded.train.to_list()
    if fmt == "flat-csv":  # a CSV has no alias column
        assert rows == [{"question": q, "answer": a, "aliases": [a]} for q, a, _ in ROWS]
    else:
        assert rows == _expected()
    expected_schema = {"official": "triviaqa-official", "flat": "qa"}.get(fmt.split("-")[0], "triviaqa")
    assert loaded.schema == expected_schema


def test_prompt_completion_schema_is_used_verbatim(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    loaded = _load(path)
    assert loaded.schema == "prompt-completion"
    fmt = prompts.PromptFormat(raw=True)
    row = loaded.train[0]
    assert prompts.sft_example(row["question"], row["answer"], fmt) == {"prompt": "Q: 2+2?\nA:", "completion": " 4"}


def test_bundled_sample():
    splits, _ = sources.load_splits("triviaqa-sample")
    assert set(splits) == {"train", "validation"}
    total = len(splits["train"]) + len(splits["validation"])
    assert total >= 300 and len(splits["validation"]) >= 30
    loaded = _load("triviaqa-sample")
    assert loaded.schema == "triviaqa"
    questions = [r["question"].lower() for s in splits.values() for r in s]
    assert len(set(questions)) == len(questions)
    for row in splits["train"]:
        assert row["answer"]["value"] in row["answer"]["aliases"]


@pytest.mark.parametrize("spec,n", [("train[:10]", 10), ("train[10:20]", 10), ("train[:10%]", 30), ("train[-5:]", 5)])
def test_split_slices(spec, n):
    assert len(_load("triviaqa-sample", dataset_split=spec).train) == n


def test_max_train_samples_and_eval_split():
    loaded = qa.load_qa_data(Args(dataset_name="triviaqa-sample", max_train_samples=7, max_eval_samples=5),
                             need_eval=True)
    assert len(loaded.train) == 7 and len(loaded.eval) == 5


def test_triviaqa_means_the_hub_dataset_with_rc_nocontext(monkeypatch):
    import datasets

    seen = {}

    def fake_load(repo, config=None, **kw):
        seen["args"] = (repo, config)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(_hub_rows())})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert len(_load("triviaqa").train) == 3
    assert seen["args"] == ("mandarjoshi/trivia_qa", "rc.nocontext")
    _load("triviaqa", dataset_config="rc.wikipedia.nocontext")
    assert seen["args"] == ("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext")


def test_unreachable_hub_dataset_says_what_to_do():
    with pytest.raises(UsageError, match="local file") as err:
        _load("someone/not-a-real-dataset-xyz")
    assert "someone/not-a-real-dataset-xyz" in str(err.value)


@pytest.mark.parametrize("content,match", [
    ('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": \n', "line 2"),
    ('{"q": "a?", "a": "b"}\n', r"columns \['a', 'q'\] match no known schema"),
    ('{"question": "", "answer": "b"}\n', "row 0: `question` is empty"),
    ('{"question": "a?", "answer": "b"}\n{"question": "   ", "answer": "b"}\n', "row 1: `question` is empty"),
    ('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": null}\n', "row 1: `answer` is missing"),
    ('{"question": "a?", "answer": null}\n', "has no answers"),  # no row has one: the split is refused
    ('{"question": "a?", "answer": {"value": ["x"], "aliases": []}}\n', "`answer.value` is a list"),
    ('{"question": "a?", "answer": "b", "aliases": "b"}\n', "`aliases` must be a list"),
    ('', "empty"),
])
def test_bad_data_is_reported_with_file_and_place(content, match, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError, match=match) as err:
        _load(path)
    assert "bad.jsonl" in str(err.value)


def test_missing_file_and_empty_slice(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        _load(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="no split 'validation'"):
        _load(write_jsonl(tmp_path / "d.jsonl", _hub_rows()), dataset_split="validation")
    with pytest.raises(UsageError, match="empty"):
        _load("triviaqa-sample", dataset_split="train[5:5]")


def test_default_prompt_and_completion():
    fmt = prompts.PromptFormat()
    assert prompts.sft_example("Who wrote Hamlet?", "Shakespeare", fmt) == {
        "prompt": "Question: Who wrote Hamlet?\nAnswer:", "completion": " Shakespeare"}
    custom = prompts.PromptFormat(template="Q: {question}\nA:")
    assert prompts.sft_example("x?", "y", custom)["prompt"] == "Q: x?\nA:"


def test_chat_format_uses_messages(tiny_chat_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    fmt = prompts.PromptFormat(use_chat=True, system_prompt="Be brief.")
    assert prompts.chat_messages("Who wrote Hamlet?", fmt) == [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Who wrote Hamlet?"}]
    text = prompts.generation_prompt("Who wrote Hamlet?", fmt, tok)
    assert text.endswith("<|assistant|>\n") and "Be brief." in text


def test_eos_label_survives_padding(tiny_llama):
    """The model can only learn to stop if the EOS after each answer is a label, padding or not."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from common.model.loading import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert tok.pad_token is None  # like GPT-2 and Llama
    ensure_pad_token(tok)
    assert tok.pad_token_id != tok.eos_token_id
    fmt = prompts.PromptFormat()
    ds = Dataset.from_list([prompts.sft_example(q, a, fmt) for q, a, _ in ROWS])
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), processing_class=tok,
                         train_dataset=ds, args=SFTConfig(output_dir="/tmp/unused", report_to="none",
                                                          completion_only_loss=True, bf16=False))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    for labels, mask in zip(batch["labels"], batch["attention_mask"]):
        real = labels[mask.bool()]
        assert real[-1].item() == tok.eos_token_id  # the last real label is EOS
        assert (labels[~mask.bool()] == -100).all()  # padding is never a label
    prompt_len = len(tok("Question: What is the capital of France?\nAnswer:")["input_ids"])
    assert (batch["labels"][0][:prompt_len] == -100).all()  # completion-only loss
