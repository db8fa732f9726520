"""The bounded KV cache: preallocated K/V buffers, cache-relative positions, compaction.

Layout ``[layers, kv_heads, capacity, head_dim]``. Slots ``0..length-1`` hold tokens in stream
order; every (layer, KV head) holds the same number of tokens, so slot j is RoPE position j in
all of them, although each head may keep a different subset of the stream. Compaction gathers
the kept slots to the front and re-rotates each moved key by (new slot - old slot). (An M-RoPE
model's frame tokens sit at fixed offsets from their slots, docs/qwen2_vl.md; moving all three of
a token's position components by the same amount is this same rotation, so nothing here changes.)

Per-slot statistics (pinned flags, stream origin, whether a slot holds a frame's token, a
policy's attention accumulators) are registered here and moved by the same gather, so no policy
has to track slot movements.

With ``kv_dtype="int8"`` the buffers hold int8 codes and each (layer, head, slot) row has a
float32 scale (``k_scale``, ``v_scale``; kv_codes.py), and keys are stored before rotation: a
write turns the new keys back from their slots, a compaction only gathers codes and scales (no
key is rounded twice), and every read turns a key by its slot with ``read_cos`` / ``read_sin``.
An M-RoPE frame token sits at fixed offsets from its slot (a different one per component): turned
back by its slot it keeps the rotation by those offsets, which moves with it as the offsets do, so
its codes hold that once-rounded key and a read by the slot gives its M-RoPE position again; the
same tables serve both RoPEs.

An eviction may merge instead of drop (``move(keep, merge=True)``, after LOOK-M, arXiv
2406.18139): each evicted visual slot is averaged into the kept slot whose key is most similar
(cosine, per layer and KV head), keys and values alike, before the kept slots move. Keys are
averaged as stored (rotated at their own positions, or unrotated in an int8 cache), as LOOK-M
averages the cache it holds.

A staged visual-token drop (model/staged_drop.py, after PyramidDrop) marks a frame's dropped
tokens per layer (``dropped``): the slot is written in every layer, so slot j stays position j
everywhere, but in the layers that dropped it it is masked (``layer_valid``) and not ``live``,
and every policy evicts it first (``policies.keep_top``). So each layer has its own count of live
tokens (``live_counts``) within the one preallocated capacity, and after evictions the deep
layers, whose frames left fewer live tokens, hold more of the stream.

The fill level is kept twice: as host integers (``length``, ``total_seen``) for the session's
decisions, and as device scalars (``length_t``, ``seen_t``) that every device-side operation
reads. A step that only reads the device copies (``write``, ``move``) can be captured once in a
CUDA graph and replayed at any fill level; the host copies follow through ``commit`` and
``shrink``. ``append`` and ``compact`` do both halves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CacheFullError
from ..rope import Rotary
from .kv_codes import Int8Rows, check_kv_cache_dtype, dequantize_rows, quantize_rows, read_tables


# scratch memory an eviction may take for its re-rotation or merging: 64 MiB, since at 256 a 7B
# model's eviction was the largest transient of its streaming peak (memory_peak_int4_h200.md)
MOVE_SCRATCH_BYTES = 64 << 20
ROTATE_BYTES = 18  # scratch per re-rotated element: gathered, float32 copy, half tables, products, result


class BoundedKVCache:
    """Fixed-capacity K/V storage for one stream."""

    def __init__(self, num_layers: int, num_kv_heads: int, capacity: int, head_dim: int, rotary: Rotary,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kv_dtype: str = "model") -> None:
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        check_kv_cache_dtype(kv_dtype)
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.quantized = kv_dtype == "int8"
        storage = torch.int8 if self.quantized else dtype
        self.k = torch.zeros(shape, dtype=storage, device=device)
        self.v = torch.zeros(shape, dtype=storage, device=device)
        self.capacity = capacity
        self.rotary = rotary
        self.length = 0          # valid slots, the same in every (layer, head)
        self.total_seen = 0      # tokens ever appended: the stream index of the next token
        self.length_t = torch.zeros((), dtype=torch.int64, device=device)  # device copies of the two
        self.seen_t = torch.zeros((), dtype=torch.int64, device=device)
        self.evictions = 0       # compactions run
        self.evicted_tokens = 0  # slots freed by them, per head
        # Validate the kept slots of each compaction: costs a host sync per eviction; a streaming
        # GPU loop turns it off (SessionConfig.check_evictions) once the policies are trusted.
        self.checks = True
        self.slot_index = torch.arange(capacity, device=device)  # [capacity]: 0..C-1, for masks and shifts
        # An int8 cache's rows' scales [layers, kv_heads, capacity] float32, and the half-width tables
        # [capacity, head_dim / 2] (float16) its keys are turned to their slots with as read; None otherwise.
        self.k_scale = self.v_scale = self.read_cos = self.read_sin = None
        if self.quantized:
            self.k_scale, self.v_scale = torch.zeros(shape[:3], device=device), torch.zeros(shape[:3], device=device)
            self.read_cos, self.read_sin = read_tables(rotary, self.slot_index)
        self.stats: dict[str, torch.Tensor] = {}
        self.pinned = self.register_stat("pinned", torch.bool)
        self.origin = self.register_stat("origin", torch.int64)
        self.visual = self.register_stat("visual", torch.bool)  # a frame's token (its chunk's, template included)
        self.dropped = self.register_stat("dropped", torch.bool)  # a staged drop took it out of this layer

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def int8_cache(self) -> Int8Rows | None:
        """What a decoder step reads beside an int8 cache's codes: ``(k_scale, v_scale, read_cos,
        read_sin)``; None for a cache holding the values."""
        return (self.k_scale, self.v_scale, self.read_cos, self.read_sin) if self.quantized else None

    @property
    def nbytes(self) -> int:
        """Bytes of K/V storage, an int8 cache's scales and read tables included (per-slot
        statistics not counted)."""
        tensors = (self.k, self.v) + (self.int8_cache or ())
        return sum(t.numel() * t.element_size() for t in tensors)

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
        return self.slot_index < self.length_t

    def live(self) -> torch.Tensor:
        """``[layers, kv_heads, capacity]`` bool: slots holding a token not dropped in that layer."""
        return self.valid() & ~self.dropped

    def layer_valid(self) -> torch.Tensor:
        """``[layers, capacity]`` bool: the mask each layer attends with (a drop is per layer, not per head)."""
        return self.valid() & ~self.dropped[:, 0]

    def live_counts(self) -> list[int]:
        """Live tokens per layer (a host sync): the fill level each layer really has."""
        return self.live()[:, 0].sum(-1).tolist()

    def positions(self, count: int) -> torch.Tensor:
        """Cache-relative positions (= slots) of the next ``count`` tokens."""
        steps = self.slot_index[:count] if count <= self.capacity else torch.arange(count, device=self.device)
        return self.length_t + steps

    def append(self, new_k: torch.Tensor, new_v: torch.Tensor, pinned: bool = False, visual: bool = False) -> None:
        """Write ``[layers, kv_heads, q, head_dim]`` keys (already rotated) and values after the last slot."""
        count = new_k.shape[2]
        if count > self.free:
            raise CacheFullError(f"{count} new tokens do not fit: {self.length}/{self.capacity} slots used")
        self.write(new_k, new_v, pinned, visual)
        self.commit(count)

    def write(self, new_k: torch.Tensor, new_v: torch.Tensor, pinned: bool = False, visual: bool = False,
              dropped: torch.Tensor | None = None) -> None:
        """The device half of ``append`` (graph-capturable; the caller has checked the room).
        ``dropped`` ``[layers, count]`` bool: the new tokens a staged drop took out of each layer."""
        count = new_k.shape[2]
        slots = self.positions(count)
        if self.quantized:  # keys turned back from their slots (positions), then rounded once
            raw_k = self.rotary.rotate(new_k.float(), -slots)
            for buffer, scales, rows in ((self.k, self.k_scale, raw_k), (self.v, self.v_scale, new_v)):
                codes, scale = quantize_rows(rows)
                buffer.index_copy_(2, slots, codes)
                scales.index_copy_(2, slots, scale)
        else:
            self.k.index_copy_(2, slots, new_k)
            self.v.index_copy_(2, slots, new_v)
        self.pinned.index_fill_(-1, slots, pinned)
        self.visual.index_fill_(-1, slots, visual)
        if dropped is not None:
            self.dropped.index_copy_(-1, slots, dropped.unsqueeze(1).expand(self.dropped.shape[:2] + (count,)))
        origin = (self.seen_t + self.slot_index[:count]).expand(self.origin.shape[:-1] + (count,))
        self.origin.index_copy_(-1, slots, origin)
        self.length_t += count
        self.seen_t += count

    def commit(self, count: int) -> None:
        """The host half of ``append``: count the ``count`` tokens that ``write`` stored."""
        self.length += count
        self.total_seen += count

    def fold_new_tokens(self, mass: torch.Tensor) -> torch.Tensor:
        """Map a step's attention mass ``[..., capacity + q]`` (slots, then the q new tokens) onto
        slots ``[..., capacity]``, as if the new tokens were already written after the last slot."""
        count = mass.shape[-1] - self.capacity
        folded = mass[..., : self.capacity].clone()
        return folded.index_add_(-1, self.positions(count), mass[..., self.capacity:])

    def compact(self, keep: torch.Tensor, merge: bool = False) -> None:
        """Keep the slots ``keep[layers, kv_heads, n]`` (ascending in each row), moved to ``0..n-1``;
        ``merge``: evicted visual slots averaged into their most similar kept slot first."""
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
        self.move(keep, merge)
        self.shrink(kept)

    def move(self, keep: torch.Tensor, merge: bool = False) -> None:
        """The device half of ``compact`` (graph-capturable). The re-rotation goes in pieces whose
        scratch stays under ``MOVE_SCRATCH_BYTES``: groups of whole layers for a small model (few
        kernels), groups of heads within a layer for a large one (bounded memory)."""
        kept = keep.shape[2]
        if merge:
            self.merge_evicted(keep)
        shift = self.slot_index[:kept].view(1, kept) - keep  # [layers, heads, kept]: new slot - old slot
        for rows, cols in self._move_pieces(kept):
            index = keep[rows, cols]
            gather = index.unsqueeze(-1).expand(-1, -1, -1, self.k.shape[-1])
            keys = torch.gather(self.k[rows, cols], 2, gather)
            self.v[rows, cols, :kept] = torch.gather(self.v[rows, cols], 2, gather)
            if not self.quantized:
                self.k[rows, cols, :kept] = self.rotary.rotate(keys, shift[rows, cols])
                continue
            self.k[rows, cols, :kept] = keys  # unrotated: the new slot turns it when read
            for scales in (self.k_scale, self.v_scale):
                scales[rows, cols, :kept] = torch.gather(scales[rows, cols], 2, index)
        for name, stat in self.stats.items():
            index = keep.expand(stat.shape[:-3] + keep.shape)
            stat[..., :kept] = torch.gather(stat, -1, index)
            stat[..., kept:] = 0
        self.length_t.fill_(kept)

    def _move_pieces(self, kept: int) -> list[tuple[slice, slice]]:
        """(layers, heads) slices that re-rotate ``kept`` slots each within ``MOVE_SCRATCH_BYTES``."""
        layers, heads, _, dim = self.k.shape
        per_head = kept * dim * ROTATE_BYTES
        if heads * per_head <= MOVE_SCRATCH_BYTES or heads == 1:
            group = max(1, MOVE_SCRATCH_BYTES // (heads * per_head))
            return [(slice(first, first + group), slice(None)) for first in range(0, layers, group)]
        group = max(1, MOVE_SCRATCH_BYTES // per_head)
        return [(slice(layer, layer + 1), slice(first, first + group))
                for layer in range(layers) for first in range(0, heads, group)]

    def merge_evicted(self, keep: torch.Tensor) -> None:
        """Average every valid, unkept visual slot into the kept slot (of ``keep``) with the most
        similar key, per layer and KV head: ``k_kept = (k_kept + sum of its merged keys) / (1 +
        their count)``, values alike, written back in place (``move`` then gathers them; int8 rows
        are averaged from their dequantized values, keys unrotated, and rounded again). Heads go in
        groups whose similarity matrix stays under ``MOVE_SCRATCH_BYTES``. Graph-capturable."""
        layers, heads, capacity, dim = self.k.shape
        kept = keep.shape[2]
        if kept == 0:
            return
        group = max(1, MOVE_SCRATCH_BYTES // (capacity * kept * 4 * 2))
        live = self.live()
        for layer in range(layers):
            for first in range(0, heads, group):
                rows = slice(first, first + group)
                keys = _float_rows(self.k, self.k_scale, layer, rows)
                values = _float_rows(self.v, self.v_scale, layer, rows)
                index = keep[layer, rows]
                spread = index.unsqueeze(-1).expand(-1, -1, dim)
                kept_k, kept_v = torch.gather(keys, 1, spread), torch.gather(values, 1, spread)
                unkept = torch.ones_like(self.visual[layer, rows]).scatter_(-1, index, False)
                evicted = (unkept & live[layer, rows] & self.visual[layer, rows]).float()  # [group, capacity]
                similarity = F.normalize(keys, dim=-1) @ F.normalize(kept_k, dim=-1).transpose(1, 2)
                target_live = torch.gather(live[layer, rows], 1, index)  # a kept slot that is dropped padding
                similarity = similarity.masked_fill(~target_live.unsqueeze(1), float("-inf"))  # takes nothing
                target = similarity.argmax(-1)  # [group, capacity]: the kept entry each slot is closest to
                count = torch.zeros_like(kept_k[..., 0]).scatter_add_(1, target, evicted)
                wide = target.unsqueeze(-1).expand(-1, -1, dim)
                sum_k = torch.zeros_like(kept_k).scatter_add_(1, wide, keys * evicted.unsqueeze(-1))
                sum_v = torch.zeros_like(kept_v).scatter_add_(1, wide, values * evicted.unsqueeze(-1))
                scale = 1.0 / (1.0 + count).unsqueeze(-1)
                _store_rows(self.k, self.k_scale, layer, rows, index, (kept_k + sum_k) * scale)
                _store_rows(self.v, self.v_scale, layer, rows, index, (kept_v + sum_v) * scale)

    def shrink(self, kept: int) -> None:
        """The host half of ``compact``: ``kept`` slots remain."""
        self.evictions += 1
        self.evicted_tokens += self.length - kept
        self.length = kept

    def truncate(self, length: int, total_seen: int) -> None:
        """Forget the slots from ``length`` on and set the stream index back to ``total_seen``:
        undoes appends made since the cache held ``length`` tokens, where no compaction has run in
        between (the session's rollback of a failed feed). Statistics of the forgotten slots are
        zeroed, so the tokens written there next start from nothing, as after a compaction."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} slots to {length}")
        for stat in self.stats.values():
            stat[..., length:] = 0
        self.length_t.fill_(length)
        self.seen_t.fill_(total_seen)
        self.length, self.total_seen = length, total_seen

    def reset(self) -> None:
        """Forget every token and the eviction counts (buffers are kept allocated)."""
        for stat in self.stats.values():
            stat.zero_()
        self.length_t.zero_()
        self.seen_t.zero_()
        self.length = 0
        self.total_seen = 0
        self.evictions = self.evicted_tokens = 0


def _float_rows(buffer: torch.Tensor, scales: torch.Tensor | None, layer: int, heads: slice) -> torch.Tensor:
    """One layer's ``heads`` of keys or values ``[heads, capacity, dim]`` in float32 (int8 rows
    dequantized with their ``scales``)."""
    if scales is None:
        return buffer[layer, heads].float()
    return dequantize_rows(buffer[layer, heads], scales[layer, heads], torch.float32)


def _store_rows(buffer: torch.Tensor, scales: torch.Tensor | None, layer: int, heads: slice, index: torch.Tensor,
                rows: torch.Tensor) -> None:
    """Write float ``rows`` ``[heads, n, dim]`` into the slots ``index`` ``[heads, n]`` of one layer
    (int8 rows rounded, with their scales)."""
    spread = index.unsqueeze(-1).expand(-1, -1, rows.shape[-1])
    if scales is None:
        buffer[layer, heads].scatter_(1, spread, rows.to(buffer.dtype))
        return
    codes, scale = quantize_rows(rows)
    buffer[layer, heads].scatter_(1, spread, codes)
    scales[layer, heads].scatter_(1, index, scale)
