"""`--help` of every script: its own flags only, grouped, each default shown once and equal to the
value the parser really gives (the reference: parsing an empty command line)."""

import importlib
import re
from pathlib import Path

import pytest

from helpers import run_script

SCRIPTS = ["lora.py", "dora.py", "qlora.py", "prefix_tuning.py", "p_tuning.py", "prompt_tuning.py", "dpo.py",
           "orpo.py", "kto.py", "simpo.py", "grpo.py", "ppo.py", "reward_model.py", "evaluate.py", "merge.py"]


def help_entries(script: str) -> tuple[str, dict[str, str]]:
    """-> (help text, {flag: its whole help entry on one line})."""
    text = importlib.import_module(script.removesuffix(".py")).make_parser().parser.format_help()
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        match = re.match(r"  (--\w+)", line)
        if match:
            flag = match.group(1)
            entries[flag] = line.strip()
        elif flag and line.startswith("      "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return text, entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_defaults_equal_the_parsed_defaults(script):
    text, entries = help_entries(script)
    parsed = importlib.import_module(script.removesuffix(".py")).make_parser().parse([])
    assert text.startswith(f"usage: python {script} ") and text.split("\n")[1] == ""  # usage is one line
    shown = 0
    for flag, entry in entries.items():
        assert entry.count("(default") <= 1, entry  # never `(default: 1). (default: None)`
        assert "(default: None)" not in entry, entry
        match = re.search(r"\(default: (.*)\)$", entry)
        if not match or flag in ("--output_dir", "--eval_steps", "--dataset_num_proc", "--hub_model_id"):
            continue  # computed at run time; see the test below
        value = getattr(parsed, flag[2:])
        assert match.group(1) == str(value).replace("\n", "\\n"), (flag, entry, value)
        shown += 1
    assert shown >= 3


OWN = {  # flags a script's help must list, and flags of other techniques it must not
    "lora.py": (["--lora_r", "--use_dora", "--target_modules"], ["--num_virtual_tokens", "--prefix_projection",
                                                                 "--peft_type", "--prompt_tuning_init"]),
    "prefix_tuning.py": (["--num_virtual_tokens", "--prefix_projection", "--peft_type"],
                         ["--lora_r", "--prompt_tuning_init", "--encoder_reparameterization_type"]),
    "prompt_tuning.py": (["--prompt_tuning_init", "--prompt_tuning_init_text"], ["--lora_r", "--prefix_projection"]),
    "dpo.py": (["--loss_type", "--beta", "--rejected_source"], ["--simpo_gamma", "--desirable_weight", "--packing"]),
    "simpo.py": (["--simpo_gamma"], ["--loss_type", "--desirable_weight"]),
    "kto.py": (["--desirable_weight", "--undesirable_weight"], ["--simpo_gamma", "--loss_type"]),
    "ppo.py": (["--kl_coef", "--response_length"], ["--packing", "--eval_em_samples", "--simpo_gamma"]),
    "grpo.py": (["--num_generations", "--reward_weights"], ["--packing", "--max_seq_length"]),
}


@pytest.mark.parametrize("script", sorted(OWN))
def test_help_lists_the_scripts_own_flags_only(script):
    _, entries = help_entries(script)
    listed, absent = OWN[script]
    for flag in listed:
        assert flag in entries, flag
    for flag in absent:
        assert flag not in entries, flag
    # Left out of the help, still accepted (the run warns that they are ignored).
    parser = importlib.import_module(script.removesuffix(".py")).make_parser()
    assert absent[0][2:] in parser.parse([absent[0], "1"]).explicit


def test_output_dir_default_in_help_is_where_lora_writes(tiny_llama, tmp_path, monkeypatch):
    _, entries = help_entries("lora.py")
    shown = re.search(r"\(default: (.*)\)$", entries["--output_dir"]).group(1)
    monkeypatch.chdir(tmp_path)
    assert run_script("lora.py", ["--model_id", tiny_llama, "--dataset_name", "triviaqa-sample", "--max_steps", "1",
                                  "--max_train_samples", "8", "--save_strategy", "no", "--lora_r", "2"]) == 0
    assert (Path(tmp_path) / shown / "adapter_config.json").is_file(), sorted(Path(tmp_path).rglob("*"))[:20]
