"""The vision tower and projector with packed weights (``QuantizedLinear``, round to nearest).

Why: beside a 7B decoder packed to int4 (3.8 GiB), the SigLIP so400m tower and LLaVA projector
stay 0.81 GiB in bf16, a sixth of the packed model's streaming peak; int8 weights halve them. A
frame's encode is one batched pass, so each packed layer's ``forward`` dequantizes its matrix (in
pieces of whole rows) and multiplies: some extra work per frame, no kernel of its own.
Every ``nn.Linear`` outside the decoder is packed where its input width splits into groups of 32;
convolutions (patch embeddings), norms and position tables stay as they are.
"""
from __future__ import annotations

from torch import nn

from .quantized import DEFAULT_GROUPS, HEAD_MODES, QuantizedLinear, WeightMode

VISION_MODES = HEAD_MODES  # the tower's and projector's layers, as the head: in the model's dtype, or packed


def quantize_vision(model: nn.Module, mode: WeightMode) -> int:
    """Replace the linear layers of everything but ``model.decoder`` (tower, projector or
    connector) by packed ones; returns how many were replaced (0 for a text-only model)."""
    group = DEFAULT_GROUPS[mode]
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not name.startswith("decoder.")
               and module.in_features % group == 0]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_float(module.weight, module.bias, mode))
    return len(targets)
