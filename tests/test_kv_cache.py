"""BoundedKVCache: appends, compaction with re-rotation, per-slot statistics."""
from __future__ import annotations

import pytest
import torch

from ros_infmllm.cache import BoundedKVCache
from ros_infmllm.errors import CacheFullError
from ros_infmllm.rope import Rotary

LAYERS, HEADS, DIM = 2, 3, 8


def _cache(capacity: int = 16) -> BoundedKVCache:
    return BoundedKVCache(LAYERS, HEADS, capacity, DIM, Rotary(DIM, 10000.0))


def _filled(count: int, capacity: int = 16) -> tuple[BoundedKVCache, torch.Tensor, torch.Tensor]:
    cache = _cache(capacity)
    raw_k = torch.randn(LAYERS, HEADS, count, DIM)
    values = torch.randn(LAYERS, HEADS, count, DIM)
    cache.append(cache.rotary.rotate(raw_k, torch.arange(count)), values)
    return cache, raw_k, values


def _per_head_subsets(count: int, keep: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(count, generator=generator)[:keep].sort().values for _ in range(LAYERS * HEADS)]
    return torch.stack(rows).view(LAYERS, HEADS, keep)


# all layers at once, one layer at a time, two heads of a layer, one head (7 slots kept of DIM)
@pytest.mark.parametrize("scratch, pieces", [(256 << 20, 1), (HEADS * 7 * DIM * 18, LAYERS),
                                             (2 * 7 * DIM * 18, 2 * LAYERS), (1, HEADS * LAYERS)])
