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

    def half_angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Plain RoPE angles ``positions.shape + (head_dim / 2,)`` in float32, one per pair."""
        return positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape ``positions.shape + (head_dim,)``; angles computed in float32."""
        freqs = self.half_angles(positions)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x[..., head_dim]`` by precomputed cos/sin broadcastable to it."""
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated_half * sin

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x[..., n, head_dim]`` by plain RoPE at ``positions[..., n]`` (may be negative: a
        shift back). The same values as ``apply`` with float32 tables, computed on half-width tables
        and halves of x: an eviction re-rotates most of the cache, and the full-width float32
        temporaries were the largest memory of a 7B model's streaming peak (0.38 GiB a layer,
        benchmarks/results/memory_peak_int4_h200.md)."""
        angles = self.half_angles(positions)
        return Rotary.turn(x, angles.cos(), angles.sin())

    @staticmethod
    def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x[..., head_dim]`` rotated by half-width ``cos`` / ``sin`` broadcastable to
        ``[..., head_dim / 2]`` (float32, or an int8 cache's float16 read tables) as
        ``x * cos + rotate_half(x) * sin``, computed in float32 on halves of x, returned in
        ``dtype`` (default x's)."""
        half = x.shape[-1] // 2
        wide = x.float()
        first, second = wide[..., :half], wide[..., half:]
        out = torch.empty_like(x, dtype=dtype or x.dtype)
        out[..., :half] = first * cos - second * sin  # x * cos + rotate_half(x) * sin, first half
        out[..., half:] = second * cos + first * sin
        return out


class MultimodalRotary(Rotary):
    """Qwen2-VL's multimodal RoPE (M-RoPE): a position has three components (temporal, height,
    width) and each rotary frequency pair is turned by one of them: the first ``section[0]``
    pairs by the temporal component, the next ``section[1]`` by the height, the rest by the width
    (transformers' ``mrope_section``). Text tokens have three equal components, which is plain
    RoPE. Turning all three components by the same amount d is plain RoPE's rotation by d, so the
    cache re-rotates moved keys with the inherited ``rotate`` unchanged."""

    def __init__(self, head_dim: int, theta: float, section: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        super().__init__(head_dim, theta, device)
        if len(section) != 3 or sum(section) != head_dim // 2:
            raise ValueError(f"mrope section {section} must be three numbers summing to head_dim / 2 = {head_dim // 2}")
        self.section = tuple(section)
        pairs = [axis for axis, count in enumerate(section) for _ in range(count)]
        self.component = torch.tensor(pairs, device="cpu").to(device)  # [head_dim / 2]: each pair's axis

    def to(self, device: torch.device | str) -> "MultimodalRotary":
        super().to(device)
        self.component = self.component.to(device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions[n]`` (plain) or ``[3, n]`` (temporal, height, width) -> cos/sin ``[n, head_dim]``."""
        if positions.dim() != 2:
            return super().cos_sin(positions, dtype)
        if positions.shape[0] != 3:
            raise ValueError(f"M-RoPE positions must be [3, n], got {tuple(positions.shape)}")
        per_pair = positions.to(torch.float32)[self.component.to(positions.device)]  # [head_dim / 2, n]
        freqs = per_pair.transpose(0, 1) * self.inv_freq.to(positions.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_for(head_dim: int, theta: float, mrope_section: tuple[int, ...] | None = None) -> Rotary:
    """The rotary a decoder config asks for: M-RoPE where it names sections, plain RoPE otherwise."""
    return Rotary(head_dim, theta) if mrope_section is None else MultimodalRotary(head_dim, theta, mrope_section)
