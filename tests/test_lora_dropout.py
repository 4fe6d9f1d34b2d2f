"""LoRA input dropout (common/model/dropout.py) against plain references: the masks adapters see, the
loss and gradients against the same masks applied with ordinary tensor ops, checkpointed against
plain backward passes, the keep rate and scale of the masks, and the scripts' flag."""

import pytest
import torch

from common.model.dropout import LoraInputDropout, drop, effective_p, share_lora_dropout
from tests.helpers import peft_llama

P = 0.3  # large, so that masks differ visibly
ATTENTION = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _peft_llama(model_dir, use_dora=False, dtype=torch.float32):
    return peft_llama(model_dir, dtype=dtype, lora_dropout=P, use_dora=use_dora).train()


def _batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _lora_inputs(model):
    """Records, per adapted layer, what its lora_A received (its dropped-out input) and what the layer
    itself received."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            short = name[name.index("layers."):]
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, short=short: seen.setdefault(short, {}).__setitem__("x", args[0])))
            hooks.append(module.lora_A["default"].register_forward_pre_hook(
                lambda m, args, short=short: seen.setdefault(short, {}).__setitem__("dropped", args[0])))
    return seen, hooks


def _close(got, expected, tolerance=1e-5):
    """Equal up to float rounding: each element within `tolerance` of the tensor's largest magnitude
    (the order of additions differs, e.g. where three adapters' gradients meet in one shared input)."""
    return torch.allclose(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def _layer(seen, index, name):
    owner = "self_attn" if name in ATTENTION + ("o_proj",) else "mlp"
    return seen[f"layers.{index}.{owner}.{name}"]["dropped"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: PEFT casts each layer's input to float32
@pytest.mark.parametrize("shared", [True, False])
def test_adapters_reading_one_tensor_share_its_mask(shared, dtype, tiny_llama):
    model = _peft_llama(tiny_llama, dtype=dtype)
    assert share_lora_dropout(model, shared=shared) == 7 * model.config.num_hidden_layers
    seen, hooks = _lora_inputs(model)
    torch.manual_seed(5)
    model(**_batch(model.config.vocab_size))
    for hook in hooks:
        hook.remove()
    for layer in range(model.config.num_hidden_layers):
        for group in (ATTENTION, GATE_UP):
            first = _layer(seen, layer, group[0])
            for other in group[1:]:
                assert torch.equal(_layer(seen, layer, other), first) == shared
        # different tensors never share a mask
        masks = [_layer(seen, layer, name) != 0 for name in ("q_proj", "gate_proj")]
        assert not torch.equal(*masks)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("use_dora,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_loss_and_grads_equal_the_same_masks_applied_by_hand(shared, use_dora, dtype, tiny_llama, monkeypatch):
    """The reference: PEFT's model with each layer's dropout replaced by `x * keep / (1 - p)` in plain
    tensor ops, one multiplication per layer, with the keep masks this run drew."""
    from common.model import dropout as module

    drawn = {}  # id of each dropped-out tensor -> the mask that made it
    apply = module._KeepMask.apply

    def recording(x, keep, scale):
        out = apply(x, keep, scale)
        drawn[id(out)] = keep
        return out

    monkeypatch.setattr(module._KeepMask, "apply", recording)
    model = _peft_llama(tiny_llama, use_dora=use_dora, dtype=dtype)
    reference = _peft_llama(tiny_llama, use_dora=use_dora, dtype=dtype)
    reference.load_state_dict(model.state_dict())
    share_lora_dropout(model, shared=shared)
    seen, hooks = _lora_inputs(model)
    batch = _batch(model.config.vocab_size)
    torch.manual_seed(5)
    loss = model(**batch).loss
    loss.backward()
    for hook in hooks:
        hook.remove()

    class ByHand(torch.nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def forward(self, x):
            return x * (self.keep.to(x.dtype) / (1 - effective_p(P)))  # as F.dropout: 0 or 1 / (1 - p)

    for name, layer in reference.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            layer.lora_dropout["default"] = ByHand(drawn[id(seen[name[name.index("layers."):]]["dropped"])])
    expected = reference(**batch).loss
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # On a bf16 model, the three adapters' float32 gradients for one input are summed before one cast
    # back to bf16 when they share the dropped-out tensor, and each is rounded to bf16 first by hand.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, param in reference.named_parameters():
        if param.requires_grad:
            assert _close(grads[name], param.grad, tolerance), name


def test_checkpointed_run_draws_the_masks_of_the_plain_run(tiny_llama):
    """Gradient checkpointing recomputes each layer in the backward pass: it must see the masks of the
    forward pass, so the gradients equal those of a run without checkpointing."""
    results = []
    for checkpointing in (False, True):
        model = _peft_llama(tiny_llama)
        share_lora_dropout(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(5)
        loss = model(**_batch(model.config.vocab_size)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        del loss
        dropouts = [m for m in model.modules() if isinstance(m, LoraInputDropout)]
        # no tensor outlives the step through them (a checkpoint's recomputation may stop before the
        # owner's forward ends, leaving weak references and a generator state)
        assert dropouts and all(m._last is None or (m._last[0]() is None and m._last[3]() is None)
                                for m in dropouts)
    (plain_loss, plain), (ckpt_loss, ckpt) = results
    assert torch.allclose(plain_loss, ckpt_loss, rtol=1e-6, atol=0)
    for name, grad in plain.items():
        assert _close(grad, ckpt[name]), name


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_mask_keeps_one_minus_p_and_scales_by_its_inverse(p):
    assert abs(effective_p(p) - p) <= 0.5 / 65536
    torch.manual_seed(0)
    x = torch.ones(1_000_003, requires_grad=True)  # not a multiple of 4: the last draw is shared by fewer
    out = drop(x, p)
    keep = out != 0
    n = x.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # every fourth element comes from one of the four 16-bit lanes of a draw: each lane alone keeps 1 - p
    for lane in range(4):
        assert abs(keep[lane::4].float().mean().item() - (1 - p)) < 5 * sigma * 2
    scale = torch.tensor(1 / (1 - effective_p(p)), dtype=torch.float32)
    assert torch.all(out[keep] == scale)
    assert abs(out.mean().item() - 1.0) < 5 * sigma / (1 - p)  # unbiased: E[dropout(x)] = x
    grad = torch.randn(n)
    out.backward(grad)
    assert torch.equal(x.grad, grad * keep * scale)


def test_dropout_switched_off_by_p_zero_and_in_eval(tiny_llama):
    from rlhf.policy_model import disable_dropout

    model = _peft_llama(tiny_llama)
    share_lora_dropout(model)
    batch = _batch(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.train()
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, LoraInputDropout))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("flag", ["True", "False"])
def test_lora_script_shares_masks_unless_told_not_to(flag, tiny_llama, sample, tmp_path):
    from sft.run import train

    run = train("lora", ["--model_id", tiny_llama, "--dataset_name", sample, "--max_train_samples", "8",
                         "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no",
                         "--report_to", "none", "--lora_r", "4", "--output_dir", str(tmp_path / "run"),
                         "--share_lora_dropout", flag])
    attention = run.trainer.model.get_base_model().model.layers[0].self_attn
    dropouts = [getattr(attention, name).lora_dropout["default"] for name in ATTENTION]
    assert all(isinstance(d, LoraInputDropout) for d in dropouts)
    assert (dropouts[0] is dropouts[1] is dropouts[2]) == (flag == "True")


def test_inference_mode_pickling_and_p_near_one(tiny_llama):
    import pickle

    model = _peft_llama(tiny_llama)
    share_lora_dropout(model)
    batch = _batch(model.config.vocab_size)
    with torch.inference_mode():  # train mode, no version counters: masks are drawn, not shared
        model(input_ids=batch["input_ids"])
    dropout = next(m for m in model.modules() if isinstance(m, LoraInputDropout))
    dropout._last = (lambda: None, 0, None, lambda: None, True)  # as a checkpoint's early stop may leave it
    assert pickle.loads(pickle.dumps(dropout))._last is None
    near_one = LoraInputDropout(1 - 1e-6).train()  # rounds to 1: all dropped, as nn.Dropout(1.0)
    assert torch.equal(near_one(torch.ones(5)), torch.zeros(5))


def test_peft_impl_keeps_pefts_dropout_per_layer(tiny_llama, sample, tmp_path):
    """`--lora_dropout_impl peft`, the way back to the library's path: every adapted layer keeps the
    nn.Dropout PEFT gave it, each drawing its own masks (ours shares one between q, k and v: the
    test above)."""
    from sft.run import train

    run = train("lora", ["--model_id", tiny_llama, "--dataset_name", sample, "--max_train_samples", "8",
                         "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no",
                         "--report_to", "none", "--lora_r", "4", "--output_dir", str(tmp_path / "run"),
                         "--lora_dropout_impl", "peft"])
    model = run.trainer.model
    assert not any(isinstance(m, LoraInputDropout) for m in model.modules())
    attention = model.get_base_model().model.layers[0].self_attn
    dropouts = [getattr(attention, name).lora_dropout["default"] for name in ATTENTION]
    assert all(type(d) is torch.nn.Dropout and d.p == 0.05 for d in dropouts)
    assert len({id(d) for d in dropouts}) == len(dropouts)