def test_compaction_rerotation_equals_rotation_at_new_slots(scratch: int, pieces: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ros_infmllm.cache.kv_cache.MOVE_SCRATCH_BYTES", scratch)
    cache, raw_k, values = _filled(12)
    keep = _per_head_subsets(12, 7)
    assert len(cache._move_pieces(7)) == pieces
    cache.compact(keep)
    gather = keep.unsqueeze(-1).expand(-1, -1, -1, DIM)
    expected_k = cache.rotary.rotate(torch.gather(raw_k, 2, gather), torch.arange(7))
    assert cache.length == 7
    assert torch.allclose(cache.k[:, :, :7], expected_k, atol=1e-5)
    assert torch.equal(cache.v[:, :, :7], torch.gather(values, 2, gather))


def test_rotate_gives_apply_with_full_tables_exactly() -> None:
    """``Rotary.rotate`` (half-width tables, for an eviction's memory) against ``apply`` with
    ``cos_sin``'s full float32 tables: the same bits, in bf16 and float32, for shifts either way."""
    rotary = Rotary(DIM, 10000.0)
    generator = torch.Generator().manual_seed(4)
    shifts = torch.randint(-500, 500, (LAYERS, HEADS, 9), generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(LAYERS, HEADS, 9, DIM, generator=generator).to(dtype)
        cos, sin = rotary.cos_sin(shifts, torch.float32)
        assert torch.equal(rotary.rotate(x, shifts), Rotary.apply(x.float(), cos, sin).to(dtype))


def test_repeated_compactions_compose() -> None:
    cache, raw_k, _ = _filled(12)
    first = _per_head_subsets(12, 9, seed=1)
    cache.compact(first)
    second = _per_head_subsets(9, 5, seed=2)
    cache.compact(second)
    original_slots = torch.gather(first, 2, second)
    gather = original_slots.unsqueeze(-1).expand(-1, -1, -1, DIM)
    expected = cache.rotary.rotate(torch.gather(raw_k, 2, gather), torch.arange(5))
    assert torch.allclose(cache.k[:, :, :5], expected, atol=1e-5)
    assert torch.equal(cache.origin[..., :5], original_slots)


def test_append_beyond_capacity_raises_and_changes_nothing() -> None:
    cache, _, _ = _filled(14)
    before = cache.k.clone()
    with pytest.raises(CacheFullError, match="do not fit: 14/16"):
        cache.append(torch.zeros(LAYERS, HEADS, 3, DIM), torch.zeros(LAYERS, HEADS, 3, DIM))
    assert cache.length == 14 and torch.equal(cache.k, before)


def test_pinned_and_origin_move_with_slots() -> None:
    cache = _cache()
    cache.append(torch.randn(LAYERS, HEADS, 3, DIM), torch.randn(LAYERS, HEADS, 3, DIM), pinned=True)
    cache.append(torch.randn(LAYERS, HEADS, 9, DIM), torch.randn(LAYERS, HEADS, 9, DIM))
    keep = torch.tensor([0, 1, 2, 5, 8, 11]).expand(LAYERS, HEADS, -1)
    cache.compact(keep)
    assert cache.pinned[..., :3].all() and not cache.pinned[..., 3:].any()
    assert torch.equal(cache.origin[0, 0, :6], torch.tensor([0, 1, 2, 5, 8, 11]))
    assert cache.evictions == 1 and cache.evicted_tokens == 6


@pytest.mark.parametrize("keep, message", [
    (torch.tensor([3, 1, 2]), "strictly ascending"),
    (torch.tensor([0, 1, 20]), "empty slot"),
])
def test_compact_rejects_bad_indices(keep: torch.Tensor, message: str) -> None:
    cache, _, _ = _filled(10)
    with pytest.raises(ValueError, match=message):
        cache.compact(keep.expand(LAYERS, HEADS, -1))
    assert cache.length == 10


def test_fold_new_tokens_places_mass_on_future_slots() -> None:
    cache, _, _ = _filled(5, capacity=8)
    mass = torch.zeros(LAYERS, HEADS, 8 + 2)
    mass[..., 1] = 1.0
    mass[..., 8] = 2.0   # first new token -> slot 5
    mass[..., 9] = 3.0   # second new token -> slot 6
    folded = cache.fold_new_tokens(mass)
    assert folded.shape == (LAYERS, HEADS, 8)
    assert folded[0, 0].tolist() == [0, 1, 0, 0, 0, 2, 3, 0]


def test_truncate_forgets_the_newest_slots_and_their_statistics() -> None:
    cache, _, _ = _filled(6)
    accumulated = cache.register_stat("accumulated", torch.float32)
    accumulated += 1.0
    cache.append(torch.randn(LAYERS, HEADS, 4, DIM), torch.randn(LAYERS, HEADS, 4, DIM), pinned=True)
    cache.truncate(6, 6)
    assert (cache.length, cache.total_seen, int(cache.length_t), int(cache.seen_t)) == (6, 6, 6, 6)
    assert not cache.pinned[..., 6:].any() and not accumulated[..., 6:].any() and accumulated[..., :6].all()
    cache.append(torch.randn(LAYERS, HEADS, 2, DIM), torch.randn(LAYERS, HEADS, 2, DIM))
    assert cache.origin[0, 0, 6:8].tolist() == [6, 7]  # the stream index continues from before
    with pytest.raises(ValueError, match="cannot truncate 8 slots to 9"):
        cache.truncate(9, 9)


@pytest.mark.parametrize("scratch", [256 << 20, 1])  # every head at once, or one head at a time
def test_merging_averages_each_evicted_visual_slot_into_its_closest_kept_key(scratch: int, monkeypatch) -> None:
    """LOOK-M merging against a loop written from its definition: each evicted visual slot joins
    the kept slot of highest key cosine similarity (per layer and head); a kept slot becomes the
    mean of itself and what joined it; text slots are dropped, never merged; the cache stays bounded."""
    monkeypatch.setattr("ros_infmllm.cache.kv_cache.MOVE_SCRATCH_BYTES", scratch)
    cache = _cache(16)
    keys, values = torch.randn(LAYERS, HEADS, 12, DIM), torch.randn(LAYERS, HEADS, 12, DIM)
    cache.append(keys[:, :, :4], values[:, :, :4])                         # text
    cache.append(keys[:, :, 4:], values[:, :, 4:], visual=True)            # a frame
    keep = _per_head_subsets(12, 5, seed=3)
    expected_k, expected_v = keys.clone(), values.clone()
    for layer in range(LAYERS):
        for head in range(HEADS):
            kept = keep[layer, head].tolist()
            joined: dict[int, list[int]] = {slot: [slot] for slot in kept}
            for slot in range(4, 12):  # visual slots only
                if slot in kept:
                    continue
                similarity = [torch.nn.functional.cosine_similarity(keys[layer, head, slot], keys[layer, head, k], 0)
                              for k in kept]
                joined[kept[int(torch.stack(similarity).argmax())]].append(slot)
            for slot, members in joined.items():
                expected_k[layer, head, slot] = keys[layer, head, members].mean(0)
                expected_v[layer, head, slot] = values[layer, head, members].mean(0)
    cache.compact(keep, merge=True)
    gather = keep.unsqueeze(-1).expand(-1, -1, -1, DIM)
    shift = torch.arange(5).view(1, 1, 5) - keep
    assert cache.length == 5 and cache.k.shape[2] == 16
    assert torch.allclose(cache.v[:, :, :5], torch.gather(expected_v, 2, gather), atol=1e-5)
    assert torch.allclose(cache.k[:, :, :5], cache.rotary.rotate(torch.gather(expected_k, 2, gather), shift), atol=1e-5)
    assert torch.equal(cache.visual[:, :, :5], torch.gather(torch.arange(12).expand(LAYERS, HEADS, 12) >= 4, 2, keep))


def test_merging_without_visual_slots_changes_nothing() -> None:
    cache, _, _ = _filled(12)
    plain, _, _ = _filled(12)
    plain.k.copy_(cache.k)
    plain.v.copy_(cache.v)
    keep = _per_head_subsets(12, 6, seed=4)
    cache.compact(keep, merge=True)
    plain.compact(keep)
    assert torch.equal(cache.k, plain.k) and torch.equal(cache.v, plain.v)


def _int8_filled(count: int, capacity: int = 16) -> tuple[BoundedKVCache, torch.Tensor, torch.Tensor]:
    """An int8 cache after one append of ``count`` tokens; returns it, their unrotated keys and their values."""
    cache = BoundedKVCache(LAYERS, HEADS, capacity, DIM, Rotary(DIM, 10000.0), kv_dtype="int8")
    generator = torch.Generator().manual_seed(5)
    size = torch.rand(LAYERS, HEADS, count, 1, generator=generator) * 3 + 0.1  # rows of different sizes
    raw_k = torch.randn(LAYERS, HEADS, count, DIM, generator=generator) * size
    values = torch.randn(LAYERS, HEADS, count, DIM, generator=generator) * size
    cache.append(cache.rotary.rotate(raw_k, torch.arange(count)), values)  # keys arrive rotated, as a step gives them
    return cache, raw_k, values


@pytest.mark.parametrize("scratch", [256 << 20, 1])  # every layer at once, or one head at a time
def test_an_int8_cache_stores_keys_unrotated_and_a_compaction_only_gathers_them(scratch: int, monkeypatch) -> None:
    """A write turns the keys back from their slots and rounds them once; a compaction gathers codes
    and scales (bit for bit: nothing is rounded again); read back and turned by the read tables,
    the kept keys are the float cache's keys at their new slots to within that one rounding."""
    from ros_infmllm.cache.kv_codes import quantize_rows, read_keys

    monkeypatch.setattr("ros_infmllm.cache.kv_cache.MOVE_SCRATCH_BYTES", scratch)
    cache, raw_k, values = _int8_filled(12)
    assert cache.k.dtype == cache.v.dtype == torch.int8
    codes, scale = quantize_rows(raw_k)
    assert float((cache.k[:, :, :12].int() - codes.int()).abs().max()) <= 1  # float turn-back, then rounding
    assert torch.equal(cache.v[:, :, :12], quantize_rows(values)[0])
    before = [t.clone() for t in (cache.k, cache.k_scale, cache.v, cache.v_scale)]
    keep = _per_head_subsets(12, 7)
    cache.compact(keep)
    gather = keep.unsqueeze(-1).expand(-1, -1, -1, DIM)
    for now, was in zip((cache.k, cache.k_scale, cache.v, cache.v_scale), before):
        index = gather if now.dim() == 4 else keep
        assert torch.equal(now[:, :, :7], torch.gather(was[:, :, :12], 2, index))
    read = read_keys(cache.k, cache.k_scale, cache.read_cos, cache.read_sin, torch.float32)[:, :, :7]
    exact = cache.rotary.rotate(torch.gather(raw_k, 2, gather), torch.arange(7))  # a float cache's kept keys
    bound = 2 ** 0.5 * cache.k_scale[:, :, :7].unsqueeze(-1) * (0.5 + 1e-3)  # half a step in each of a pair
    assert bool(((read - exact).abs() <= bound).all())
    assert cache.int8_cache[2].shape == (16, DIM // 2)
    assert cache.read_cos.dtype == torch.float16  # the read tables (kv_codes.read_tables), 2 bytes an entry
    assert cache.nbytes == 2 * cache.k.numel() + 2 * 4 * cache.k_scale.numel() + 2 * 2 * 16 * DIM // 2


def test_an_int8_merge_averages_the_dequantized_unrotated_rows() -> None:
    """LOOK-M merging on an int8 cache: the float cache's merge of the same dequantized rows held
    as stored (keys unrotated), rounded once more."""
    from ros_infmllm.cache.kv_codes import dequantize_rows, quantize_rows

    packed = BoundedKVCache(LAYERS, HEADS, 16, DIM, Rotary(DIM, 10000.0), kv_dtype="int8")
    generator = torch.Generator().manual_seed(6)
    keys, values = (torch.randn(LAYERS, HEADS, 12, DIM, generator=generator) for _ in range(2))
    packed.append(keys[:, :, :4], values[:, :, :4])
    packed.append(keys[:, :, 4:], values[:, :, 4:], visual=True)
    plain = _cache(16)  # the same stored rows, in float: its merge sees what the int8 one sees
    plain.append(dequantize_rows(packed.k, packed.k_scale, torch.float32)[:, :, :4],
                 dequantize_rows(packed.v, packed.v_scale, torch.float32)[:, :, :4])
    plain.append(dequantize_rows(packed.k, packed.k_scale, torch.float32)[:, :, 4:12],
                 dequantize_rows(packed.v, packed.v_scale, torch.float32)[:, :, 4:12], visual=True)
    codes_before = packed.v.clone()
    keep = _per_head_subsets(12, 5, seed=7)
    packed.compact(keep, merge=True)
    plain.compact(keep, merge=True)
    gathered = torch.gather(codes_before, 2, keep.unsqueeze(-1).expand(-1, -1, -1, DIM))
    assert not torch.equal(packed.v[:, :, :5], gathered)  # something merged
    assert torch.equal(packed.v[:, :, :5], quantize_rows(plain.v[:, :, :5])[0])
    # the float cache turned its kept keys by their shift; the int8 one keeps them as stored
    stored = plain.rotary.rotate(plain.k[:, :, :5], keep - torch.arange(5))
    assert float((packed.k[:, :, :5].int() - quantize_rows(stored)[0].int()).abs().max()) <= 1  # float turn-back


def test_an_unknown_cache_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8': choose from model, int8"):
        BoundedKVCache(LAYERS, HEADS, 16, DIM, Rotary(DIM, 10000.0), kv_dtype="fp8")
