"""Triton kernels of one decode token's attention over a bounded cache (flash-decoding), with the
attention mass an eviction policy reads. Imported only where Triton is installed (decode_attention.py
wraps them in a torch op).

Why: at decode the attention over the C cache slots is a few megabytes per layer, yet done with
matrix products and a separate softmax it costs about six small kernels per layer, each reading or
writing the C scores; those launches, not the bytes, bounded the step. Two kernels do it here:

1. ``partial_attention``, grid (KV head, split): each program scores its slice of slots for every
   query head of its group (one matrix product, the heads padded to the 16 rows a dot needs),
   keeps a running max, sum and weighted value sum (flash attention), and stores the raw scores
   when the mass is wanted.
2. ``combine_attention``, grid (KV head, group heads + slot blocks): merges the splits with the
   new token's own score into the softmax's max and sum per head, in parallel: a program per
   query head writes its output, a program per block of slots turns its scores into
   probabilities summed over the group's heads (the mass). No program loops over the splits
   (a serial merge in one program cost more than the whole partial pass). Where asked
   (``X8_GROUP``), an output program also rounds its head's output to the int8 codes o_proj's
   product reads, so that product needs no rounding launch of its own.

An int8 cache's partial pass is ``decode_kernels_int8.partial_attention_codes``; it writes the same
partials, so the combine pass serves both.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .matvec_dp4a import store_group_codes


@triton.jit
def partial_attention(q_ptr, k_ptr, v_ptr, valid_ptr, scores_ptr, max_ptr, sum_ptr, acc_ptr, capacity, scale,
                      SPLIT_LEN: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
                      BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, WITH_SCORES: tl.constexpr, IEEE: tl.constexpr,
                      PDL: tl.constexpr):
    """Over a cache holding the keys (rotated) and values in q's dtype; an int8 cache's pass is
    decode_kernels_int8.py's."""
    if PDL:  # see matvec_kernels.py: the next launch may start placing programs during our last wave
        tl.extra.cuda.gdc_launch_dependents()
    head, split, q_rows, row_ok, first, end = split_of_program(capacity, SPLIT_LEN, GROUP, GROUP_PAD)
    running_max, running_sum, acc = empty_split(GROUP_PAD, DIM)
    dims = tl.arange(0, DIM)
    base = head.to(tl.int64) * capacity * DIM
    # The cache and its validity are no output of this step's launches: the first block of keys is
    # requested before waiting for the launch that wrote q; then each block one step ahead.
    k = _key_block(k_ptr, base, first + tl.arange(0, BLOCK), end, dims, DIM)
    if PDL:
        tl.extra.cuda.gdc_wait()
    q = tl.load(q_ptr + q_rows[:, None] * DIM + dims[None, :], mask=row_ok[:, None], other=0.0)
    for offset in range(0, SPLIT_LEN, BLOCK):
        slots = first + offset + tl.arange(0, BLOCK)
        in_range = slots < capacity
        keep = tl.load(valid_ptr + slots, mask=in_range, other=0) != 0
        next_k = _key_block(k_ptr, base, slots + BLOCK, end, dims, DIM)
        scores = tl.where(keep[None, :], _scores(q, k, IEEE) * scale, float("-inf"))
        if WITH_SCORES:
            tl.store(scores_ptr + q_rows[:, None] * capacity + slots[None, :], scores,
                     mask=row_ok[:, None] & in_range[None, :])
        running_max, rescale, probs, running_sum = softmax_step(scores, running_max, running_sum)
        v = tl.load(v_ptr + base + slots[:, None] * DIM + dims[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * rescale[:, None] + weighted_values(probs, v, IEEE)
        k = next_k
    store_partials(max_ptr, sum_ptr, acc_ptr, q_rows * NUM_SPLITS + split, row_ok, running_max, running_sum, acc, DIM)


@triton.jit
def split_of_program(capacity, SPLIT_LEN: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr):
    """This program's KV head and split (grid axes 0 and 1), its query rows (``GROUP_PAD``, those
    from ``GROUP`` on padding) and the split's first and end slot."""
    head = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, GROUP_PAD)
    first = split * SPLIT_LEN
    return head, split, head * GROUP + rows, rows < GROUP, first, tl.minimum(capacity, first + SPLIT_LEN)


@triton.jit
def empty_split(GROUP_PAD: tl.constexpr, DIM: tl.constexpr):
    """The running max, sum and weighted values per query row before any slot."""
    return (tl.full([GROUP_PAD], float("-inf"), tl.float32), tl.zeros([GROUP_PAD], tl.float32),
            tl.zeros([GROUP_PAD, DIM], tl.float32))


@triton.jit
def softmax_step(scores, running_max, running_sum):
    """A tile's scores ``[rows, BLOCK]`` folded into the running max and sum per row (flash
    attention): the new max, the factor that rescales what was summed before, the tile's
    probabilities against the new max, and the new sum."""
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a block with no valid slot yet
    rescale = tl.exp(running_max - shift)
    probs = tl.exp(scores - shift[:, None])
    return new_max, rescale, probs, running_sum * rescale + tl.sum(probs, 1)


@triton.jit
def store_partials(max_ptr, sum_ptr, acc_ptr, partial, row_ok, running_max, running_sum, acc, DIM: tl.constexpr):
    """A split's max, sum and weighted values per query row (``partial``: the rows' indices among
    the (query head, split) pairs), what the combine pass reads."""
    tl.store(max_ptr + partial, running_max, mask=row_ok)
    tl.store(sum_ptr + partial, running_sum, mask=row_ok)
    tl.store(acc_ptr + partial[:, None] * DIM + tl.arange(0, DIM)[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _key_block(k_ptr, base, slots, end, columns, DIM: tl.constexpr):
    """The ``columns`` of the keys of ``slots`` (those from ``end`` on read as zeros, without a
    memory access)."""
    return tl.load(k_ptr + base + slots[:, None] * DIM + columns[None, :], mask=(slots < end)[:, None], other=0.0)


@triton.jit
def _scores(q, k, IEEE: tl.constexpr):
    """``q [rows, DIM]`` against ``k [BLOCK, DIM]``: ``[rows, BLOCK]`` float32, on tensor cores
    (also for one head per KV head, its row padded to 16: element-wise products measured slower)."""
    if IEEE:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def weighted_values(probs, v, IEEE: tl.constexpr):
    """``probs [rows, BLOCK]`` float32 times ``v [BLOCK, DIM]``: ``[rows, DIM]`` float32."""
    if IEEE:
        return tl.dot(probs.to(v.dtype), v, input_precision="ieee")
    return tl.dot(probs.to(v.dtype), v)


@triton.jit
def combine_attention(q_ptr, k_new_ptr, v_new_ptr, scores_ptr, max_ptr, sum_ptr, acc_ptr, out_ptr, mass_ptr,
                      codes_ptr, x_stats_ptr, capacity, scale,
                      GROUP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      SPLITS_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr, MASS_BLOCK: tl.constexpr,
                      PDL: tl.constexpr, X8_GROUP: tl.constexpr = 0, X8_SPLIT: tl.constexpr = False):
    """Programs ``0..GROUP-1`` of a KV head merge one query head's output each; the programs after
    them each turn ``MASS_BLOCK`` slots of scores into the group's summed probabilities.

    ``X8_GROUP`` (a divisor of ``DIM``; 0: not asked): each output program also rounds its head's
    output, as written, to the int8 codes and stats that ``matvec_dp4a.quantize_activations``
    makes of the whole output (``codes_ptr``, ``x_stats_ptr``; ``X8_SPLIT``: even elements then
    odd, for int4 weights), so the o projection needs no rounding launch: a program owns whole
    groups of the output, which the products' programs (a few rows each) do not."""
    if PDL:  # everything here reads the partial pass's output: only the launch overlaps
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    head = tl.program_id(0)
    task = tl.program_id(1)
    if task < GROUP:
        row = head * GROUP + task
        out = _merge_output(q_ptr, k_new_ptr, v_new_ptr, max_ptr, sum_ptr, acc_ptr, out_ptr, head, row,
                            scale, DIM, NUM_SPLITS, SPLITS_PAD, SPLIT_CHUNK)
        if X8_GROUP:
            _round_output(out, codes_ptr, x_stats_ptr, row, tl.num_programs(0) * GROUP * DIM, DIM, X8_GROUP, X8_SPLIT)
    else:
        _mass_block(q_ptr, k_new_ptr, scores_ptr, max_ptr, sum_ptr, mass_ptr, head, task - GROUP, capacity, scale,
                    GROUP, ROWS, DIM, NUM_SPLITS, SPLITS_PAD, MASS_BLOCK)


@triton.jit
def _softmax_totals(q, k_new, split_max, split_sum, scale):
    """Per query row of ``q [rows, DIM]`` (float32): the new token's own score (always valid), the
    softmax's max over the splits and that score, the new token's weight and the softmax's sum.
    ``split_max``, ``split_sum [rows, splits]`` (padding -inf and 0); ``k_new [DIM]`` float32."""
    new_score = tl.sum(q * k_new[None, :], 1) * scale
    overall_max = tl.maximum(tl.max(split_max, 1), new_score)
    new_prob = tl.exp(new_score - overall_max)
    total = tl.sum(split_sum * tl.exp(split_max - overall_max[:, None]), 1) + new_prob
    return overall_max, new_prob, total


@triton.jit
def _merge_output(q_ptr, k_new_ptr, v_new_ptr, max_ptr, sum_ptr, acc_ptr, out_ptr, head, row, scale,
                  DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """One query head's output: every split's weighted values and the new token's own; stored, and
    returned as stored (in the output's dtype)."""
    dims = tl.arange(0, DIM)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    q = tl.load(q_ptr + row * DIM + dims).to(tl.float32)
    split_max = tl.load(max_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    split_sum = tl.load(sum_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=0.0)
    k_new = tl.load(k_new_ptr + head * DIM + dims).to(tl.float32)
    row_max, row_new_prob, row_total = _softmax_totals(q[None, :], k_new, split_max[None, :], split_sum[None, :],
                                                       scale)
    overall_max, new_prob, total = tl.sum(row_max, 0), tl.sum(row_new_prob, 0), tl.sum(row_total, 0)  # one row
    out = new_prob * tl.load(v_new_ptr + head * DIM + dims).to(tl.float32)
    chunk = tl.arange(0, SPLIT_CHUNK)
    for first in range(0, SPLITS_PAD, SPLIT_CHUNK):
        ok = first + chunk < NUM_SPLITS
        weight = tl.exp(tl.load(max_ptr + row * NUM_SPLITS + first + chunk, mask=ok, other=float("-inf"))
                        - overall_max)
        acc = tl.load(acc_ptr + (row * NUM_SPLITS + first + chunk)[:, None] * DIM + dims[None, :],
                      mask=ok[:, None], other=0.0)
        out += tl.sum(acc * weight[:, None], 0)
    out = (out / total).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * DIM + dims, out)
    return out


@triton.jit
def _round_output(out, codes_ptr, x_stats_ptr, row, width, DIM: tl.constexpr, GROUP: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Query head ``row``'s output ``out [DIM]`` (as stored) rounded by ``store_group_codes``, the
    rounding launch's own code, as those elements of the whole output (``width`` of them): the
    codes and stats that launch would write."""
    groups = row * (DIM // GROUP) + tl.arange(0, DIM // GROUP)
    x = tl.reshape(out.to(tl.float32), (DIM // GROUP, GROUP))
    store_group_codes(x, tl.sum(x * x, axis=1), groups, groups < width // GROUP, codes_ptr, x_stats_ptr, width,
                      GROUP, SPLIT)


@triton.jit
def _mass_block(q_ptr, k_new_ptr, scores_ptr, max_ptr, sum_ptr, mass_ptr, head, block, capacity, scale,
                GROUP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                SPLITS_PAD: tl.constexpr, MASS_BLOCK: tl.constexpr):
    """The attention mass of ``MASS_BLOCK`` slots, summed over the group's query heads; block 0
    also writes the new token's own."""
    dims = tl.arange(0, DIM)
    splits = tl.arange(0, SPLITS_PAD)
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    q_rows = head * GROUP + rows
    q = tl.load(q_ptr + q_rows[:, None] * DIM + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    idx = q_rows[:, None] * NUM_SPLITS + splits[None, :]
    ok = row_ok[:, None] & (splits < NUM_SPLITS)[None, :]
    overall_max, new_prob, total = _softmax_totals(
        q, tl.load(k_new_ptr + head * DIM + dims).to(tl.float32), tl.load(max_ptr + idx, mask=ok, other=float("-inf")),
        tl.load(sum_ptr + idx, mask=ok, other=0.0), scale)
    slots = block * MASS_BLOCK + tl.arange(0, MASS_BLOCK)
    in_range = slots < capacity
    scores = tl.load(scores_ptr + q_rows[:, None] * capacity + slots[None, :],
                     mask=row_ok[:, None] & in_range[None, :], other=float("-inf"))
    probs = tl.exp(scores - overall_max[:, None]) / total[:, None]
    tl.store(mass_ptr + head * (capacity + 1) + slots, tl.sum(probs, 0), mask=in_range)
    if block == 0:
        tl.store(mass_ptr + head * (capacity + 1) + capacity, tl.sum(tl.where(row_ok, new_prob / total, 0.0), 0))
