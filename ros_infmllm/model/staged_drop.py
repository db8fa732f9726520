"""Staged visual-token dropping inside the decoder during a frame's prefill, after PyramidDrop
(Xing et al., arXiv 2410.17247): the layers are split into stages, and at each stage boundary a
share ``keep`` of the frame's visual tokens still in play goes on, ranked by the attention that the
last token pays them at that layer; shallow layers see every visual token, deep layers few.

What differs from PyramidDrop, and why (docs/visual_tokens.md):
- The ranking query is the chunk's last token (a frame's closing template token, or its last
  visual token where a frame spans chunks): a frame streams in before any question is asked, so
  there is no "last instruction token" yet.
- Shapes stay static, so one CUDA graph serves every frame: a dropped token is not removed from
  the hidden states but masked, from its boundary on, out of every other token's attention (its
  key column) and out of theirs (its row attends to itself alone, so it adds attention mass to no
  other slot). The kept tokens' states are exactly those of removing it
  (tests/test_staged_drop.py); the dropped tokens' compute is spent for nothing, so this saves
  cache, not prefill time.
- What is kept is memory: the cache marks a dropped token's slot in the deeper layers
  (``BoundedKVCache.dropped``); it is masked there and every policy evicts it first, so each
  layer has its own count of live tokens and deep layers hold more frames in the same slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..rope import Rotary


@dataclass(frozen=True)
class StagedDrop:
    """The plan for one chunk: ``boundaries`` (ascending layer indices where a stage begins), the
    visual tokens ``kept`` from each boundary on, and which of the chunk's tokens may be dropped
    (``droppable`` ``[q]`` bool on the model's device)."""

    boundaries: tuple[int, ...]
    kept: tuple[int, ...]
    droppable: torch.Tensor


def stage_counts(visual: int, stages: int, keep: float) -> tuple[int, ...]:
    """Visual tokens kept after each of ``stages`` boundaries: ``ceil(visual * keep**s)``, at least one."""
    if not 0 < keep < 1:
        raise ValueError(f"visual token drop keep ratio must be in (0, 1), got {keep}")
    return tuple(max(1, math.ceil(visual * keep ** s)) for s in range(1, stages + 1))


def parse_drop_layers(value) -> tuple[int, ...] | str:
    """A drop-layers setting as the session keeps it: ``()`` (off), ``"auto"`` or layer numbers,
    from a sequence of numbers or text (``"8,16,24"``, as the node's parameter writes it)."""
    layers = value
    if isinstance(value, str):
        if value.strip() in ("", "auto"):
            return value.strip() or ()
        layers = value.split(",")
    try:
        return tuple(int(layer) for layer in layers)
    except (TypeError, ValueError):
        raise ValueError(f"drop_layers must be layer numbers, 'auto' or empty, got {value!r}") from None


def check_boundaries(boundaries: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Stage boundaries must be strictly ascending layer indices in 1..layers-1 (layer 0 always
    sees every token, as in PyramidDrop)."""
    boundaries = tuple(int(b) for b in boundaries)
    if any(not 1 <= b < num_layers for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
        raise ValueError(f"visual token drop layers must be strictly ascending in 1..{num_layers - 1}, "
                         f"got {list(boundaries)}")
    return boundaries


def even_boundaries(num_layers: int, stages: int = 4) -> tuple[int, ...]:
    """PyramidDrop's default split: ``stages`` equal stages (layers 8, 16, 24 of LLaVA-1.5's 32);
    a decoder with fewer layers than stages gets a boundary at each layer but the first."""
    if num_layers < 2:
        raise ValueError(f"a staged visual-token drop needs at least two decoder layers, this model has {num_layers}")
    return tuple(sorted({max(1, num_layers * s // stages) for s in range(1, stages)}))


def rank_and_keep(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, live: torch.Tensor,
                  droppable: torch.Tensor, count: int) -> torch.Tensor:
    """At a stage boundary: which of the chunk's tokens stay in play (``[q]`` bool). Of the
    droppable tokens still ``live``, the ``count`` that the last token attends to most (this
    layer's query and keys, softmax per head over the candidates, averaged over heads);
    tokens that are not droppable always stay."""
    attn = block.self_attn
    hidden = block.input_layernorm(x)
    q, k, _ = attn.qkv(attn, hidden) if attn.qkv else (attn.q_proj(hidden), attn.k_proj(hidden), None)
    q_len, heads, kv_heads, dim = x.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
    last = Rotary.apply(q[-1:].reshape(1, heads, dim).transpose(0, 1), cos[-1:], sin[-1:])  # [heads, 1, dim]
    keys = Rotary.apply(k.reshape(q_len, kv_heads, dim).transpose(0, 1), cos, sin)       # [kv, q, dim]
    keys = keys.repeat_interleave(heads // kv_heads, dim=0)
    candidates = droppable & live
    scores = (last @ keys.transpose(-1, -2)).float()[:, 0] * dim ** -0.5  # [heads, q]
    attention = scores.masked_fill(~candidates, float("-inf")).softmax(-1).mean(0)
    chosen = attention.masked_fill(~candidates, float("-inf")).topk(count).indices
    return (live & ~droppable) | torch.zeros_like(live).index_fill_(0, chosen, True)


def layer_mask(valid: torch.Tensor, causal: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    """One layer's attention mask ``[q, C + q]``: the cached slots ``valid`` ``[C]`` then the chunk,
    causally; a token not ``live`` is seen by no other token and sees only itself."""
    q_len = causal.shape[0]
    cached = valid.view(1, -1).expand(q_len, -1)
    if live is None:
        return torch.cat((cached, causal), dim=1)
    rows, cols = live.view(-1, 1), live.view(1, -1)
    own = torch.eye(q_len, dtype=torch.bool, device=causal.device)
    return torch.cat((cached & rows, (causal & rows & cols) | own), dim=1)
