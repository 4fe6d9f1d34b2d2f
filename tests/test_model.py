"""Model loading and the pure builders: model source, precision, quantization, PEFT configs."""

import json

import pytest
import torch

from common.flags.errors import UsageError
from common.model import precision
from common.model.precision import Precision, get_quantization_config, select_precision
from common.model.loading import ensure_pad_token
from common.model.source import resolve_model
from common.model.adapters import build_peft_config, linear_module_names, model_dims, resolve_target_modules
from sft.run import make_parser


def _args(*argv, technique="lora"):
    return make_parser(technique).parse(["--model_id", "m", *argv])


def test_model_source_kinds(tmp_path, tiny_llama):
    assert resolve_model("gpt2").base == "gpt2" and resolve_model("meta-llama/Llama-3.1-8B").adapter_dir is None
    assert resolve_model(tiny_llama).base == tiny_llama
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_llama,
                                                             "peft_type": "LORA"}))
    with pytest.raises(UsageError, match="no adapter_model.safetensors"):
        resolve_model(str(adapter))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(adapter / "adapter_model.safetensors"))
    src = resolve_model(str(adapter))
    assert (src.base, src.adapter_dir, src.adapter_type) == (tiny_llama, str(adapter), "LORA")


@pytest.mark.parametrize("make,match", [
    (lambda p: str(p / "missing"), "no such directory"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "neither a model"),
])
def test_bad_model_paths(tmp_path, make, match):
    with pytest.raises(UsageError, match=match):
        resolve_model(make(tmp_path))


