"""Conversation and question-answer masking on the chat templates real model families ship
(tests/chat_templates/), checked token by token against tests/chat_oracle.py, and the training
prompt of question-answer data against evaluate.py's prompt, byte for byte."""

import pytest

from common.data.masking import conversation_rows
from common.data.templates import with_system_mode
from tests.chat_oracle import FAMILIES, HERE, end_of_turn_id, family_tokenizer, oracle_rows, trained_text
from tests.helpers import run_script, write_jsonl

SYSTEM = {"role": "system", "content": "You are a quiz assistant."}
TURNS = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy? Réponds en «français»."},
         {"role": "assistant", "content": "Rome, depuis 1871 — «Roma» 🇮🇹."}]
CONVERSATIONS = {"single": TURNS[:2], "multi": TURNS, "system-single": [SYSTEM] + TURNS[:2],
                 "system-multi": [SYSTEM] + TURNS}


@pytest.fixture(scope="module")
def base_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _mode(family, messages):
    return "fold" if family == "gemma2" and messages[0]["role"] == "system" else "keep"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", list(CONVERSATIONS))
@pytest.mark.parametrize("turns", ["all", "last"])
def test_conversation_mask_equals_token_oracle(family, kind, turns, base_tokenizer):
    tok = family_tokenizer(family, base_tokenizer)
    messages = with_system_mode(CONVERSATIONS[kind], _mode(family, CONVERSATIONS[kind]))
    got = [(r["input_ids"], r["labels"]) for r in conversation_rows(tok, messages, turns)]
    assert got == oracle_rows(tok, messages, end_of_turn_id(family, tok), turns)


@pytest.mark.parametrize("family,kind,expected", [
    # Phi-3 closes the conversation with <|endoftext|>: never trained, generation stops at <|end|>.
    ("phi3_5", "multi", ["Paris.<|end|>Rome, depuis 1871 — «Roma» 🇮🇹.<|end|>"]),
    # Qwen3 writes the empty think block on the last turn only.
    ("qwen3", "multi", ["Paris.<|im_end|><think>\n\n</think>\n\nRome, depuis 1871 — «Roma» 🇮🇹.<|im_end|>"]),
    ("llama3_1", "system-multi", ["Paris.<|eot_id|>Rome, depuis 1871 — «Roma» 🇮🇹.<|eot_id|>"]),
    ("gemma2", "multi", ["Paris.<end_of_turn>Rome, depuis 1871 — «Roma» 🇮🇹.<end_of_turn>"]),
    # Mistral v0.3 with a system message: one row per turn, each with its own prompt.
    ("mistral_v0_3", "system-multi", [" Paris.</s>", " Rome, depuis 1871 — «Roma» 🇮🇹.</s>"]),
])
def test_trained_text_by_hand(family, kind, expected, base_tokenizer):
    tok = family_tokenizer(family, base_tokenizer)
    rows = conversation_rows(tok, CONVERSATIONS[kind])
    assert [trained_text(tok, r["labels"]) for r in rows] == expected
    if family == "phi3_5":  # not even as input: nothing after the last trained token is kept
        assert all(tok.eos_token_id not in r["input_ids"] for r in rows)


def test_mistral_system_prompt_rows_carry_the_system_prompt_where_inference_does(base_tokenizer):
    tok = family_tokenizer("mistral_v0_3", base_tokenizer)
    rows = conversation_rows(tok, CONVERSATIONS["system-multi"])
    texts = [tok.decode(r["input_ids"]) for r in rows]
    assert texts == ["<s>[INST] You are a quiz assistant.\n\nWhat is the capital of France?[/INST] Paris.</s>",
                     "<s>[INST] What is the capital of France?[/INST] Paris.</s>[INST] You are a quiz assistant."
                     "\n\nAnd of Italy? Réponds en «français».[/INST] Rome, depuis 1871 — «Roma» 🇮🇹.</s>"]


