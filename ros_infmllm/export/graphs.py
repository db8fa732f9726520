"""The two graphs we export, as modules with tensor-only signatures.

``VisionGraph``: normalised pixels ``[n, 3, H, W]`` -> visual tokens ``[n, tokens, hidden]``.
``StepGraph``: the decoder step contract of DESIGN.md at a fixed capacity; only q (and n) vary,
so an engine built from it has static shapes but one axis and constant latency.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.llava import LlavaModel

STEP_INPUTS = ("embeds", "positions", "cache_k", "cache_v", "valid", "attn_window")
STEP_OUTPUTS = ("logits", "new_k", "new_v", "attn_mass")
VISION_INPUTS = ("pixel_values",)
VISION_OUTPUTS = ("image_features",)


class VisionGraph(nn.Module):
    """Vision tower + feature selection + projector."""

    def __init__(self, model: LlavaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class StepGraph(nn.Module):
    """One decoder step. ``attn_window`` is a 0-d int64 tensor, so the same graph serves every
    policy (0 gives zeros); logits are the last position's only, all a session needs to decode."""

    def __init__(self, model: LlavaModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                valid: torch.Tensor, attn_window: torch.Tensor):
        out = self.decoder.step(embeds, cache_k, cache_v, valid, positions, attn_window, all_logits=False)
        return out.logits, out.new_k, out.new_v, out.attn_mass


def step_example(model: LlavaModel, capacity: int, q: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes and dtypes (half the cache valid), for tracing and tests."""
    text = model.cfg.text
    generator = torch.Generator().manual_seed(0)
    cache_shape = (text.num_layers, text.num_kv_heads, capacity, text.head_dim)
    dtype, device = model.dtype, model.device
    valid = torch.zeros(capacity, dtype=torch.bool)
    valid[: capacity // 2] = True
    return (torch.randn(q, text.hidden_size, generator=generator).to(device, dtype),
            torch.arange(capacity // 2, capacity // 2 + q, device=device),
            torch.randn(cache_shape, generator=generator).to(device, dtype),
            torch.randn(cache_shape, generator=generator).to(device, dtype),
            valid.to(device), torch.tensor(min(q, 2), device=device))


def vision_example(model: LlavaModel, n: int) -> tuple[torch.Tensor]:
    size = model.cfg.vision.image_size
    return (torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(model.device, model.dtype),)