def test_adapter_whose_base_moved(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/model"}))
    with pytest.raises(UsageError, match="not there any more"):
        resolve_model(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_bf16_on_cpu_falls_back_to_fp32_with_one_warning(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    warnings = []
    assert select_precision(_args("--use_bfloat16", "True"), warn=warnings.append).mode == "fp32"
    assert len(warnings) == 1 and "float32" in warnings[0]
    assert select_precision(_args()).mode == "fp32"


def _config_dir(path, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


LLAMA_80M = dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 tie_word_embeddings=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_bf16_on_a_bf16_cpu_autocasts_large_models_only(monkeypatch, tmp_path, tiny_llama):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    large = _config_dir(tmp_path / "large", **LLAMA_80M)
    warnings = []
    chosen = select_precision(_args("--use_bfloat16", "True", "--model_id", large), warn=warnings.append)
    assert (chosen.mode, chosen.cpu_autocast, chosen.torch_dtype, warnings) == ("bf16", True, torch.float32, [])
    chosen = select_precision(_args("--use_bfloat16", "True", "--model_id", tiny_llama), warn=warnings.append)
    assert chosen.mode == "fp32" and len(warnings) == 1 and "parameters" in warnings[0]
    assert select_precision(_args("--model_id", large)).mode == "fp32"  # only when asked for


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_bf16_on_a_cpu_without_bf16_instructions_stays_fp32_for_any_size(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    large = _config_dir(tmp_path / "large", **LLAMA_80M)
    warnings = []
    assert select_precision(_args("--use_bfloat16", "True", "--model_id", large), warn=warnings.append).mode == "fp32"
    assert len(warnings) == 1 and "AVX512-BF16" in warnings[0]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_parameter_estimate_is_within_10_percent_of_the_models_own_count(fixture, request):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    assert precision.estimate_parameters(path) == pytest.approx(real, rel=0.10)


def test_cpu_bf16_flags_read_from_cpuinfo(monkeypatch, tmp_path):
    import builtins

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
    assert precision.cpu_bf16_flags() == ["amx_bf16", "avx512_bf16"]


def test_bf16_falls_back_to_fp16_on_gpus_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    warnings = []
    assert select_precision(_args("--use_bfloat16", "True"), warn=warnings.append).mode == "fp16"
    assert "T4" in warnings[0]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert select_precision(_args("--use_bfloat16", "True")).mode == "bf16"


def test_quantization_config_builder():
    assert get_quantization_config(_args(), Precision("fp32")) is None
    q = get_quantization_config(_args("--load_in_4bit", "True", "--bnb_4bit_quant_type", "fp4",
                                      "--bnb_4bit_use_double_quant", "False"), Precision("bf16"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    q = get_quantization_config(_args("--load_in_4bit", "True", "--bnb_4bit_compute_dtype", "float16"),
                                Precision("fp32"))
    assert q.bnb_4bit_compute_dtype == torch.float16
    assert get_quantization_config(_args("--load_in_8bit", "True"), Precision("fp32")).load_in_8bit


def test_pad_token_is_not_eos_when_the_vocabulary_allows(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ensure_pad_token(tok)
    assert tok.pad_token == "<unk>" and tok.pad_token_id != tok.eos_token_id


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_gpt2)


def test_target_module_translation(llama, gpt2):
    warnings = []
    assert resolve_target_modules(gpt2, "query_key_value", warn=warnings.append) == ["c_attn"]
    assert resolve_target_modules(gpt2, "q_proj,v_proj", warn=warnings.append) == ["c_attn"]
    assert resolve_target_modules(llama, "query_key_value", warn=warnings.append) == ["q_proj", "k_proj", "v_proj"]
    assert resolve_target_modules(llama, "c_attn,o_proj", warn=warnings.append) == ["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"]
    assert all("instead" in w for w in warnings) and len(warnings) == 4
    assert resolve_target_modules(llama, "q_proj,v_proj") == ["q_proj", "v_proj"]
    assert resolve_target_modules(llama, "all-linear") == "all-linear"
    assert linear_module_names(gpt2) == ["c_attn", "c_fc", "c_proj"]


def test_peft_configs_per_technique(llama, tiny_llama):
    import peft

    lora = build_peft_config("lora", _args("--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1"), llama)
    assert isinstance(lora, peft.LoraConfig) and (lora.r, lora.lora_alpha, lora.use_dora) == (4, 8, False)
    assert lora.target_modules == "all-linear"
    dora = build_peft_config("dora", _args(technique="dora"), llama)
    assert dora.use_dora
    offload = build_peft_config("dora", _args("--dora_ephemeral_gpu_offload", "True", technique="dora"), llama)
    assert offload.runtime_config.ephemeral_gpu_offload is True
    prefix = build_peft_config("prefix_tuning", _args("--num_virtual_tokens", "7", "--prefix_projection", "True",
                                                      "--encoder_hidden_size", "32"), llama)
    assert isinstance(prefix, peft.PrefixTuningConfig)
    assert (prefix.num_virtual_tokens, prefix.prefix_projection, prefix.encoder_hidden_size) == (7, True, 32)
    assert (prefix.token_dim, prefix.num_layers, prefix.num_attention_heads) == (64, 2, 4)
    ptune = build_peft_config("p_tuning", _args("--encoder_reparameterization_type", "LSTM"), llama)
    assert isinstance(ptune, peft.PromptEncoderConfig) and ptune.encoder_reparameterization_type == "LSTM"
    prompt = build_peft_config("prompt_tuning", _args(), llama, tokenizer_path=tiny_llama)
    assert isinstance(prompt, peft.PromptTuningConfig) and prompt.prompt_tuning_init == "TEXT"
    assert "trivia" in prompt.prompt_tuning_init_text.lower()


def test_model_dims_and_contradictions(llama, gpt2):
    assert model_dims(gpt2) == {"token_dim": 64, "num_layers": 2, "num_attention_heads": 4,
                                "num_transformer_submodules": 1}
    build_peft_config("prefix_tuning", _args("--token_dim", "64", "--num_layers", "2"), llama)  # agreeing: fine
    with pytest.raises(UsageError, match=r"`--num_layers 12` contradicts the model, which has num_layers=2"):
        build_peft_config("p_tuning", _args("--num_layers", "12"), llama)
