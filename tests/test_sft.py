"""The six SFT scripts end to end on tiny local models and the bundled sample."""

import json
import shlex
from pathlib import Path

import pytest
import torch

from tests.helpers import losses, run_script

FAST = ["--dataset_name", "triviaqa-sample", "--max_train_samples", "64", "--per_device_train_batch_size", "16",
        "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none"]

# Learning rates that move a tiny random model visibly within a few dozen steps.
TECHNIQUE_FLAGS = {
    "lora": ["--learning_rate", "1e-2"],
    "dora": ["--learning_rate", "1e-2"],
    "qlora": ["--learning_rate", "1e-2"],
    "prefix_tuning": ["--learning_rate", "3e-2", "--prefix_projection", "True"],
    "p_tuning": ["--learning_rate", "3e-2"],
    "prompt_tuning": ["--learning_rate", "3e-1", "--prompt_tuning_init", "RANDOM"],
}


def _logits(model, tokenizer):
    batch = tokenizer(["Question: What is the capital of France?\nAnswer:"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits[:, -1, :].float()


def _reload(output_dir, quantized: bool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = json.loads((Path(output_dir) / "adapter_config.json").read_text())
    kwargs = {}
    if quantized:
        kwargs = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_use_double_quant=True,
                                                             bnb_4bit_compute_dtype=torch.float32,
                                                             bnb_4bit_quant_storage=torch.float32),
                      device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], **kwargs)
    return PeftModel.from_pretrained(base, output_dir)


@pytest.mark.parametrize("technique", list(TECHNIQUE_FLAGS))
def test_loss_falls_and_adapter_reloads_with_same_logits(technique, tiny_llama, tmp_path):
    from sft.run import train

    out = tmp_path / technique
    result = train(technique, ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "32", *FAST,
                               *TECHNIQUE_FLAGS[technique]])
    history = losses(out)
    assert len(history) == 8
    assert sum(history[-2:]) / 2 < sum(history[:2]) / 2 - 0.1, history

    # The output dir is a complete run: adapter (safetensors), tokenizer, run_config, metrics.
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run_config.json",
                 "all_results.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "run_config.json").read_text())
    assert config["technique"] == technique and config["flags"]["max_steps"] == 32
    assert config["parameters"]["trainable"] > 0 and config["summary"]["tokens_per_s"] > 0

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = _logits(result.trainer.model, tokenizer)
    reloaded = _logits(_reload(out, quantized=technique == "qlora"), tokenizer)
    torch.testing.assert_close(reloaded, trained, atol=1e-4, rtol=1e-4)


def test_qlora_trains_real_4bit_layers(tiny_llama, tmp_path):
    from sft.run import train

    result = train("qlora", ["--model_id", tiny_llama, "--output_dir", tmp_path / "q", "--max_steps", "1", *FAST])
    kinds = {type(m).__name__ for m in result.trainer.model.modules()}
    assert "Linear4bit" in kinds
    assert json.loads((tmp_path / "q" / "run_config.json").read_text())["model"]["quantized"] is True


def test_summary_and_parameter_counts_are_printed(tiny_llama, tmp_path, capsys):
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", tmp_path / "o", "--max_steps", "2",
                                  *FAST]) == 0
    captured = capsys.readouterr()
    assert "trainable parameters of" in captured.err
    for word in ("steps", "runtime", "tokens/s", "peak memory", "written to"):
        assert word in captured.out


def test_gpt2_query_key_value_means_c_attn(tiny_gpt2, tmp_path, capsys):
    out = tmp_path / "g"
    assert run_script("lora.py", ["--model_id", tiny_gpt2, "--output_dir", out, "--max_steps", "2",
                                  "--target_modules", "query_key_value", *FAST]) == 0
    assert "c_attn" in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]


def test_llama_fused_name_means_q_k_v(tiny_llama, tmp_path):
    out = tmp_path / "l"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "1",
                                  "--target_modules", "query_key_value", *FAST]) == 0
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == \
        ["k_proj", "q_proj", "v_proj"]


def test_unknown_target_module_lists_the_models_modules(tiny_llama, tmp_path, capsys):
    out = tmp_path / "u"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "1",
                                  "--target_modules", "attn_out", *FAST]) == 2
    err = capsys.readouterr().err
    assert "attn_out" in err and "q_proj" in err and "down_proj" in err
    assert not (out / "adapter_config.json").exists()


