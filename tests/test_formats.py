"""The prompt format (template, system prompt, chat template) travels with every artefact a run
writes: checkpoints, merged models and runs chained on them build the prompts the run trained on.
Also: escapes in the prompt flags, and the one-line warnings of flags a run has to drop."""

import json
import shutil
from types import SimpleNamespace

import pytest

from tests.helpers import run_script

RUN = ["--dataset_name", "triviaqa-sample", "--max_train_samples", "16", "--per_device_train_batch_size", "8",
       "--logging_steps", "1", "--report_to", "none", "--learning_rate", "1e-2"]
QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?"]


# Escapes -------------------------------------------------------------------------------------

def _format(argv, chat_template=None):
    from common.data import prompts
    from sft.run import make_parser

    args = make_parser("lora").parse(["--model_id", "m", *argv])
    return prompts.prompt_format(args, SimpleNamespace(chat_template=chat_template), "qa")


def test_typed_backslash_n_and_t_equal_a_real_newline_and_tab():
    # What a shell passes for `--prompt_template 'Q: {question}\nA:'`: a backslash and an `n`.
    typed = _format(["--prompt_template", "Q:\\t{question}\\nA:", "--use_chat_template", "false"])
    assert typed.template == "Q:" + chr(9) + "{question}" + chr(10) + "A:"
    # The default template, typed as the README shows it, is the default itself.
    assert _format(["--prompt_template", "Question: {question}\\nAnswer:"]).template == _format([]).template
    # `\\` is a backslash: a literal backslash-n stays expressible.
    assert _format(["--prompt_template", "{question} \\\\n"]).template == "{question} " + chr(92) + "n"
    chat = _format(["--system_prompt", "Be brief.\\nOne word."], chat_template="{{ x }}")
    assert chat.system_prompt == "Be brief." + chr(10) + "One word."


# Warnings for flags a run drops --------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["--gradient_checkpointing", "True"]], ids=["default", "explicit"])
def test_prefix_tuning_says_once_that_checkpointing_is_off(argv, capsys):
    from common.recipe.cli import setup_logging
    from sft.run import parse

    setup_logging("prefix_tuning.py")  # the handler writes to this test's captured stderr
    _, args = parse("prefix_tuning", ["--model_id", "m", *argv])
    assert args.gradient_checkpointing is False
    lines = [line for line in capsys.readouterr().err.splitlines() if "checkpointing" in line]
    assert len(lines) == 1 and "prefix tuning cannot use it" in lines[0], lines


def test_dora_gpu_offload_without_cuda_is_dropped_before_peft(tiny_llama, tmp_path, monkeypatch, capsys):
    import torch

    from common.recipe.cli import setup_logging
    from sft.run import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    setup_logging("dora.py")
    result = train("dora", ["--model_id", tiny_llama, "--output_dir", tmp_path / "d", "--max_steps", "1",
                            "--save_strategy", "no", "--dora_ephemeral_gpu_offload", "True", *RUN])
    assert result.trainer.model.peft_config["default"].runtime_config.ephemeral_gpu_offload is False
    warned = [line for line in capsys.readouterr().err.splitlines() if "dora_ephemeral_gpu_offload" in line]
    assert len(warned) == 1 and "ignored" in warned[0]


# run_config.json in every artefact -----------------------------------------------------------

class FormatSpy:
    """Records the prompt format each run builds (every script builds it with prompts.prompt_format),
    with the tokenizer it renders prompts with."""

    def __init__(self, monkeypatch):
        from common.data import prompts

        self.seen = []
        real = prompts.prompt_format

        def spy(args, tokenizer, schema):
            fmt = real(args, tokenizer, schema)
            self.seen.append((fmt, tokenizer))
            return fmt

        monkeypatch.setattr(prompts, "prompt_format", spy)

    def prompts(self):
        """The generation prompts (text, ids) of the last run, for QUESTIONS."""
        from common.data.prompts import generation_prompt

        fmt, tokenizer = self.seen[-1]
        texts = [generation_prompt(q, fmt, tokenizer) for q in QUESTIONS]
        return texts, [tokenizer(t, add_special_tokens=not fmt.use_chat)["input_ids"] for t in texts]


