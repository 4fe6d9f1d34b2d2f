"""evaluate.py, in-training exact match, plots and merge.py on tiny models."""

import json

import pytest
import torch

from tests.helpers import run_script

TRAIN = ["--dataset_name", "triviaqa-sample", "--max_train_samples", "64", "--per_device_train_batch_size", "16",
         "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none", "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "16", *TRAIN]) == 0
    return out


def test_evaluate_writes_results_and_predictions(lora_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_script("evaluate.py", ["--model_id", lora_run, "--dataset_name", "triviaqa-sample",
                                      "--dataset_split", "validation", "--max_samples", "12", "--batch_size", "5",
                                      "--output_dir", out]) == 0
    printed = capsys.readouterr()
    assert "EM=" in printed.out and "F1=" in printed.out and "samples/s" in printed.out
    results = json.loads((out / "eval_results.json").read_text())
    assert results["n"] == 12 and 0 <= results["exact_match"] <= results["f1"] <= 1
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"question", "gold_aliases", "prediction", "em", "f1"}
    assert all("\n" not in r["prediction"] for r in rows)


@pytest.mark.parametrize("technique", ["prompt_tuning", "p_tuning", "prefix_tuning", "qlora", "dora"])
def test_evaluate_takes_every_adapter_kind(technique, tiny_llama, tmp_path):
    run = tmp_path / technique
    assert run_script(f"{technique}.py", ["--model_id", tiny_llama, "--output_dir", run, "--max_steps", "2",
                                          *TRAIN]) == 0
    extra = ["--load_in_4bit", "True"] if technique == "qlora" else []
    assert run_script("evaluate.py", ["--model_id", run, "--dataset_name", "triviaqa-sample", "--max_samples", "4",
                                      "--output_dir", tmp_path / "eval", *extra]) == 0
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["n"] == 4


def test_evaluate_formats_prompts_as_training_did(tiny_chat_llama, tmp_path):
    run = tmp_path / "chat"
    assert run_script("lora.py", ["--model_id", tiny_chat_llama, "--output_dir", run, "--max_steps", "1",
                                  "--use_chat_template", "false", "--prompt_template", "Q: {question}\nA:",
                                  *TRAIN]) == 0
    from common.evaluation import answers

    seen = []
    real = answers.generation_prompt
    answers.generation_prompt = lambda q, fmt, tok: seen.append(real(q, fmt, tok)) or seen[-1]
    try:
        assert run_script("evaluate.py", ["--model_id", run, "--dataset_name", "triviaqa-sample",
                                          "--max_samples", "2", "--output_dir", tmp_path / "e"]) == 0
    finally:
        answers.generation_prompt = real
    assert seen and all(p.startswith("Q: ") and p.endswith("\nA:") for p in seen)


@pytest.mark.parametrize("argv,flag", [(["--batch_size", "0"], "--batch_size"),
                                       (["--max_samples", "-1"], "--max_samples"),
                                       (["--dataset_split", "nope"], "nope")])
def test_evaluate_bad_flags(argv, flag, lora_run, tmp_path, capsys):
    assert run_script("evaluate.py", ["--model_id", lora_run, "--dataset_name", "triviaqa-sample",
                                      "--output_dir", tmp_path / "e", *argv]) == 2
    assert flag in capsys.readouterr().err


def test_in_training_exact_match_is_logged_and_plotted(tiny_llama, tmp_path):
    out = tmp_path / "em"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "8",
                                  "--eval_strategy", "steps", "--eval_steps", "4", "--eval_em_samples", "6",
                                  "--max_eval_samples", "6", *TRAIN]) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    em_logs = [e for e in history if "eval_em" in e]
    assert len(em_logs) >= 3  # steps 4, 8 and the final evaluation
    assert all(0 <= e["eval_em"] <= 1 and 0 <= e["eval_f1"] <= 1 for e in em_logs)
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_em" in results and "eval_loss" in results
    for name in ("loss.png", "learning_rate.png", "exact_match.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_exact_match_at_the_end_without_eval_strategy(tiny_llama, tmp_path):
    out = tmp_path / "em-end"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "2",
                                  "--eval_em_samples", "4", *TRAIN]) == 0
    assert "eval_em" in json.loads((out / "all_results.json").read_text())