def test_contradicting_model_dims_exit_2_naming_both(tiny_llama, tmp_path, capsys):
    assert run_script("prefix_tuning.py", ["--model_id", tiny_llama, "--output_dir", tmp_path / "p",
                                           "--token_dim", "768", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--token_dim 768" in err and "64" in err


def test_chat_template_is_used_for_instruct_models(tiny_chat_llama, tmp_path):
    out = tmp_path / "c"
    assert run_script("lora.py", ["--model_id", tiny_chat_llama, "--output_dir", out, "--max_steps", "1",
                                  *FAST]) == 0
    assert json.loads((out / "run_config.json").read_text())["data"]["chat_template"] is True


def test_finished_run_is_not_overwritten_by_accident(tiny_llama, tmp_path, capsys):
    out = tmp_path / "done"
    argv = ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "1", *FAST]
    assert run_script("lora.py", argv) == 0
    assert run_script("lora.py", argv) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert run_script("lora.py", argv + ["--overwrite_output_dir", "True"]) == 0


def test_runs_chain_from_an_adapter_dir(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", first, "--max_steps", "4",
                                  "--learning_rate", "1e-2", *FAST]) == 0
    assert run_script("lora.py", ["--model_id", first, "--output_dir", second, "--max_steps", "4",
                                  "--learning_rate", "1e-2", *FAST]) == 0
    a = load_file(first / "adapter_model.safetensors")
    b = load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    start = json.loads((second / "run_config.json").read_text())["model"]["start_adapter"]
    assert Path(start) == first


def test_ignored_flags_warn_once_and_run_goes_on(tiny_llama, tmp_path, capsys):
    assert run_script("prompt_tuning.py", ["--model_id", tiny_llama, "--output_dir", tmp_path / "i",
                                           "--max_steps", "1", "--lora_r", "8", "--lora_alpha", "32", *FAST]) == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if "ignores flags" in l]
    assert len(warnings) == 1 and "`--lora_alpha`, `--lora_r`" in warnings[0]


def test_prefix_tuning_with_peft_type_p_tuning_runs_p_tuning(tiny_llama, tmp_path):
    out = tmp_path / "pt"
    assert run_script("prefix_tuning.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "1",
                                           "--peft_type", "P_TUNING", *FAST]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"


def test_secrets_never_reach_outputs(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEFAKEFAKE123")
    monkeypatch.setenv("WANDB_API_KEY", "wandbFAKEFAKE456")
    out = tmp_path / "s"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "1",
                                  "--hub_token", "hf_FLAGFLAG789", *FAST]) == 0
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for secret in (b"hf_FAKEFAKEFAKE123", b"wandbFAKEFAKE456", b"hf_FLAGFLAG789"):
                assert secret not in blob, path