CASES = {
    # a plain model with a custom template
    "template": ("tiny_llama", ["--prompt_template", "Quiz: {question} => Reply:"]),
    # an instruct-style model with a chat template and a custom system prompt
    "system_prompt": ("tiny_chat_llama", ["--system_prompt", "Reply like a crossword setter, in one word.",
                                          "--prompt_template", "Quiz: {question} => Reply:"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_merged_model_and_chained_dpo_build_the_training_prompts(case, request, tmp_path, monkeypatch):
    """Oracle: the prompts the SFT run itself built. Its checkpoint, the model merged from that
    checkpoint, evaluate.py on each, and a DPO run chained on the merged model must build
    byte-identical prompt strings and token ids."""
    fixture, flags = CASES[case]
    model = request.getfixturevalue(fixture)
    spy = FormatSpy(monkeypatch)
    run = tmp_path / "sft"
    assert run_script("lora.py", ["--model_id", model, "--output_dir", run, "--max_steps", "2",
                                  "--save_strategy", "steps", "--save_steps", "1", *flags, *RUN]) == 0
    trained = spy.prompts()
    assert "Quiz:" in trained[0][0] if case == "template" else "crossword" in trained[0][0]

    # A checkpoint read on its own: copied out of its run, or read while the run is still training.
    checkpoint = shutil.copytree(run / "checkpoint-1", tmp_path / "elsewhere" / "checkpoint-1")
    assert run_script("evaluate.py", ["--model_id", checkpoint, "--dataset_name", "triviaqa-sample",
                                      "--max_samples", "1", "--output_dir", tmp_path / "e1"]) == 0
    assert spy.prompts() == trained, "checkpoint"

    merged = tmp_path / "merged"
    assert run_script("merge.py", ["--adapter", checkpoint, "--output_dir", merged]) == 0
    assert run_script("evaluate.py", ["--model_id", merged, "--dataset_name", "triviaqa-sample",
                                      "--max_samples", "1", "--output_dir", tmp_path / "e2"]) == 0
    assert spy.prompts() == trained, "merged model"

    dpo = tmp_path / "dpo"
    assert run_script("dpo.py", ["--model_id", merged, "--output_dir", dpo, "--max_steps", "1",
                                 "--save_strategy", "steps", "--save_steps", "1", *RUN]) == 0
    assert spy.prompts() == trained, "DPO chained on the merged model"
    # ... and the DPO run passes the format on, in its checkpoint and its output directory.
    for folder in (dpo / "checkpoint-1", dpo):
        saved = json.loads((folder / "run_config.json").read_text())["flags"]
        for name, value in zip(flags[::2], flags[1::2]):
            assert saved[name.lstrip("-")] == value, (folder, name)


TEMPLATE = ["--prompt_template", "Quiz: {question} => Reply:"]
TRAINERS = {  # every other trainer, one saved step each (PPO saves a checkpoint before its last step only)
    "grpo.py": ["--reward_function", "triviaqa_f1", "--num_generations", "2", "--max_completion_length", "2",
                "--per_device_train_batch_size", "4", "--max_steps", "1"],
    "reward_model.py": ["--per_device_train_batch_size", "4", "--max_steps", "1"],
    "ppo.py": ["--reward_function", "triviaqa_f1", "--per_device_train_batch_size", "4", "--response_length", "2",
               "--max_steps", "2"],
    "kto.py": ["--per_device_train_batch_size", "4", "--max_steps", "1"],
}


@pytest.mark.parametrize("script", list(TRAINERS))
def test_every_trainers_checkpoints_carry_the_prompt_format(script, tiny_llama, tmp_path):
    """Oracle: the flags the run was given, and its final run_config.json."""
    from common.model.source import resolve_model, saved_run_config

    out = tmp_path / "run"
    argv = ["--model_id", tiny_llama, "--output_dir", out, "--dataset_name", "triviaqa-sample",
            "--max_train_samples", "8", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none",
            *TEMPLATE, *TRAINERS[script]]
    if script != "ppo.py":
        argv += ["--logging_steps", "1"]
    assert run_script(script, argv) == 0
    final = saved_run_config(resolve_model(str(out)))["flags"]
    saved = json.loads((out / "checkpoint-1" / "run_config.json").read_text())["flags"]
    assert saved["prompt_template"] == TEMPLATE[1]
    names = ("prompt_template", "use_chat_template", "system_prompt")
    assert {k: saved[k] for k in names} == {k: final[k] for k in names}
