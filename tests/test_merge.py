"""merge.py on a QLoRA adapter merges into the dequantized 4-bit weights the adapter was trained
against; checked against a dequantize-then-merge reference built here by hand."""

import json

import pytest
import torch

from tests.helpers import run_script

QUESTIONS = 12  # held-out (validation) questions


def _greedy(model, ids, steps=6):
    """Plain greedy decoding, no KV cache: one full forward pass per new token."""
    out = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=out).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def qlora_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "qlora"
    assert run_script("qlora.py", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "8",
                                   "--dataset_name", "triviaqa-sample", "--max_train_samples", "64",
                                   "--per_device_train_batch_size", "8", "--learning_rate", "2e-2",
                                   "--lora_dropout", "0", "--save_strategy", "no", "--report_to", "none"]) == 0
    return out


def test_qlora_merge_equals_dequantize_then_merge_reference(qlora_run, tiny_llama, tmp_path, capsys):
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from common.data.prompts import PromptFormat, generation_prompt
    from common.data.qa import load_qa_data
    from sft.run import make_parser

    merged_dir = tmp_path / "merged"
    assert run_script("merge.py", ["--adapter", qlora_run, "--output_dir", merged_dir]) == 0
    note = capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()

    # The model the adapter was trained as: the 4-bit base (the run's own settings) plus the adapter.
    flags = json.loads((qlora_run / "run_config.json").read_text())["flags"]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=flags["bnb_4bit_quant_type"],
                               bnb_4bit_use_double_quant=flags["bnb_4bit_use_double_quant"],
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    four_bit = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=quant, dtype=torch.float32,
                                                    device_map={"": "cpu"})
    dequantized = {name + ".weight": bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                   for name, m in four_bit.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert dequantized
    adapter = PeftModel.from_pretrained(four_bit, qlora_run).eval()

    # Reference: W_deq + (alpha / r) * B @ A, written into a plain fp32 copy of the base.
    cfg = json.loads((qlora_run / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = {k.removeprefix("base_model.model."): v.float()
            for k, v in load_file(str(qlora_run / "adapter_model.safetensors")).items()}
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    state = reference.state_dict()
    merged_layers = 0
    for key, weight in dequantized.items():
        module = key.removesuffix(".weight")
        a, b = lora.get(module + ".lora_A.weight"), lora.get(module + ".lora_B.weight")
        state[key] = weight + (scale * b @ a if a is not None else 0)
        merged_layers += a is not None
    assert merged_layers > 0 and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    reference.load_state_dict(state)

    tokenizer = AutoTokenizer.from_pretrained(qlora_run)
    args = make_parser("lora").parse(["--model_id", "m", "--dataset_name", "triviaqa-sample",
                                      "--dataset_split", "validation", "--max_train_samples", str(QUESTIONS)])
    questions = load_qa_data(args, need_eval=False).train["question"]
    worst_merged = worst_reference = 0.0
    agree = agree_reference = 0
    for q in questions:
        ids = tokenizer(generation_prompt(q, PromptFormat(), tokenizer), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            truth = adapter(input_ids=ids).logits
            worst_merged = max(worst_merged, (merged(input_ids=ids).logits - truth).abs().max().item())
            worst_reference = max(worst_reference, (reference(input_ids=ids).logits - truth).abs().max().item())
        answer = _greedy(adapter, ids)
        agree += _greedy(merged, ids) == answer
        agree_reference += _greedy(reference, ids) == answer
    # The reference shows how close plain weights can come to the 4-bit model (the 4-bit kernels round
    # differently from one CPU to another); the merged model must come as close.
    assert worst_merged <= 2 * worst_reference + 1e-4, (worst_merged, worst_reference)
    print(f"max logit difference to the 4-bit adapter model: merged {worst_merged:.3g}, reference "
          f"{worst_reference:.3g}; greedy agreement merged {agree}/{len(questions)}, reference "
          f"{agree_reference}/{len(questions)}")
    assert agree >= agree_reference >= len(questions) - 1, (agree, agree_reference)
    assert "dequantized" in note
