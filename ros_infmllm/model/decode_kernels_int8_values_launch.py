"""The int8 cache's attention where each KV head serves one query head and a split is one tile, as
two launches that replace the two-pass kernel and the combine: a keys launch, then a values launch
that merges the splits itself.

Why: the two-pass kernel (decode_kernels_int8_two_pass.py) requests its value codes only once its
keys are scored, so each of its programs waits on memory twice, and ncu found that pass
latency-bound (0.66 of 3.56 warps ready per scheduler, DRAM 54%; results/decode_l2_prefetch_h100.md).
Requesting the values with the keys held both tiles in registers and was slower. Here the values
are requested by a launch of their own, before it waits on the keys launch: a decode step never
writes the cache, so with dependent launches its programs, placed as the keys launch's programs
retire, load their values while that launch finishes. Each launch holds one tile, not two.

1. ``tile_key_weights``, grid (KV head, split): keys (codes, table rows, scales, validity) requested
   before the wait for q; then the tile's scores, its max ``m`` and the weights ``exp(score - m)``
   (0 where a slot is empty), stored with their sum ``l``.
2. ``tile_values_merged``, grid (KV head, split): value codes and scales requested before the wait;
   then the softmax's max ``M`` and sum ``S`` over every split's ``(m, l)`` and the token's own
   score, so each slot's probability is its weight times ``exp(m - M) / S``: stored as the mass
   where asked (the combine's mass programs did this from the scores), and weighing the values. The
   program of split 0 adds the token's own value. Each program stores its weighted sum and counts
   itself in on its head's arrival counter; the head's last program sums the splits' (a reduction over
   the split index, so the output does not depend on which program arrived last), stores the output,
   rounds it for o_proj where asked (as the combine does) and sets the counter to 0 for the next call.

The weights go through the scores buffer (``[heads, C]`` float32), as the two-pass kernel's scores do.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode_kernels import round_output, softmax_totals
from .decode_kernels_int8 import tile_keys
from .decode_kernels_int8_two_pass import codes_as_float, turned_tile_scores


@triton.jit
def tile_key_weights(q_ptr, k_ptr, valid_ptr, weights_ptr, max_ptr, sum_ptr, k_scale_ptr, cos_ptr, sin_ptr, capacity,
                     scale, DIM: tl.constexpr, BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
                     PDL: tl.constexpr, VALID_WORDS: tl.constexpr):
    """Program (head, split): the split's ``BLOCK`` slots scored against q, its max ``m`` (-inf where
    no slot holds a token), ``exp(score - m)`` per slot (0 where empty) and their sum ``l``."""
    if PDL:  # the values launch may start placing programs during our last wave
        tl.extra.cuda.gdc_launch_dependents()
    head = tl.program_id(0)
    split = tl.program_id(1)
    first = split * BLOCK
    row_base = head.to(tl.int64) * capacity
    slots, live, keep, front, back, cos, sin, k_scale = tile_keys(
        k_ptr, valid_ptr, cos_ptr, sin_ptr, k_scale_ptr, row_base * DIM, row_base, first,
        tl.minimum(capacity, first + BLOCK), BLOCK, DIM, VALID_WORDS)
    if PDL:  # the keys above are the cache's: only q is the launch before's
        tl.extra.cuda.gdc_wait()
    halves = tl.arange(0, DIM // 2)
    q_front = tl.load(q_ptr + head * DIM + halves).to(tl.float32)
    q_back = tl.load(q_ptr + head * DIM + DIM // 2 + halves).to(tl.float32)
    scores = turned_tile_scores(q_front, q_back, keep, front, back, cos, sin, k_scale, scale, IEEE)
    split_max = tl.max(scores, 0)
    weights = tl.exp(scores - tl.where(split_max == float("-inf"), 0.0, split_max))  # 0 where empty
    tl.store(weights_ptr + row_base + slots, weights, mask=live)
    tl.store(max_ptr + head * NUM_SPLITS + split, split_max)
    tl.store(sum_ptr + head * NUM_SPLITS + split, tl.sum(weights, 0))


@triton.jit
def tile_values_merged(q_ptr, k_new_ptr, v_new_ptr, v_ptr, weights_ptr, max_ptr, sum_ptr, acc_ptr, out_ptr, mass_ptr,
                       codes_ptr, x_stats_ptr, arrivals_ptr, v_scale_ptr, capacity, scale, DIM: tl.constexpr,
                       BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, IEEE: tl.constexpr,
                       PDL: tl.constexpr, WITH_MASS: tl.constexpr, X8_GROUP: tl.constexpr, X8_SPLIT: tl.constexpr):
    """Program (head, split): the split's probabilities (the mass, where ``WITH_MASS``) and weighted
    values; the head's last program to arrive merges the splits into the output (and its int8
    codes for o_proj where ``X8_GROUP``; see ``combine_attention``)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    head = tl.program_id(0)
    split = tl.program_id(1)
    slots = split * BLOCK + tl.arange(0, BLOCK)
    live = slots < capacity
    dims = tl.arange(0, DIM)
    row_base = head.to(tl.int64) * capacity
    # the values before the wait: no launch of a decode step writes the cache
    v = tl.load(v_ptr + row_base * DIM + slots[:, None] * DIM + dims[None, :], mask=live[:, None], other=0)
    v_scale = tl.load(v_scale_ptr + row_base + slots, mask=live, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    split_max = tl.load(max_ptr + head * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    split_sum = tl.load(sum_ptr + head * NUM_SPLITS + splits, mask=split_ok, other=0.0)
    q = tl.load(q_ptr + head * DIM + dims).to(tl.float32)
    k_new = tl.load(k_new_ptr + head * DIM + dims).to(tl.float32)
    row_max, row_new_prob, row_total = softmax_totals(q[None, :], k_new, split_max[None, :], split_sum[None, :],
                                                      scale)
    overall_max, total = tl.sum(row_max, 0), tl.sum(row_total, 0)  # one row each
    own_max = tl.max(tl.where(splits == split, split_max, float("-inf")), 0)
    factor = tl.where(own_max == float("-inf"), 0.0, tl.exp(own_max - overall_max)) / total
    probs = tl.load(weights_ptr + row_base + slots, mask=live, other=0.0) * factor
    mass_row = mass_ptr + head * (capacity + 1)
    if WITH_MASS:
        tl.store(mass_row + slots, probs, mask=live)
    acc = tl.sum((probs * v_scale)[:, None] * codes_as_float(v, IEEE), 0)
    if split == 0:  # the token's own key and value
        new_prob = tl.sum(row_new_prob, 0) / total
        acc += new_prob * tl.load(v_new_ptr + head * DIM + dims).to(tl.float32)
        if WITH_MASS:
            tl.store(mass_row + capacity, new_prob)
    tl.store(acc_ptr + (head * NUM_SPLITS + split) * DIM + dims, acc)
    tl.debug_barrier()  # every thread's sums stored before the program counts itself in (release)
    arrived = tl.atomic_add(arrivals_ptr + head, 1, sem="acq_rel", scope="gpu")
    if arrived == NUM_SPLITS - 1:  # the head's last program: the others' sums are visible (acquire)
        accs = tl.load(acc_ptr + (head * NUM_SPLITS + splits)[:, None] * DIM + dims[None, :], mask=split_ok[:, None],
                       other=0.0, cache_modifier=".cg")
        out = tl.sum(accs, 0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + head * DIM + dims, out)
        if X8_GROUP:
            round_output(out, codes_ptr, x_stats_ptr, head, tl.num_programs(0) * DIM, DIM, X8_GROUP, X8_SPLIT)
        tl.store(arrivals_ptr + head, 0)