def test_plotting_cli_on_a_finished_run(lora_run, tmp_path):
    from common.recipe.plotting import main

    for png in (lora_run / "plots").glob("*.png"):
        png.unlink()
    assert main([str(lora_run)]) == 0
    assert (lora_run / "plots" / "loss.png").is_file()
    assert main([str(tmp_path)]) == 2


def _greedy(model, tokenizer, questions):
    from common.data.prompts import PromptFormat
    from common.evaluation.answers import generate_answers
    from common.model.loading import ensure_pad_token

    ensure_pad_token(tokenizer)
    return generate_answers(model, tokenizer, questions, PromptFormat(), batch_size=4, max_new_tokens=8)


def test_merged_model_answers_like_base_plus_adapter(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert run_script("merge.py", ["--adapter", lora_run, "--output_dir", out]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    cfg = json.loads((lora_run / "adapter_config.json").read_text())
    said = capsys.readouterr().out.strip().splitlines()[-1]  # the output is new; base and adapter stay as they were
    assert said == (f"wrote the merged model to {out.resolve()} (base {cfg['base_model_name_or_path']} + adapter "
                    f"{lora_run}; both unchanged)"), said
    questions = ["What is the capital of France?", "Who wrote Hamlet?", "Which planet is the Red Planet?"]
    tokenizer = AutoTokenizer.from_pretrained(lora_run)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
                                             lora_run)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert _greedy(merged, tokenizer, questions) == _greedy(with_adapter, tokenizer, questions)
    ids = tokenizer(questions[:1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, with_adapter(**ids).logits, atol=1e-4, rtol=1e-4)


def test_merge_refuses_prompt_learning_and_notes_qlora(tiny_llama, tmp_path, capsys):
    pt = tmp_path / "pt"
    assert run_script("prompt_tuning.py", ["--model_id", tiny_llama, "--output_dir", pt, "--max_steps", "1",
                                           *TRAIN]) == 0
    assert run_script("merge.py", ["--adapter", pt, "--output_dir", tmp_path / "m1"]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    q = tmp_path / "q"
    assert run_script("qlora.py", ["--model_id", tiny_llama, "--output_dir", q, "--max_steps", "1", *TRAIN]) == 0
    capsys.readouterr()
    assert run_script("merge.py", ["--adapter", q, "--output_dir", tmp_path / "m2"]) == 0
    assert "4-bit" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_llama_128(tmp_path_factory):
    """Twice as wide as the other tiny models: wide enough to memorise the 300 training questions."""
    from common.model.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-llama-128"), "llama",
                            hidden_size=128, intermediate_size=256)


def _train_em(run_dir, tmp_path) -> float:
    out = tmp_path / (run_dir.name + "-eval")
    assert run_script("evaluate.py", ["--model_id", run_dir, "--dataset_name", "triviaqa-sample",
                                      "--dataset_split", "train", "--batch_size", "64", "--output_dir", out]) == 0
    return json.loads((out / "eval_results.json").read_text())["exact_match"]


@pytest.mark.slow
@pytest.mark.parametrize("technique", ["lora", "dora", "qlora"])
def test_pipeline_memorises_the_training_questions(technique, tiny_llama_128, tmp_path):
    """Templating, completion-only loss, EOS, generation, answer extraction and scoring together:
    a tiny model that cannot answer anything learns the 300 training answers exactly."""
    run = tmp_path / technique
    assert run_script(f"{technique}.py", [
        "--model_id", tiny_llama_128, "--dataset_name", "triviaqa-sample", "--output_dir", run,
        "--num_train_epochs", "20", "--per_device_train_batch_size", "16", "--learning_rate", "5e-3",
        "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0", "--lr_scheduler_type", "cosine",
        "--warmup_ratio", "0.05", "--logging_steps", "50", "--save_strategy", "no", "--report_to", "none"]) == 0
    assert _train_em(run, tmp_path) >= 0.9


def test_untrained_model_scores_near_zero(tiny_llama_128, tmp_path):
    from pathlib import Path

    assert _train_em(Path(tiny_llama_128), tmp_path) <= 0.02
