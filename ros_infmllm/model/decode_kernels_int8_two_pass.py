"""The int8 cache's partial pass where each KV head serves one query head (LLaMA-2-7B, SmolVLM2), in
two passes over a program's split: the keys first (scores written out, their max kept), then the
values weighted by probabilities against that max. The combine pass is decode_kernels.py's.

Why a kernel of its own: decode_kernels_int8.py's pass scores a tile with a tensor-core dot, which
pads the one query row to 16 rows, and folds each tile into a running softmax, so its registers
hold a padded score tile, a padded ``[16, DIM]`` accumulator, the key halves, their tables and the
value tile at once (about 200-255 per thread at the 7B shape: two programs per SM, a latency-bound
pass that took longer than the float pass over twice its bytes; docs/quantized_weights.md). Here:

- scores are row sums of element-wise products (no padding: one query row);
- with the max known before the values are read, no tile is ever rescaled: the values pass adds
  ``probability x value`` into a ``[BLOCK, DIM]`` float32 tile and sums its rows once at the end;
- each loop holds only its own stream (codes, scales and table rows of keys; codes and scales of
  values), which Triton copies into shared memory ahead of use (``num_stages``);
- a split of one tile (the shipped 7B shape: 128 slots, 32 splits per head at 4,096 slots) has its
  keys requested before the wait for the launch that wrote q (``KEYS_EARLY``; the 7B int4 step on
  an H100 2.413 -> 2.383 ms, benchmarks/results/decode_keys_early_7b_h100.md), then goes through
  the values loop. Reading it in one go (keys and values requested at once, the softmax exact
  in registers), several KV heads per program sharing the table rows, and keys turned by angle sums
  of a tile's first table row were each slower on an H100 or no faster in the whole step
  (benchmarks/results/decode_two_pass_variants_h100.md) and were removed; so was a tile read a slice
  of the head at a time (16 key halves, 32 value dimensions per step: half the registers, twice the
  programs per SM, but about 2,800 instructions per thread against 1,739), whose 7B int4 step took
  3.231 ms against 2.406, and value codes taken as float32 32,768 + (code + 128) by one byte permute
  each, the offset leaving the split's sum once (1,648 instructions per thread against 1,739), whose
  step took 2.389 / 2.391 ms against 2.390 / 2.389 (benchmarks/results/decode_round_written_h100.md).

Across tiles the scores go through the scores buffer (``[heads, C]`` float32, which the mass reads
anyway), a 4-byte read per 128-byte value row. Keys are turned in float16 pairs from 16-bit q as in
decode_kernels_int8.py; the products and their sums are float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode_kernels_int8 import codes_to_half, tile_keys, turned_keys


@triton.jit
def partial_attention_codes_two_pass(q_ptr, k_ptr, v_ptr, valid_ptr, scores_ptr, max_ptr, sum_ptr, acc_ptr,
                                     k_scale_ptr, v_scale_ptr, cos_ptr, sin_ptr, capacity, scale,
                                     SPLIT_LEN: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                                     NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                                     VALID_WORDS: tl.constexpr, STAGES: tl.constexpr, KEYS_EARLY: tl.constexpr):
    """``decode_kernels_int8.partial_attention_codes`` for one query head per KV head (program =
    (head, split)): writes the scores of every slot of the split to ``scores_ptr`` ``[heads, C]``
    (-inf where a slot is empty; the values pass reads them back, the combine's mass too) and the
    split's max, sum and weighted values, as that pass does.

    ``KEYS_EARLY`` (a split of one tile, ``SPLIT_LEN == BLOCK``): the tile's key codes, table rows,
    scales and validity are requested before waiting for the launch that wrote q. No launch of a
    decode step writes them (the caller appends the step's K/V after it), so a program placed during
    the q/k/v product's last wave has its keys on the way when q is ready."""
    if PDL:  # see matvec_kernels.py: the next launch may start placing programs during our last wave
        tl.extra.cuda.gdc_launch_dependents()
    head = tl.program_id(0)
    split = tl.program_id(1)
    first = split * SPLIT_LEN
    end = tl.minimum(capacity, first + SPLIT_LEN)
    halves = tl.arange(0, DIM // 2)
    dims = tl.arange(0, DIM)
    base = head.to(tl.int64) * capacity * DIM
    row_base = head.to(tl.int64) * capacity
    if KEYS_EARLY:  # the one tile's keys, before the wait (nothing before us in the step writes them)
        tl.static_assert(SPLIT_LEN == BLOCK)
        slots, live, keep, front, back, cos, sin, k_scale = tile_keys(
            k_ptr, valid_ptr, cos_ptr, sin_ptr, k_scale_ptr, base, row_base, first, end, BLOCK, DIM, VALID_WORDS)
    if PDL:
        tl.extra.cuda.gdc_wait()
    q_front = tl.load(q_ptr + head * DIM + halves).to(tl.float32)
    q_back = tl.load(q_ptr + head * DIM + DIM // 2 + halves).to(tl.float32)
    if KEYS_EARLY:
        best = _scores(q_front, q_back, keep, front, back, cos, sin, k_scale, scale, IEEE)
        tl.store(scores_ptr + row_base + slots, best, mask=live)
    else:
        best = tl.full([BLOCK], float("-inf"), tl.float32)  # the max so far at each tile position
        # keys: later tiles copied into shared memory while this one is scored (a loop without a dot is
        # pipelined only where its stages are given, as tl.range does)
        for offset in tl.range(0, SPLIT_LEN, BLOCK, num_stages=STAGES):
            slots, live, keep, front, back, cos, sin, k_scale = tile_keys(
                k_ptr, valid_ptr, cos_ptr, sin_ptr, k_scale_ptr, base, row_base, first + offset, end, BLOCK, DIM,
                VALID_WORDS)
            scores = _scores(q_front, q_back, keep, front, back, cos, sin, k_scale, scale, IEEE)
            tl.store(scores_ptr + row_base + slots, scores, mask=live)
            best = tl.maximum(best, scores)
    split_max = tl.max(best, 0)
    shift = tl.where(split_max == float("-inf"), 0.0, split_max)  # a split with no valid slot
    tl.debug_barrier()  # the scores written above, by whichever thread, are read below
    weighted = tl.zeros([BLOCK, DIM], tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for offset in tl.range(0, SPLIT_LEN, BLOCK, num_stages=STAGES):  # values: no tile rescaled, the max known
        slots = first + offset + tl.arange(0, BLOCK)
        live = slots < end
        scores = tl.load(scores_ptr + row_base + slots, mask=live, other=float("-inf"))
        probs = tl.exp(scores - shift)
        total += probs
        v = tl.load(v_ptr + base + slots[:, None] * DIM + dims[None, :], mask=live[:, None], other=0)
        v_scale = tl.load(v_scale_ptr + row_base + slots, mask=live, other=0.0)
        weighted += (probs * v_scale)[:, None] * _codes_as_float(v, IEEE)
    split_sum = tl.sum(total, 0)
    acc = tl.sum(weighted, 0)
    partial = head * NUM_SPLITS + split
    tl.store(max_ptr + partial, split_max)
    tl.store(sum_ptr + partial, split_sum)
    tl.store(acc_ptr + partial * DIM + dims, acc)


@triton.jit
def _scores(q_front, q_back, keep, front, back, cos, sin, k_scale, scale, IEEE: tl.constexpr):
    """Scaled scores ``[BLOCK]`` of q (as its halves, float32) against a key tile as ``key_tile``
    reads it (codes as their halves, the slots' table rows and row scales), each key turned to its
    slot; -inf where ``keep`` is False (a slot empty or past the split's end)."""
    turned_front, turned_back = turned_keys(front, back, cos, sin, IEEE)
    raw = tl.sum(turned_front.to(tl.float32) * q_front[None, :] + turned_back.to(tl.float32) * q_back[None, :], 1)
    return tl.where(keep, raw * (k_scale * scale), float("-inf"))


@triton.jit
def _codes_as_float(codes, IEEE: tl.constexpr):
    """int8 codes as float32 (through float16's byte permute on a GPU, see codes_to_half)."""
    if IEEE:
        return codes.to(tl.float32)
    return codes_to_half(codes).to(tl.float32)
