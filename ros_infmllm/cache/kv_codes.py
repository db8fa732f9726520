"""int8 K/V cache rows: each (layer, KV head, slot) row of ``head_dim`` values as int8 codes with
one float32 scale (symmetric, absmax / 127); keys stored before rotation, turned to their slot's
position as they are read.

Why: at 4,096 tokens a 7B model's bf16 cache is 2.15 GB, read whole by every decode step beside
4.19 GB of int4 weights; in int8 it is half that (plus 4 bytes of scale per 128-byte row), which is
what moves an int4 step's roofline away from the bf16 step's (docs/quantized_weights.md). One scale
per row, not per channel: a streaming cache writes a token once and never sees the rows after it.
A decode kernel applies the scales to a slot's score and to its probability, never to a tile.

Keys are stored unrotated because an eviction renumbers the kept slots: a rotated key would have to
be re-rotated and rounded again at every move, and an H2O heavy hitter kept across many evictions
then carries one rounding per move (+0.010 nats/token for SmolLM2 under ``h2o`` at 8,192 tokens,
+0.014 at 32,768 and growing; rounded once, about 0.001:
benchmarks/results/stream_perplexity_kv8_long_cpu.md). Stored unrotated, a key is rounded once
and a move only gathers codes; every read turns a key by its slot (the cache's ``read_cos``,
``read_sin``), so slot j is RoPE position j as in a float cache. Under M-RoPE (Qwen2-VL) a frame
token's components sit at fixed offsets from its slot; its key is stored turned by those offsets
(turned back by its slot from its position), which never change as it moves, so it too is rounded once.
"""
from __future__ import annotations

import torch

from ..rope import Rotary

# what a decoder step reads beside an int8 cache's codes: k_scale, v_scale ``[layers, kv_heads, C]``
# float32 (one layer's ``[kv_heads, C]`` inside a block) and the slots' half-width rotation tables
# read_cos, read_sin ``[C, head_dim / 2]`` float16 (``read_tables``)
Int8Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

KV_CACHE_DTYPES = ("model", "int8")  # "model": the model's own dtype (bf16 on a GPU, float32 on the CPU)
CODE_MAX = 127


def check_kv_cache_dtype(name: str) -> str:
    """``name`` if it is a cache storage this package has, else a ValueError that lists them."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r}: choose from {', '.join(KV_CACHE_DTYPES)}")
    return name


def read_tables(rotary: Rotary, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The half-width cos / sin tables ``[len(slots), head_dim / 2]`` that turn a key to its slot
    as it is read, in float16. Why float16: the decode kernel reads a table row for every (slot,
    KV head), as many bytes as the key and value codes in float32, and halving them took the 7B
    call on an H100 from 38.3 to 30.1 us (docs/quantized_weights.md); an entry's rounding
    (at most 2^-12 of it) moves a turned key by under a tenth of its code's rounding."""
    angles = rotary.half_angles(slots)
    return angles.cos().half(), angles.sin().half()


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


def read_keys(codes: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """An int8 cache's keys as a float cache holds them: dequantized, turned to their slots by the
    cache's read tables ``cos`` / ``sin`` ``[C, head_dim / 2]``, in ``dtype``."""
    return Rotary.turn(dequantize_rows(codes, scale, torch.float32), cos, sin, dtype)
