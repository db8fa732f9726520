"""A control for the int8 cache's quality study (benchmark only, not a product feature): an int8
cache whose kept keys are rounded once, from exact float keys, instead of again at every move.

Why: ``BoundedKVCache`` with ``kv_dtype="int8"`` re-rotates a moved key from its dequantized row
and rounds it again, so a key kept across many evictions (an H2O heavy hitter) carries one
rounding per move. This control keeps a float32 copy of every key beside the codes, re-rotates
that copy exactly at each move and rounds the codes afresh from it: each key then carries one
rounding, what a cache storing keys before rotation (rotated as they are read, as StreamingLLM's
implementation does) would give. The gap between ``+kv8`` and ``+kv8once`` runs of one policy is
what the repeated rounding costs (stream_perplexity.py).
"""
from __future__ import annotations

import torch

from ros_infmllm.cache import BoundedKVCache
from ros_infmllm.cache.kv_codes import quantize_rows


class OnceRoundedKVCache(BoundedKVCache):
    """An int8 cache plus exact float32 keys; codes re-rounded from them after every move."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.quantized:
            raise ValueError("the once-rounded control is an int8 cache (kv_cache_dtype int8)")
        self.exact_k = torch.zeros(self.k.shape, dtype=torch.float32, device=self.device)

    def write(self, new_k: torch.Tensor, new_v: torch.Tensor, pinned: bool = False, visual: bool = False,
              dropped: torch.Tensor | None = None) -> None:
        self.exact_k.index_copy_(2, self.positions(new_k.shape[2]), new_k.float())
        super().write(new_k, new_v, pinned, visual, dropped)

    def move(self, keep: torch.Tensor, merge: bool = False) -> None:
        if merge:
            raise ValueError("the once-rounded control does not merge")
        kept = keep.shape[2]
        gather = keep.unsqueeze(-1).expand(-1, -1, -1, self.k.shape[-1])
        shift = self.slot_index[:kept].view(1, kept) - keep
        exact = self.rotary.rotate(torch.gather(self.exact_k, 2, gather), shift)
        super().move(keep)  # values, scales and statistics as the product moves them
        self.exact_k[:, :, :kept] = exact
        self.k[:, :, :kept], self.k_scale[:, :, :kept] = quantize_rows(exact)