def _fmt(system, mode="keep"):
    from common.data.prompts import PromptFormat

    return PromptFormat(use_chat=True, system_prompt=system, system_mode=mode)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_question_answer_training_prompt_is_evaluate_prompt_byte_for_byte(family, system, base_tokenizer):
    from datasets import Dataset

    from common.data.prompts import chat_sft_rows, generation_prompt

    tok = family_tokenizer(family, base_tokenizer)
    fmt = _fmt(system, "fold" if family == "gemma2" else "keep")
    questions = ["Who wrote Hamlet?", "Quelle est la capitale de l'Italie ?"]
    answers = ["William Shakespeare", "Rome 🇮🇹"]
    rows = chat_sft_rows(Dataset.from_dict({"question": questions, "answer": answers}), fmt, tok)
    end = FAMILIES[family][3]
    for q, a, row in zip(questions, answers, rows):
        prompt = generation_prompt(q, fmt, tok)
        if system:
            assert system in prompt
        first = next(k for k, t in enumerate(row["labels"]) if t != -100)
        assert row["input_ids"][:first] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(row["input_ids"][:first]) == prompt
        lead = {"mistral_v0_3": " ", "qwen3": "<think>\n\n</think>\n\n"}.get(family, "")
        assert trained_text(tok, row["labels"]) == lead + a + end
        assert row["input_ids"][first:] == row["labels"][first:]


@pytest.fixture(scope="module")
def family_models(tiny_llama, tmp_path_factory):
    """family -> a tiny llama whose tokenizer has that family's special tokens and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_llama)
    built = {}

    def build(family):
        if family not in built:
            path = str(tmp_path_factory.mktemp("models") / family)
            tok = family_tokenizer(family, base)
            model = AutoModelForCausalLM.from_pretrained(tiny_llama)
            model.resize_token_embeddings(len(tok))
            model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
            model.generation_config.bos_token_id = tok.bos_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            model.save_pretrained(path)
            tok.save_pretrained(path)
            built[family] = path
        return built[family]

    return build


FAST = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none",
        "--eval_strategy", "no", "--lora_r", "2"]


def test_mistral_system_prompt_question_answer_run_trains_on_evaluate_prompt(family_models, tmp_path):
    """The silent case: the run trained on `<s>[INST] question [/INST] answer</s>` with the question
    in the loss while evaluate.py prompted with the system prompt."""
    from common.evaluation.answers import generation_prompt
    from common.model.source import resolve_model
    from common.data.prompts import prompt_format
    from sft.run import train

    model = family_models("mistral_v0_3")
    result = train("lora", ["--model_id", model, "--dataset_name", "triviaqa-sample", "--max_train_samples", "4",
                            "--system_prompt", "Be brief.", "--output_dir", tmp_path / "o", *FAST])
    tok = result.trainer.processing_class
    from common.evaluation.run import make_parser

    eval_args = make_parser().parse(["--model_id", str(tmp_path / "o"), "--system_prompt", "Be brief."])
    fmt = prompt_format(eval_args, tok, "triviaqa")
    assert resolve_model(str(tmp_path / "o")).adapter_dir
    from common.data.sources import load_splits

    splits, _ = load_splits("triviaqa-sample", None)
    for row, q in zip(result.trainer.train_dataset, splits["train"]["question"][:4]):
        first = next(k for k, t in enumerate(row["labels"]) if t != -100)
        prompt = generation_prompt(q, fmt, tok)
        assert tok.decode(row["input_ids"][:first]) == prompt and prompt.startswith("<s>[INST] Be brief.\n\n")
        assert trained_text(tok, row["labels"]).startswith(" ") and trained_text(tok, row["labels"]).endswith("</s>")


def test_gemma2_system_message_is_one_line_exit_2_then_fold_trains(family_models, tmp_path, capsys):
    model = family_models("gemma2")
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS["system-multi"]}] * 4)
    code = run_script("lora.py", ["--model_id", model, "--dataset_name", data, "--output_dir", tmp_path / "a",
                                  *FAST])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err
    assert len([line for line in lines if "error" in line]) == 1 and "--system_message fold" in err
    assert "System role not supported" in err
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    assert run_script("lora.py", ["--model_id", model, "--dataset_name", data, "--output_dir", tmp_path / "b",
                                  "--system_message", "fold", *FAST]) == 0
    # question-answer data with the default system prompt: the same line, and fold works there too
    qa = ["--dataset_name", "triviaqa-sample", "--max_train_samples", "4"]
    assert run_script("lora.py", ["--model_id", model, *qa, "--output_dir", tmp_path / "c", *FAST]) == 2
    assert "--system_message fold" in capsys.readouterr().err
    assert run_script("lora.py", ["--model_id", model, *qa, "--output_dir", tmp_path / "d", "--system_message",
                                  "fold", *FAST]) == 0


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]
CALLING = [{"role": "system", "content": "You can look the weather up."},
           {"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call00001", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
           {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "{\"temp\": 21}"},
           {"role": "assistant", "content": "21 °C in Paris."},
           {"role": "user", "content": "And Rome?"},
           {"role": "assistant", "content": "Let me check.", "tool_calls": [
               {"id": "call00002", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
           {"role": "tool", "tool_call_id": "call00002", "name": "get_weather", "content": "{\"temp\": 25}"},
           {"role": "assistant", "content": "25 °C in Rome."}]
CALLING_FAMILIES = ["llama3_1", "qwen2_5", "qwen3", "mistral_v0_3"]


def _calling():
    from common.data import tools

    return tools.for_template(tools.check_tool_messages(CALLING, "row", "`messages`"))


@pytest.mark.parametrize("family", CALLING_FAMILIES)
@pytest.mark.parametrize("with_tools", [False, True], ids=["no-schemas", "schemas"])
def test_tool_calls_are_trained_and_tool_results_never_as_the_token_oracle_says(family, with_tools,
                                                                                base_tokenizer):
    tok = family_tokenizer(family, base_tokenizer)
    schemas = TOOLS if with_tools else None
    messages = _calling()
    got = [(r["input_ids"], r["labels"]) for r in conversation_rows(tok, messages, tools=schemas)]
    assert got == oracle_rows(tok, messages, end_of_turn_id(family, tok), tools=schemas)
    trained = "".join(trained_text(tok, labels) for _, labels in got)
    assert "get_weather" in trained and "Rome" in trained and "21 °C" in trained
    assert "temp" not in trained  # the tool results


@pytest.mark.parametrize("family", ["phi3_5", "chatml"])
def test_templates_without_tool_calls_refuse_function_calling_rows_in_one_line(family, base_tokenizer):
    from common.flags.errors import UsageError

    tok = family_tokenizer(family, base_tokenizer)
    with pytest.raises(UsageError, match="does not write an assistant's `tool_calls`"):
        conversation_rows(tok, _calling())


def test_function_calling_file_trains_on_oracle_labels(family_models, tmp_path):
    """A JSONL file of function-calling rows (tool calls, tool results, a `tools` column) through
    lora.py: read, stored and rendered back as the template expects."""
    import json

    from sft.run import train

    model = family_models("qwen2_5")
    rows = [{"messages": CALLING, "tools": TOOLS}, {"messages": TURNS}, {"messages": CALLING[1:5], "tools": TOOLS},
            {"messages": CONVERSATIONS["system-single"]}]
    data = write_jsonl(tmp_path / "calls.jsonl", rows)
    result = train("lora", ["--model_id", model, "--dataset_name", data, "--output_dir", tmp_path / "o",
                            "--max_seq_length", "2048", *FAST])
    tok = result.trainer.processing_class
    from common.data import tools

    for row, example in zip(rows, result.trainer.train_dataset):
        messages = tools.for_template(tools.check_tool_messages(row["messages"], "r", "m")) \
            if tools.uses_tools(row["messages"]) else row["messages"]
        expected = oracle_rows(tok, messages, end_of_turn_id("qwen2_5", tok), tools=row.get("tools"))
        assert [(example["input_ids"], example["labels"])] == expected, json.dumps(row)[:200]


def _prompt_and_answer(kind, row):
    """A trainer's tokenised row -> (prompt ids, chosen or desirable answer ids)."""
    if kind == "dpo":
        return row["prompt_ids"], row["chosen_ids"]
    if kind == "kto":
        return row["prompt_ids"], row["completion_ids"]
    n = len(row["prompt_input_ids"])  # orpo, simpo: TRL's ORPO/CPO rows
    return row["prompt_input_ids"], row["chosen_input_ids"][n:]


