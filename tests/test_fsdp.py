"""QLoRA under FSDP, checked on the CPU the way FSDP itself would refuse it: the project's model and
adapter, wrapped by torch's FSDP on a one-process gloo group with the auto-wrap policy the Trainer
uses for PEFT models. FSDP flattens each wrapped unit's parameters into one tensor and refuses mixed
dtypes. Training under FSDP on GPUs is what bench/gpu_check.sh runs."""

import pytest
import torch

from common.model.precision import Precision
from common.model.loading import load_model
from common.model.source import resolve_model
from common.model.adapters import attach_adapter
from sft.run import make_parser

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 2]])


@pytest.fixture
def gloo_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with fsdp.yaml sets
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_llama, tmp_path_factory):
    """The tiny model saved in bfloat16, as most hub checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-llama-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return str(out)


def _qlora(model_id: str, mode: str, *flags):
    args = make_parser("qlora").parse(["--model_id", model_id, *flags])
    source = resolve_model(model_id)
    model = load_model(source, args, Precision(mode), training=True)
    torch.manual_seed(0)  # the same initial adapter for every load
    return attach_adapter("qlora", args, model, source)


@pytest.mark.parametrize("checkpoint,mode,flags,storage,compute", [
    ("float32", "bf16", [], torch.bfloat16, torch.bfloat16),  # `--use_bfloat16 True` on a GPU
    ("float32", "fp32", ["--bnb_4bit_compute_dtype", "bfloat16"], torch.float32, torch.bfloat16),
    ("float32", "bf16", ["--bnb_4bit_compute_dtype", "float32"], torch.bfloat16, torch.float32),
    ("bfloat16", "fp32", [], torch.float32, torch.float32),  # fp32 training of a bf16 checkpoint
])
def test_qlora_under_fsdp_flattens_every_parameter_in_the_storage_dtype(checkpoint, mode, flags, storage, compute,
                                                                        tiny_llama, bf16_checkpoint, gloo_group):
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model_id = tiny_llama if checkpoint == "float32" else bf16_checkpoint
    model = _qlora(model_id, mode, *flags)
    quant = model.hf_quantizer.quantization_config
    assert (quant.bnb_4bit_quant_storage, quant.bnb_4bit_compute_dtype) == (storage, compute)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}  # base frozen, adapter trainable

    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                   device_id=torch.device("cpu"))
    units = [m for m in FSDP.fsdp_modules(wrapped) if m._has_params]
    assert len(units) > 3  # decoder layers and LoRA layers were wrapped as units of their own
    assert {unit._flat_param.dtype for unit in units} == {storage}

    # The wrapped model computes what the same model computes unwrapped (loaded again: on the CPU,
    # bitsandbytes repacks 4-bit weights at their first use), and its adapter receives gradients.
    with torch.no_grad():
        logits = wrapped.eval()(input_ids=IDS).logits
        unwrapped = _qlora(model_id, mode, *flags).eval()(input_ids=IDS).logits
    torch.testing.assert_close(logits, unwrapped)
    wrapped.train()(input_ids=IDS, labels=IDS).loss.backward()
    trainable = [u._flat_param for u in units if u._flat_param.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)  # lora_B's (lora_A's are 0 while lora_B is 0)
