"""int8 K/V cache rows: each (layer, KV head, slot) row of ``head_dim`` values as int8 codes with
one float32 scale (symmetric, absmax / 127).

Why: at 4,096 tokens a 7B model's bf16 cache is 2.15 GB, read whole by every decode step beside
4.19 GB of int4 weights; in int8 it is half that (plus 4 bytes of scale per 128-byte row), which is
what moves an int4 step's roofline away from the bf16 step's (docs/quantized_weights.md). One scale
per row, not per channel: a streaming cache writes a token once and never sees the rows after it.
A decode kernel applies the scales to a slot's score and to its probability, never to a tile.
"""
from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("model", "int8")  # "model": the model's own dtype (bf16 on a GPU, float32 on the CPU)
CODE_MAX = 127


def check_kv_cache_dtype(name: str) -> str:
    """``name`` if it is a cache storage this package has, else a ValueError that lists them."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r}: choose from {', '.join(KV_CACHE_DTYPES)}")
    return name


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., dim]`` -> int8 codes ``[..., dim]`` and float32 scales ``[...]`` with
    ``x ~= codes * scale``; an all-zero row gets scale 0 and codes 0."""
    wide = x.float()
    scale = wide.abs().amax(-1) / CODE_MAX
    codes = torch.round(wide / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    return codes.clamp_(-CODE_MAX, CODE_MAX).to(torch.int8), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows ``codes * scale`` in ``dtype`` (computed in float32)."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)
