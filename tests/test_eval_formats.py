"""evaluate.py beyond TriviaQA: question/answer data with a list of references, and held-out loss,
perplexity and sample generations on conversation and text data."""

import json
import math

import pytest

from tests.helpers import run_script

FORMATS = "data/formats"


@pytest.mark.parametrize("name", ["squad", "answers_list"])
def test_reference_lists_score_em_f1_like_aliases(name, tiny_llama, tmp_path, monkeypatch):
    from common.evaluation import answers

    rows = [json.loads(line) for line in open(f"{FORMATS}/{name}.jsonl")]
    refs = [r["answers"]["text"] if isinstance(r["answers"], dict) else r["answers"] for r in rows]
    # Hand-worked: the last reference (any reference counts), a wrong answer, a half-right one.
    predictions = [refs[i][-1] if i % 3 == 0 else ("nothing" if i % 3 == 1 else refs[i][0] + " maybe")
                   for i in range(len(rows))]
    seen = {}

    def fake(model, tokenizer, questions, fmt, *a, **k):
        seen["questions"] = questions
        return predictions[:len(questions)]

    monkeypatch.setattr(answers, "generate_answers", fake)
    out = tmp_path / "eval"
    assert run_script("evaluate.py", ["--model_id", tiny_llama, "--dataset_name", f"{FORMATS}/{name}.jsonl",
                                      "--dataset_split", "train", "--output_dir", out]) == 0
    result = json.loads((out / "eval_results.json").read_text())
    from common.evaluation.metrics import f1_score

    em = [1.0 if i % 3 == 0 else 0.0 for i in range(len(rows))]
    f1 = [1.0 if i % 3 == 0 else (0.0 if i % 3 == 1 else max(f1_score(predictions[i], r) for r in refs[i]))
          for i in range(len(rows))]
    assert result["n"] == len(rows)
    assert result["exact_match"] == pytest.approx(sum(em) / len(rows))
    assert result["f1"] == pytest.approx(sum(f1) / len(rows))
    if name == "squad":  # the passage goes before the question
        assert seen["questions"][0] == f"{rows[0]['context']}\n\n{rows[0]['question']}"


@pytest.mark.parametrize("name", ["messages", "text"])
def test_heldout_loss_and_perplexity_equal_per_example_model_loss(name, tiny_chat_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data.chat import load_sft_data, tokenized_dataset

    out = tmp_path / "eval"
    assert run_script("evaluate.py", ["--model_id", tiny_chat_llama, "--dataset_name", f"{FORMATS}/{name}.jsonl",
                                      "--dataset_split", "train", "--batch_size", "4", "--max_new_tokens", "8",
                                      "--output_dir", out]) == 0
    result = json.loads((out / "eval_results.json").read_text())

    # Oracle: the model's own loss, one unpadded example at a time, weighted by its trained tokens.
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()

    class A:
        dataset_name, dataset_config, dataset_split, eval_split = f"{FORMATS}/{name}.jsonl", None, "train", "none"
        max_train_samples = max_eval_samples = dataset_num_proc = None
        dataset_format = "auto"

    total = count = 0
    for row in tokenized_dataset(load_sft_data(A, False).train, tok):
        n = sum(label != -100 for label in row["labels"][1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
        total, count = total + loss.item() * n, count + n
    assert result["trained_tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5
    if name == "messages":
        assert samples[0]["prompt"].endswith("<|assistant|>\n") and samples[0]["reference"]
    assert all("generation" in s for s in samples)


@pytest.fixture(scope="module")
def prompt_tuning_adapter(tiny_chat_llama, tmp_path_factory):
    """A fresh prompt-tuning adapter, its virtual tokens scaled up so that they change the replies."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_llama),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    out = tmp_path_factory.mktemp("pt") / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_chat_llama).save_pretrained(out)
    return model, out


@pytest.mark.parametrize("name", ["messages", "text"])
def test_prompt_tuning_samples_and_loss_equal_cache_free_greedy_and_model_loss(name, prompt_tuning_adapter,
                                                                              tmp_path):
    """evaluate.py on conversation/text data with a prompt-tuning adapter: its sample generations are
    the cache-free greedy decode through the training forward (tests/oracles.py), stopping only at
    EOS or end of turn, and its loss is the adapter model's own loss on the trained tokens."""
    import torch
    from transformers import AutoTokenizer

    from common.data.chat import load_sft_data, tokenized_dataset
    from common.evaluation.answers import stop_token_ids
    from tests.oracles import cache_free_greedy

    model, adapter = prompt_tuning_adapter
    out = tmp_path / "eval"
    assert run_script("evaluate.py", ["--model_id", adapter, "--dataset_name", f"{FORMATS}/{name}.jsonl",
                                      "--dataset_split", "train", "--batch_size", "4", "--max_new_tokens", "6",
                                      "--output_dir", out]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(adapter)
    rows = [json.loads(line) for line in open(f"{FORMATS}/{name}.jsonl")][:len(samples)]
    expected = []
    for row in rows:
        if name == "messages":
            prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            words = row["text"].split(" ")
            prompt = " ".join(words[:len(words) // 2])
            ids = tok(prompt)["input_ids"]
        new = cache_free_greedy(model, ids, set(stop_token_ids(tok)), lambda _: False, 6)
        expected.append({"prompt": prompt, "generation": tok.decode(new, skip_special_tokens=True)})
    assert [{"prompt": s["prompt"], "generation": s["generation"]} for s in samples] == expected
    with model.disable_adapter():
        plain = [tok.decode(cache_free_greedy(model, tok(e["prompt"], add_special_tokens=name == "text")["input_ids"],
                                              set(stop_token_ids(tok)), lambda _: False, 6), skip_special_tokens=True)
                 for e in expected]
    assert plain != [e["generation"] for e in expected], "the adapter must change the replies"

    class A:
        dataset_name, dataset_config, dataset_split, eval_split = f"{FORMATS}/{name}.jsonl", None, "train", "none"
        max_train_samples = max_eval_samples = dataset_num_proc = None
        dataset_format = "auto"

    total = count = 0
    model.eval()
    for row in tokenized_dataset(load_sft_data(A, False).train, tok):
        # The first real token is not predicted from the text (PEFT would score it after the virtual tokens).
        labels = [-100, *row["labels"][1:]]
        n = sum(label != -100 for label in labels)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([labels])).loss
        total, count = total + loss.item() * n, count + n
    result = json.loads((out / "eval_results.json").read_text())
    assert result["loss"] == pytest.approx(total / count, rel=1e-4)
