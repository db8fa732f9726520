"""Per-frame visual token reduction before the decoder: a frame's tokens, laid out on the tower's
square patch grid, are averaged over ``pool x pool`` cells (as video LLMs pool frames), so a frame
takes about ``pool**2`` times fewer cache slots and prefill tokens. Uneven grids (8x8 by 3) use
adaptive bins: ``ceil(side / pool)`` per side, each bin the mean of the cells it covers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_POOL = 4


def grid_side(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"visual token pooling needs a square token grid; this tower gives {tokens} tokens")
    return side


def pooled_count(tokens: int, pool: int) -> int:
    """Visual tokens per frame after pooling (``tokens`` itself for pool 1)."""
    if not 1 <= pool <= MAX_POOL:
        raise ValueError(f"visual token pool must be 1..{MAX_POOL}, got {pool}")
    if pool == 1:
        return tokens
    return math.ceil(grid_side(tokens) / pool) ** 2


def pool_tokens(features: torch.Tensor, pool: int) -> torch.Tensor:
    """``[N, side*side, hidden]`` -> ``[N, ceil(side/pool)**2, hidden]``, row-major like the input."""
    if pool == 1:
        return features
    n, tokens, hidden = features.shape
    side = grid_side(tokens)
    grid = features.transpose(1, 2).reshape(n, hidden, side, side)
    out = math.ceil(side / pool)
    pooled = F.adaptive_avg_pool2d(grid.float(), out).to(features.dtype)
    return pooled.reshape(n, hidden, out * out).transpose(1, 2).contiguous()
