"""LoRA input dropout: one mask for the adapters that read the same tensor, drawn fast on the CPU.

PEFT gives every adapted linear layer its own `nn.Dropout`. In a Llama block q, k and v read one
tensor and gate and up another, so a step draws seven masks where three inputs exist, keeps a
float copy of each for the backward pass, and multiplies each input out three times. Models with a
fused qkv layer (GPT-2's `c_attn`, Phi-3's `qkv_proj`) already share one mask under PEFT; sharing
does the same for the unfused layout. Each adapter still sees its input dropped with probability
`p` and scaled by 1 / (1 - p); only the masks of adapters reading one tensor are the same.

The mask takes 16 random bits per element, so `p` is applied to the nearest 1/65,536 (0.05 becomes
0.0500031, and kept inputs are scaled by 1 / (1 - that)). On the CPU this draws masks 3.4-4 times
as fast as the `bernoulli_` that `F.dropout` uses there. The mask is kept for the backward
pass as one byte per element instead of a float per element.
"""

from __future__ import annotations

import math
import weakref

import torch


class _KeepMask(torch.autograd.Function):
    """x * keep * scale, with only the boolean mask saved for the backward pass."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def _generator(device: torch.device):
    """The default random generator of `device`, whose state can be saved and replayed; None where
    there is none to replay (the layer then falls back to `F.dropout`, unshared)."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


def _steps(p: float) -> int:
    """p in 1/65,536ths, the resolution of the masks."""
    return round(p * 65536)


def effective_p(p: float) -> float:
    """The dropout probability the masks apply: `p` to the nearest 1/65,536 (0.05 -> 0.0500031)."""
    return _steps(p) / 65536


def _keep(shape, device, p: float, generator) -> torch.Tensor:
    """Keep each element with probability 1 - effective_p(p): 16 random bits per element, four to a
    64-bit draw (a float draw per element costs twice as much on the CPU)."""
    n = math.prod(shape)
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device, generator=generator)
    return words.view(torch.int16)[:n].view(shape) >= _steps(p) - 32768


def _scale(p: float) -> float:
    return 1.0 / (1.0 - effective_p(p))


def drop(x: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """x with a mask drawn from `generator` (default: the device's default generator) applied."""
    return _KeepMask.apply(x, _keep(x.shape, x.device, p, generator), _scale(p))


class LoraInputDropout(torch.nn.Dropout):
    """`nn.Dropout` that applies the same mask to repeated calls on the same tensor within one forward
    of its owner module (the attention or MLP block holding the adapted layers).

    "The same tensor" is the adapted layer's own input, which each layer reports through a forward
    pre-hook: PEFT casts that input to the adapter's dtype (a bf16 model with float32 adapters) into a
    new tensor per layer, and the copies of one input hold the same values. The first call saves the
    random generator's state before drawing. A repeated call returns the first output while it is
    alive and otherwise draws the same mask again from the saved state, so the numbers never depend on
    when a tensor is freed; the generator moves on once per input either way. Gradient checkpointing,
    which restores the random state before it recomputes a block, thus sees the masks of the first
    forward. Only weak references and the generator state are kept, and they are dropped when the
    owner's forward starts and ends. A subclass of `nn.Dropout`, so anything that switches dropout off
    by setting `p = 0` (TRL's `disable_dropout_in_model`, ours) still does."""

    def __init__(self, p: float):
        super().__init__(p)
        self._last = None  # (layer input, its version, generator state, output, grad mode), tensors as weakrefs
        self._input = None  # weakref to the input of the adapted layer being run

    def clear(self, *_args, **_kwargs) -> None:
        self._last = None
        self._input = None

    def note_input(self, _module, args) -> None:
        """Forward pre-hook of each adapted layer using this dropout: its input is the sharing key."""
        x = args[0] if args else None
        self._input = weakref.ref(x) if isinstance(x, torch.Tensor) else None

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_last"] = state["_input"] = None  # weak references do not pickle
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source, self._input = (self._input() if self._input is not None else None), None
        if not self.training or self.p == 0.0:
            return x
        if _steps(self.p) >= 65536:  # p rounds to 1: everything is dropped, as nn.Dropout(1.0) does
            return x.mul(0.0)
        generator = _generator(x.device)
        if generator is None:
            return torch.nn.functional.dropout(x, self.p, True)
        key = source if source is not None and source.shape == x.shape else x
        if key.is_inference():  # no version counter to tell whether it changed: no sharing
            return drop(x, self.p, generator)
        grad = torch.is_grad_enabled()
        last = self._last
        if last is not None and last[0]() is key and last[1] == key._version:
            out = last[3]()
            if out is not None and last[4] == grad and out.dtype == x.dtype:
                return out
            replay = torch.Generator(device=x.device)
            replay.set_state(last[2])
            out = drop(x, self.p, replay)
            self._last = (*last[:3], weakref.ref(out), grad)
            return out
        state = generator.get_state()
        out = drop(x, self.p, generator)
        self._last = (weakref.ref(key), key._version, state, weakref.ref(out), grad)
        return out


def share_lora_dropout(model, shared: bool = True) -> int:
    """Replaces the `nn.Dropout` of every LoRA layer in `model` by a `LoraInputDropout`: one per
    owner module, adapter and probability when `shared` (adapters reading the same tensor then share
    a mask), else one per layer (PEFT's per-layer masks, drawn the faster way). Returns how many
    dropout modules were replaced."""
    owners: dict[str, torch.nn.Module] = dict(model.named_modules())
    made: dict[tuple, LoraInputDropout] = {}
    replaced = 0
    for name, module in list(owners.items()):
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        owner = owners[owner_name]
        for adapter, old in list(dropouts.items()):
            if type(old) is not torch.nn.Dropout or old.p == 0.0:
                continue
            key = (owner_name if shared else name, adapter, old.p)
            new = made.get(key)
            if new is None:
                new = made[key] = LoraInputDropout(old.p)
                new.train(old.training)
                hooked = owner if shared else module
                hooked.register_forward_pre_hook(new.clear)
                hooked.register_forward_hook(new.clear)
            module.register_forward_pre_hook(new.note_input)
            dropouts[adapter] = new
            replaced += 1
    return replaced
