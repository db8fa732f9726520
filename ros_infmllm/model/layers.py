"""Small building blocks shared by the vision tower and the decoder."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference implementations do."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class FusedLinear:
    """Several linears that read the same input, as one matrix: one weight pass and one kernel
    per token instead of several, which is what a memory-bound decode step pays for. The
    original modules keep their parameters as views into the fused matrix (no second copy, the
    checkpoint layout unchanged); the fused tensors are non-persistent buffers of ``owner``, so
    state dicts do not change either."""

    def __init__(self, owner: nn.Module, name: str, linears: tuple[nn.Linear, ...]) -> None:
        self.weight_name, self.bias_name = f"{name}_weight", f"{name}_bias"
        has_bias = linears[0].bias is not None
        owner.register_buffer(self.weight_name, torch.cat([m.weight.detach() for m in linears]), persistent=False)
        owner.register_buffer(self.bias_name, torch.cat([m.bias.detach() for m in linears]) if has_bias else None,
                              persistent=False)
        weight, bias = getattr(owner, self.weight_name), getattr(owner, self.bias_name)
        self.sizes = [m.out_features for m in linears]
        start = 0
        for module, size in zip(linears, self.sizes):
            module.weight = nn.Parameter(weight[start:start + size], requires_grad=False)
            if has_bias:
                module.bias = nn.Parameter(bias[start:start + size], requires_grad=False)
            start += size

    def __call__(self, owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, *self.tensors(owner)).split(self.sizes, dim=-1)

    def tensors(self, owner: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused weight and bias (None without bias)."""
        return getattr(owner, self.weight_name), getattr(owner, self.bias_name)

    def matvec_operands(self, owner: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """What the decode matrix-vector op takes: weight, bias and (for packed weights) their packing."""
        return (*self.tensors(owner), {})


class FusedRuns:
    """Layers that read the same input but do not all fuse: each run of consecutive ones that do
    is one matrix (``FusedLinear`` / ``FusedQuantizedLinear``). A llama.cpp Q4_K_M GGUF keeps
    v (and down) in Q6_K blocks and q and k in Q4_K ones: q and k
    are then one int4 matrix and v an int8 one, two weight passes per token instead of three."""

    def __init__(self, owner: nn.Module, name: str, runs: list[tuple[nn.Module, ...]]) -> None:
        self.parts = [_fused_run(owner, f"{name}{index}", run) for index, run in enumerate(runs)]
        self.sizes = [size for part in self.parts for size in part.sizes]

    def __call__(self, owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y for part in self.parts for y in part(owner, x))


def fusion_key(layer: nn.Module) -> tuple:
    """What layers must share to be one matrix: float or their packing (width, group, offsets),
    and whether they have a bias."""
    from .quantized import QuantizedLinear

    packing = (layer.bits, layer.group, layer.offsets is None) if isinstance(layer, QuantizedLinear) else ("float",)
    return packing + (layer.bias is None,)


def _fused_run(owner: nn.Module, name: str, linears: tuple[nn.Module, ...]):
    from .quantized import FusedQuantizedLinear, QuantizedLinear

    return (FusedQuantizedLinear if isinstance(linears[0], QuantizedLinear) else FusedLinear)(owner, name, linears)


def fuse_linears(owner: nn.Module, name: str, linears: tuple[nn.Module, ...]):
    """``FusedLinear`` for float layers, ``FusedQuantizedLinear`` for packed ones alike
    (model/quantized.py), ``FusedRuns`` where they differ (float beside packed, or two packings)."""
    from .quantized import QuantizedLinear

    if not all(isinstance(m, (nn.Linear, QuantizedLinear)) for m in linears):
        return None  # e.g. a packed base plus LoRA factors (packed_lora.py): each runs on its own
    runs: list[tuple[nn.Module, ...]] = []
    for layer in linears:
        if runs and fusion_key(runs[-1][0]) == fusion_key(layer):
            runs[-1] += (layer,)
        else:
            runs.append((layer,))
    return _fused_run(owner, name, runs[0]) if len(runs) == 1 else FusedRuns(owner, name, runs)