@pytest.mark.parametrize("family", ["mistral_v0_3", "phi3_5", "gemma2"])
@pytest.mark.parametrize("kind", ["dpo", "kto", "orpo", "simpo"])
def test_preference_rows_are_evaluate_prompt_and_sft_trained_answer(kind, family, family_models, tmp_path):
    """Question-answer pairs with the default system prompt. The trainers rendered the conversation
    themselves: on Mistral v0.3 the prompt was `<s>[INST]` and the question was trained as the
    answer, on Phi-3.5 the answer ended `<|end|>\\n<|endoftext|>`, on Gemma 2 the template raised."""
    from common.data.prompts import PromptFormat, generation_prompt
    from common.data.sources import load_splits
    from rlhf.run import train

    model = family_models(family)
    extra = ["--system_message", "fold"] if family == "gemma2" else []
    result = train(kind, ["--model_id", model, "--dataset_name", "triviaqa-sample", "--max_train_samples", "4",
                          "--output_dir", tmp_path / "o", *FAST, *extra])
    tok = result.trainer.processing_class
    fmt = PromptFormat(use_chat=True, system_prompt="Answer the trivia question with a short answer only.",
                       system_mode="fold" if family == "gemma2" else "keep")
    train_rows = load_splits("triviaqa-sample", None)[0]["train"].select(range(4))
    answers = {q: a["value"] for q, a in zip(train_rows["question"], train_rows["answer"])}
    end = FAMILIES[family][3]
    seen = 0
    for row in result.trainer.train_dataset:
        if kind == "kto" and not row["label"]:
            continue
        prompt_ids, answer_ids = _prompt_and_answer(kind, row)
        question = next(q for q in answers if generation_prompt(q, fmt, tok) == tok.decode(prompt_ids))
        assert tok.decode(answer_ids) == (" " if family == "mistral_v0_3" else "") + answers[question] + end
        seen += 1
    assert seen == len(result.trainer.train_dataset) // (2 if kind == "kto" else 1)


