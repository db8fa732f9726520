"""The bounded KV cache: preallocated K/V buffers, cache-relative positions, compaction.

Layout ``[layers, kv_heads, capacity, head_dim]``. Slots ``0..length-1`` hold tokens in stream
order; every (layer, KV head) holds the same number of tokens, so slot j is RoPE position j in
all of them, although each head may keep a different subset of the stream. Compaction gathers
the kept slots to the front and re-rotates each moved key by (new slot - old slot).

Per-slot statistics (pinned flags, stream origin, a policy's attention accumulators) are
registered here and moved by the same gather, so no policy has to track slot movements.
"""
from __future__ import annotations

import torch

from ..errors import CacheFullError
from ..rope import Rotary


class BoundedKVCache:
    """Fixed-capacity K/V storage for one stream."""

    def __init__(self, num_layers: int, num_kv_heads: int, capacity: int, head_dim: int, rotary: Rotary,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.rotary = rotary
        self.length = 0          # valid slots, the same in every (layer, head)
        self.total_seen = 0      # tokens ever appended: the stream index of the next token
        self.evictions = 0       # compactions run
        self.evicted_tokens = 0  # slots freed by them, per head
        # Validate the kept slots of each compaction: costs a host sync per eviction; a streaming
        # GPU loop turns it off (SessionConfig.check_evictions) once the policies are trusted.
        self.checks = True
        self.slot_index = torch.arange(capacity, device=device)  # [capacity]: 0..C-1, for masks and shifts
        self.stats: dict[str, torch.Tensor] = {}
        self.pinned = self.register_stat("pinned", torch.bool)
        self.origin = self.register_stat("origin", torch.int64)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def free(self) -> int:
        return self.capacity - self.length

    def register_stat(self, name: str, dtype: torch.dtype, leading: tuple[int, ...] = ()) -> torch.Tensor:
        """A zeroed per-slot tensor ``[*leading, layers, kv_heads, capacity]`` moved with compaction."""
        if name in self.stats:
            return self.stats[name]
        tensor = torch.zeros(leading + self.k.shape[:3], dtype=dtype, device=self.device)
        self.stats[name] = tensor
        return tensor

    def valid(self) -> torch.Tensor:
        """``[capacity]`` bool: which slots hold a token."""
        return self.slot_index < self.length

    def positions(self, count: int) -> torch.Tensor:
        """Cache-relative positions of the next ``count`` tokens."""
        return torch.arange(self.length, self.length + count, device=self.device)

    def append(self, new_k: torch.Tensor, new_v: torch.Tensor, pinned: bool = False) -> None:
        """Write ``[layers, kv_heads, q, head_dim]`` keys (already rotated) and values after the last slot."""
        count = new_k.shape[2]
        if count > self.free:
            raise CacheFullError(f"{count} new tokens do not fit: {self.length}/{self.capacity} slots used")
        end = self.length + count
        self.k[:, :, self.length:end] = new_k
        self.v[:, :, self.length:end] = new_v
        self.pinned[..., self.length:end] = pinned
        self.origin[..., self.length:end] = torch.arange(self.total_seen, self.total_seen + count,
                                                         device=self.device)
        self.length = end
        self.total_seen += count

    def fold_new_tokens(self, mass: torch.Tensor, start: int) -> torch.Tensor:
        """Map a step's attention mass ``[..., capacity + q]`` (slots, then the q new tokens) onto
        slots ``[..., capacity]``, as if the new tokens were already written from slot ``start``."""
        count = mass.shape[-1] - self.capacity
        folded = mass[..., : self.capacity].clone()
        folded[..., start:start + count] += mass[..., self.capacity:]
        return folded

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the slots ``keep[layers, kv_heads, n]`` (ascending in each row), moved to ``0..n-1``."""
        layers, heads = self.k.shape[:2]
        if keep.dim() != 3 or keep.shape[:2] != (layers, heads):
            raise ValueError(f"keep must be [{layers}, {heads}, n], got {tuple(keep.shape)}")
        kept = keep.shape[2]
        if kept > self.length:
            raise ValueError(f"cannot keep {kept} slots of {self.length}")
        if self.checks and kept and (int(keep.max()) >= self.length or int(keep.min()) < 0):
            raise ValueError("keep indexes an empty slot")
        if self.checks and kept > 1 and bool((keep[..., 1:] <= keep[..., :-1]).any()):
            raise ValueError("keep must be strictly ascending in every (layer, head)")
        gather = keep.unsqueeze(-1).expand(-1, -1, -1, self.k.shape[-1])
        moved_k = torch.gather(self.k, 2, gather)
        shift = self.slot_index[:kept].view(1, 1, kept) - keep
        self.k[:, :, :kept] = self.rotary.rotate(moved_k, shift)
        self.v[:, :, :kept] = torch.gather(self.v, 2, gather)
        for name, stat in self.stats.items():
            index = keep.expand(stat.shape[:-3] + keep.shape)
            stat[..., :kept] = torch.gather(stat, -1, index)
            stat[..., kept:] = 0
        self.evictions += 1
        self.evicted_tokens += self.length - kept
        self.length = kept

    def reset(self) -> None:
        """Forget every token (buffers are kept allocated)."""
        for stat in self.stats.values():
            stat.zero_()
        self.length = 0
        self.total_seen = 0
