"""The two graphs we export, as modules with tensor-only signatures.

``VisionGraph``: normalised pixels ``[n, 3, H, W]`` -> visual tokens ``[n, tokens, hidden]``.
``StepGraph``: the decoder step contract of DESIGN.md at a fixed capacity; only q (and n) vary,
so an engine built from it has static shapes but one axis and constant latency. An M-RoPE
decoder (Qwen2-VL) takes positions ``[3, q]``; its dynamic-resolution tower is exported for one
frame size (``frame_size``), one frame per call.
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


def frame_size(model: LlavaModel, frame: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (height, width) of the pixels the vision graph takes: the tower's square image, or for
    a dynamic-resolution tower ``frame`` (the preprocessed size of the stream's frames)."""
    if not model.dynamic_resolution:
        return model.cfg.vision.image_size, model.cfg.vision.image_size
    if frame is None:
        raise ValueError(f"{type(model).__name__} takes frames of any size: export needs the frame size")
    return frame


def step_example(model: LlavaModel, capacity: int, q: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes and dtypes (half the cache valid), for tracing and tests."""
    text = model.cfg.text
    generator = torch.Generator().manual_seed(0)
    cache_shape = (text.num_layers, text.num_kv_heads, capacity, text.head_dim)
    dtype, device = model.dtype, model.device
    valid = torch.zeros(capacity, dtype=torch.bool)
    valid[: capacity // 2] = True
    positions = torch.arange(capacity // 2, capacity // 2 + q, device=device)
    if text.mrope_section is not None:  # three components that differ, as a frame's tokens have
        positions = positions - torch.arange(3, device=device).view(3, 1) * torch.arange(q, device=device) // 2
    return (torch.randn(q, text.hidden_size, generator=generator).to(device, dtype), positions,
            torch.randn(cache_shape, generator=generator).to(device, dtype),
            torch.randn(cache_shape, generator=generator).to(device, dtype),
            valid.to(device), torch.tensor(min(q, 2), device=device))


def vision_example(model: LlavaModel, n: int, size: tuple[int, int]) -> tuple[torch.Tensor]:
    return (torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1)).to(model.device, model.dtype),)
