"""Rotary position embedding (RoPE) math shared by the decoder and the KV cache.

The cache stores keys already rotated. When compaction moves a kept token from slot i to slot j,
its key is rotated once more by (j - i): RoPE rotations compose, R(a) R(b) = R(a + b), so the
result equals a key rotated at its new position from scratch and nothing is recomputed.
"""
from __future__ import annotations

import torch


class Rotary:
    """Rotation tables for one head size and base (``rope_theta``), in the `rotate_half` layout
    used by LLaMA/Qwen2/Mistral checkpoints in Hugging Face format."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu") -> None:
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = (1.0 / self.theta ** exponents).to(device)

    def to(self, device: torch.device | str) -> "Rotary":
        self.inv_freq = self.inv_freq.to(device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape ``positions.shape + (head_dim,)``; angles computed in float32."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x[..., head_dim]`` by precomputed cos/sin broadcastable to it."""
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated_half * sin

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x[..., n, head_dim]`` by ``positions[..., n]`` (may be negative: a shift back)."""
        cos, sin = self.cos_sin(positions, torch.float32)
        return self.apply(x.float(), cos, sin).to(x.dtype)
