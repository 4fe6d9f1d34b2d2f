"""What only a CUDA GPU can show: 4-bit layers on the GPU, bf16 training, and the T4 path (no
bf16: fp16 mixed precision with fp32 adapter weights). Marked `gpu`; conftest skips them on
machines without CUDA. Run them with `python -m pytest -m gpu tests/test_gpu.py`."""

import json

import pytest
import torch

from tests.test_sft import FAST as SFT_FAST

FAST = [*SFT_FAST, "--learning_rate", "1e-2"]

pytestmark = pytest.mark.gpu


def _loss_falls(out) -> None:
    logged = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert logged[-1] < logged[0], logged


def test_qlora_on_cuda_trains_4bit_layers_in_bf16(tiny_llama, tmp_path):
    from sft.run import train

    out = tmp_path / "q"
    result = train("qlora", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "16", *FAST])
    model = result.trainer.model
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    assert result.trainer.args.bf16 == torch.cuda.is_bf16_supported()
    _loss_falls(out)


def test_t4_path_fp16_with_fp32_adapter_weights(tiny_llama, tmp_path, monkeypatch):
    """A T4 has no bf16: the run falls back to fp16 mixed precision and keeps trainable weights in fp32."""
    from sft.run import train

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    out = tmp_path / "t4"
    result = train("qlora", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "16", *FAST])
    assert result.trainer.args.fp16 and not result.trainer.args.bf16
    trainable = [p for p in result.trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    _loss_falls(out)


def test_lora_bf16_on_cuda(tiny_llama, tmp_path):
    from sft.run import train

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    out = tmp_path / "bf16"
    result = train("lora", ["--model_id", tiny_llama, "--output_dir", out, "--max_steps", "16",
                            "--use_bfloat16", "True", *FAST])
    assert result.trainer.args.bf16 and next(result.trainer.model.parameters()).device.type == "cuda"
    _loss_falls(out)


def test_cuda_lora_dropout_masks_keep_rate_replay_and_checkpointing(tiny_llama):
    """common/model/dropout.py on CUDA: masks keep 1 - p, a replayed draw equals the first, and checkpointed
    gradients equal plain ones (the recomputation sees the first forward's masks)."""
    from common.model.dropout import LoraInputDropout, effective_p, share_lora_dropout
    from tests.test_lora_dropout import _batch, _close, _peft_llama

    torch.manual_seed(0)
    x = torch.ones(1_000_003, device="cuda")
    dropout = LoraInputDropout(0.05).train()
    out = dropout(x)
    keep = out != 0
    assert abs(keep.float().mean().item() - 0.95) < 5 * (0.05 * 0.95 / x.numel()) ** 0.5
    assert torch.all(out[keep] == torch.tensor(1 / (1 - effective_p(0.05)), device="cuda"))
    del out  # the same input again, its first output freed: the same mask, drawn again from the saved state
    assert torch.equal(dropout(x) != 0, keep)

    results = []
    for checkpointing in (False, True):
        model = _peft_llama(tiny_llama).cuda()
        share_lora_dropout(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(5)
        batch = {k: v.cuda() for k, v in _batch(model.config.vocab_size).items()}
        model(**batch).loss.backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in results[0].items():
        assert _close(grad, results[1][name]), name