def test_end_of_turn_that_is_not_a_special_token_is_trained(base_tokenizer):
    """A ChatML fine-tune whose `<|im_end|>` was added as an ordinary token (EOS stays `</s>`): the
    reply's end-of-turn must still be trained, or the model never learns to stop."""
    import copy

    from tokenizers import AddedToken

    tok = copy.deepcopy(base_tokenizer)
    tok.add_tokens([AddedToken("<|im_start|>", special=False), AddedToken("<|im_end|>", special=False)])
    tok.chat_template = (HERE / "chatml.jinja").read_text(encoding="utf-8")
    rows = conversation_rows(tok, TURNS)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [(r["input_ids"], r["labels"]) for r in rows] == oracle_rows(tok, TURNS, end)
    assert trained_text(tok, rows[0]["labels"]) == "Paris.<|im_end|>Rome, depuis 1871 — «Roma» 🇮🇹.<|im_end|>"


@pytest.mark.parametrize("turns", ["all", "last"])
def test_qwen3_reasoning_replies_train_their_think_block(turns, base_tokenizer):
    tok = family_tokenizer("qwen3", base_tokenizer)
    messages = [TURNS[0], {"role": "assistant", "content": "<think>\nFrance's capital.\n</think>\n\nParis."},
                TURNS[2], {"role": "assistant", "content": "<think>\nItaly: Rome.\n</think>\n\nRome."}]
    rows = conversation_rows(tok, messages, turns)
    assert [(r["input_ids"], r["labels"]) for r in rows] == oracle_rows(tok, messages, end_of_turn_id("qwen3", tok),
                                                                          turns)
    # Qwen3 drops the reasoning of turns before the last question, as it does at inference.
    assert trained_text(tok, rows[0]["labels"]).endswith("<think>\nItaly: Rome.\n</think>\n\nRome.<|im_end|>")


def test_tool_call_turn_ends_at_its_end_of_turn_when_tool_call_markers_are_special(base_tokenizer):
    tok = family_tokenizer("qwen2_5", base_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    got = [(r["input_ids"], r["labels"]) for r in conversation_rows(tok, _calling())]
    assert got == oracle_rows(tok, _calling(), end_of_turn_id("qwen2_5", tok))
    assert "</tool_call><|im_end|>" in trained_text(tok, got[0][1])


def test_a_pair_whose_answer_holds_several_messages_is_one_line_exit_2(family_models, tmp_path, capsys):
    model = family_models("llama3_1")
    pair = {"prompt": [TURNS[0]], "chosen": [TURNS[1], TURNS[2], TURNS[3]], "rejected": [{"role": "assistant",
                                                                                       "content": "Lyon."}]}
    data = write_jsonl(tmp_path / "p.jsonl", [pair] * 4)
    assert run_script("dpo.py", ["--model_id", model, "--dataset_name", data, "--output_dir", tmp_path / "o",
                                 *FAST]) == 2
    err = capsys.readouterr().err
    assert "`chosen` holds 3 messages" in err and "Traceback" not in err


def test_reward_model_folds_a_refused_system_message_in_message_pairs(family_models, tmp_path):
    model = family_models("gemma2")
    pair = {"prompt": [SYSTEM, TURNS[0]], "chosen": [TURNS[1]], "rejected": [{"role": "assistant", "content": "Lyon."}]}
    data = write_jsonl(tmp_path / "p.jsonl", [pair] * 8)
    argv = ["--model_id", model, "--dataset_name", data, *FAST]
    assert run_script("reward_model.py", [*argv, "--output_dir", tmp_path / "a"]) == 2
    assert run_script("reward_model.py", [*argv, "--output_dir", tmp_path / "b", "--system_message", "fold"]) == 0