# The commands of the user's document, as written, except that --model_id and --dataset_name
# point to local data, with --max_steps 2 added.
SEED = {
    "dora.py": """--dataset_name "triviaqa" --dataset_split "train" --model_id "/kaggle/input/llama-3.1/transformers/8b-instruct/2"
        --output_dir "./trained_model" --load_in_4bit True --bnb_4bit_use_double_quant True --bnb_4bit_quant_type "nf4"
        --use_bfloat16 True --use_cache False --num_train_epochs 3 --per_device_train_batch_size 1
        --gradient_accumulation_steps 2 --gradient_checkpointing True --optimizer "adamw_torch_fused" --logging_steps 10
        --save_strategy "epoch" --learning_rate 2e-4 --max_grad_norm 0.3 --warmup_ratio 0.03 --lr_scheduler_type "constant"
        --push_to_hub False --report_to "wandb" --lora_alpha 32 --lora_dropout 0.1 --lora_r 8 --lora_bias "none"
        --target_modules "query_key_value" --use_dora True --dora_ephemeral_gpu_offload True""",
    "lora.py": """--dataset_name "triviaqa" --dataset_split "train" --model_id "gpt2" --output_dir "./trained_lora_model"
        --load_in_4bit True --bnb_4bit_use_double_quant True --bnb_4bit_quant_type "nf4" --use_bfloat16 True
        --use_cache False --num_train_epochs 3 --per_device_train_batch_size 1 --gradient_accumulation_steps 4
        --gradient_checkpointing True --optimizer "adamw_torch_fused" --logging_steps 10 --save_strategy "epoch"
        --learning_rate 2e-4 --max_grad_norm 0.3 --warmup_ratio 0.03 --lr_scheduler_type "constant" --push_to_hub False
        --report_to "wandb" --lora_alpha 32 --lora_dropout 0.1 --lora_r 8 --lora_bias "none" --target_modules "query_key_value" """,
    "prefix_tuning.py": """--dataset_name "triviaqa" --dataset_split "train" --model_id "gpt2" --output_dir "./trained_lora_model"
        --load_in_4bit True --bnb_4bit_use_double_quant True --bnb_4bit_quant_type "nf4" --use_bfloat16 True
        --use_cache False --num_train_epochs 3 --per_device_train_batch_size 1 --gradient_accumulation_steps 4
        --gradient_checkpointing True --optimizer "adamw_torch_fused" --logging_steps 10 --save_strategy "epoch"
        --learning_rate 2e-4 --max_grad_norm 0.3 --warmup_ratio 0.03 --lr_scheduler_type "constant" --push_to_hub False
        --report_to "wandb" --lora_alpha 32 --lora_dropout 0.1 --lora_r 8 --lora_bias "none" --target_modules "query_key_value" """,
    "prefix_tuning.py (P-Tuning example)": """--dataset_name "triviaqa" --dataset_split "train" --model_id "bert-base-uncased"
        --output_dir "./trained_prefix_tuning_model" --load_in_4bit True --bnb_4bit_use_double_quant True
        --bnb_4bit_quant_type "nf4" --use_bfloat16 True --use_cache False --num_train_epochs 3 --per_device_train_batch_size 2
        --gradient_accumulation_steps 4 --gradient_checkpointing True --optimizer "adamw_torch_fused" --logging_steps 50
        --save_strategy "epoch" --learning_rate 3e-4 --max_grad_norm 0.3 --warmup_ratio 0.1 --lr_scheduler_type "linear"
        --push_to_hub False --report_to "wandb" --peft_type "PREFIX_TUNING" --task_type "CAUSAL_LM" --num_virtual_tokens 30
        --token_dim 768 --num_transformer_submodules 1 --num_attention_heads 12 --num_layers 12 --encoder_hidden_size 768""",
    "qlora.py": """--dataset_name "triviaqa" --dataset_split "train" --model_id "gpt2" --output_dir "./lora_fine_tuned_model"
        --load_in_4bit True --bnb_4bit_use_double_quant True --bnb_4bit_quant_type "nf4" --use_bfloat16 True
        --use_cache False --num_train_epochs 3 --per_device_train_batch_size 2 --gradient_accumulation_steps 4
        --gradient_checkpointing True --optimizer "adamw_torch_fused" --logging_steps 50 --save_strategy "epoch"
        --learning_rate 3e-4 --max_grad_norm 0.3 --warmup_ratio 0.1 --lr_scheduler_type "linear" --push_to_hub False
        --report_to "wandb" --lora_alpha 32 --lora_dropout 0.1 --lora_r 8 --lora_bias "none" --target_modules "query_key_value" """,
}
# The same flag set through the dedicated prompt-learning scripts.
SEED["p_tuning.py"] = SEED["prefix_tuning.py (P-Tuning example)"].replace('"PREFIX_TUNING"', '"P_TUNING"')
SEED["prompt_tuning.py"] = SEED["prefix_tuning.py (P-Tuning example)"].replace('"PREFIX_TUNING"', '"PROMPT_TUNING"')


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEED))
def test_seed_commands_run_as_written(name, request, tmp_path, monkeypatch, capsys):
    script = name.split()[0]
    argv = shlex.split(SEED[name])
    model = argv[argv.index("--model_id") + 1]
    local = {"gpt2": "tiny_gpt2", "bert-base-uncased": "gpt2_base_shaped"}.get(model, "tiny_chat_llama")
    argv[argv.index("--model_id") + 1] = request.getfixturevalue(local)
    argv[argv.index("--dataset_name") + 1] = "triviaqa-sample"
    monkeypatch.chdir(tmp_path)  # the seed writes to ./trained_model and friends
    for var in ("WANDB_DIR", "WANDB_MODE"):  # set by each run; restored after the test
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    assert run_script(script, argv + ["--max_steps", "2"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    out_dir = tmp_path / argv[argv.index("--output_dir") + 1]
    assert (out_dir / "adapter_model.safetensors").is_file()
    assert "float32" in err  # --use_bfloat16 on the CPU falls back with a warning
    assert "offline" in err and (out_dir / "wandb").is_dir()  # wandb without an account: offline, no prompt
    if script == "prefix_tuning.py":
        assert "ignores flags" in err or "P-Tuning" in name
        assert "prefix tuning cannot use it" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU behaviour")
def test_bf16_on_a_bf16_cpu_trains_under_autocast_with_float32_weights(tiny_llama, tmp_path, monkeypatch):
    from common.model import precision
    from sft.run import train

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    monkeypatch.setattr(precision, "CPU_BF16_MIN_PARAMETERS", 0)
    seen = []
    import torch.nn.functional as F

    linear = F.linear

    def spy(x, *args, **kwargs):  # the dtype the adapted layers' products run in
        out = linear(x, *args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(F, "linear", spy)
    result = train("lora", ["--model_id", tiny_llama, "--output_dir", tmp_path / "out", "--max_steps", "2",
                            "--use_bfloat16", "True", *FAST])
    import torch

    assert torch.bfloat16 in seen  # autocast ran the products in bf16
    assert all(p.dtype == torch.float32 for p in result.trainer.model.parameters())  # the weights stay float32
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["model"]["precision"] == "bf16"
