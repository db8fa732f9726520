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


def fuse_linears(owner: nn.Module, name: str, linears: tuple[nn.Module, ...]):
    """``FusedLinear`` for float layers, ``FusedQuantizedLinear`` for packed ones (model/quantized.py)."""
    from .quantized import FusedQuantizedLinear, QuantizedLinear

    if not all(isinstance(m, (nn.Linear, QuantizedLinear)) for m in linears):
        return None  # e.g. a packed base plus LoRA factors (packed_lora.py): each runs on its own
    if all(isinstance(m, QuantizedLinear) for m in linears):
        return FusedQuantizedLinear(owner, name, linears)
    if any(isinstance(m, QuantizedLinear) for m in linears):
        raise ValueError(f"{name}: cannot fuse packed and float layers")
    return FusedLinear(owner, name, linears)
