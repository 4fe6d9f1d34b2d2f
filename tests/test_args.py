"""Flags: parsing, booleans, did-you-mean, YAML config, and checks that fail before any model loads."""

import subprocess
import sys

import pytest

from common.flags.groups import OPTIMIZERS, SCHEDULERS
from common.flags.errors import UsageError
from sft.run import TECHNIQUES, make_parser, parse
from tests.conftest import ROOT
from tests.helpers import run_script


@pytest.mark.parametrize("text,expected", [("True", True), ("true", True), ("1", True), ("False", False),
                                           ("false", False), ("0", False)])
def test_booleans_accept_seed_spellings(text, expected):
    args = make_parser("lora").parse(["--model_id", "m", "--gradient_checkpointing", text])
    assert args.gradient_checkpointing is expected


def test_bare_boolean_flag_means_true():
    assert make_parser("lora").parse(["--model_id", "m", "--gradient_checkpointing"]).gradient_checkpointing


def test_invalid_boolean_names_the_flag(capsys):
    assert run_script("lora.py", ["--model_id", "m", "--load_in_4bit", "maybe"]) == 2
    assert "--load_in_4bit" in capsys.readouterr().err


def test_misspelled_flag_suggests_the_right_one(capsys):
    assert run_script("lora.py", ["--model_id", "m", "--lora_rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "--lora_rank" in err and "did you mean `--lora_r`" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_abbreviations_are_not_silently_accepted():
    with pytest.raises(UsageError, match="did you mean"):
        make_parser("lora").parse(["--model_id", "m", "--learning_r", "1e-3"])


def test_qlora_turns_4bit_on_and_dora_turns_dora_on():
    assert make_parser("qlora").parse(["--model_id", "m"]).load_in_4bit is True
    assert make_parser("dora").parse(["--model_id", "m"]).use_dora is True
    assert make_parser("lora").parse(["--model_id", "m"]).load_in_4bit is False


def test_qlora_8bit_when_asked():
    technique, args = parse("qlora", ["--model_id", "m", "--load_in_8bit", "True"])
    assert (args.load_in_4bit, args.load_in_8bit) == (False, True)


@pytest.mark.parametrize("script,argv,flag", [
    ("lora.py", ["--load_in_4bit", "True", "--load_in_8bit", "True"], "--load_in_8bit"),
    ("lora.py", ["--use_bfloat16", "True", "--fp16", "True"], "--fp16"),
    ("lora.py", ["--lora_r", "0"], "--lora_r"),
    ("lora.py", ["--learning_rate", "0"], "--learning_rate"),
    ("lora.py", ["--learning_rate", "-1e-4"], "--learning_rate"),
    ("prompt_tuning.py", ["--num_virtual_tokens", "0"], "--num_virtual_tokens"),
    ("lora.py", ["--optimizer", "adamw_torch_fuse"], "--optimizer"),
    ("lora.py", ["--lr_scheduler_type", "cosin"], "--lr_scheduler_type"),
    ("lora.py", ["--report_to", "wandbb"], "--report_to"),
    ("lora.py", ["--lora_dropout", "1.5"], "--lora_dropout"),
    ("lora.py", ["--task_type", "SEQ_CLS"], "--task_type"),
    ("lora.py", ["--bnb_4bit_quant_type", "int4"], "--bnb_4bit_quant_type"),
    ("dora.py", ["--use_dora", "False"], "lora.py"),
    ("qlora.py", ["--load_in_4bit", "False"], "lora.py"),
    ("lora.py", ["--peft_type", "PREFIX_TUNING"], "prefix_tuning.py"),
    ("prefix_tuning.py", ["--peft_type", "BOGUS"], "--peft_type"),
    ("lora.py", ["--prompt_template", "Q: {q}"], "--prompt_template"),
    # Packed or flattened examples attend to each other without flash attention.
    ("lora.py", ["--packing", "True"], "--attn_implementation flash_attention_2"),
    ("lora.py", ["--padding_free", "True", "--attn_implementation", "sdpa"], "--attn_implementation flash_attention_2"),
    ("prompt_tuning.py", ["--packing", "True", "--attn_implementation", "flash_attention_2"], "--packing"),
    ("lora.py", ["--use_liger_kernel", "True"], "pip install liger-kernel"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, script, argv, flag):
    assert run_script(script, ["--model_id", "m", *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_model_id(capsys):
    assert run_script("lora.py", []) == 2
    assert "--model_id" in capsys.readouterr().err


def test_yaml_config_supplies_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_id: from-yaml\nlora_r: 4\nlearning_rate: 0.001\ngradient_checkpointing: true\n"
                   "target_modules: [q_proj, v_proj]\n")
    args = make_parser("lora").parse(["--config", str(cfg), "--lora_r", "12"])
    assert args.model_id == "from-yaml" and args.lora_r == 12 and args.learning_rate == 0.001
    assert args.gradient_checkpointing is True and args.target_modules == "q_proj,v_proj"
    assert {"model_id", "lora_r", "learning_rate"} <= args.explicit


def test_yaml_config_unknown_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora_rr: 4\n")
    with pytest.raises(UsageError, match="did you mean `--lora_r`"):
        make_parser("lora").parse(["--config", str(cfg)])


def test_aliases_for_trl_users():
    args = make_parser("lora").parse(["--model_name_or_path", "m", "--optim", "sgd", "--max_length", "64"])
    assert (args.model_id, args.optimizer, args.max_seq_length) == ("m", "sgd", 64)


def test_every_script_accepts_the_whole_flag_set():
    names = [set(make_parser(t).names) for t in TECHNIQUES]
    assert all(n == names[0] for n in names)


def test_static_name_lists_match_installed_transformers():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}
    assert set(SCHEDULERS) == {s.value for s in SchedulerType}


def test_help_and_flag_errors_do_not_import_torch():
    code = ("import sys, lora; rc = lora.main(['--model_id', 'm', '--lora_r', '0']); "
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False"]
    helped = subprocess.run([sys.executable, "lora.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "--lora_r" in helped.stdout and "--use_dora" in helped.stdout
