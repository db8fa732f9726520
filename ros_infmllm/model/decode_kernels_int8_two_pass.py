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
- with ``ONE_TILE`` (``DecodeKernelTuning.two_pass_one_tile``, off: not yet timed on a GPU), a split
  of one tile (the shipped 7B shape: 128 slots, 33 splits per head at 4,096 slots) is read in one
  go: keys and values requested at once, the softmax exact in registers, no scores written unless
  the mass asks for them (compiled for sm_90 both hold 124-126 registers per thread at the shipped shape:
  benchmarks/results/attention_registers_two_pass.md; what differs is when the values are requested);
- with ``HEADS`` > 1 (``DecodeKernelTuning.two_pass_heads``, 1: not yet timed) a program walks that many
  KV heads over its split. Read in one go, the split's validity and table rows are read once for all
  of them: the tables are as many bytes as the key codes and the same for every head, so one head per
  program reads them from L2 32 times per 7B call (the turn's table reads measured about 7.5 us of
  the first int8 pass's 36.6 on an H200: results/decode_attention_kv8_turn_cost_h200.md).

Across tiles the scores go through the scores buffer (``[heads, C]`` float32, which the mass reads
anyway), a 4-byte read per 128-byte value row. Keys are turned in float16 pairs from 16-bit q as in
decode_kernels_int8.py; the products and their sums are float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode_kernels_int8 import codes_to_half, key_halves, key_tile, slot_validity, table_rows, turned_keys


@triton.jit
def partial_attention_codes_two_pass(q_ptr, k_ptr, v_ptr, valid_ptr, scores_ptr, max_ptr, sum_ptr, acc_ptr,
                                     k_scale_ptr, v_scale_ptr, cos_ptr, sin_ptr, capacity, scale,
                                     SPLIT_LEN: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                                     NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                                     WITH_SCORES: tl.constexpr, VALID_WORDS: tl.constexpr, STAGES: tl.constexpr,
                                     ONE_TILE: tl.constexpr, HEADS: tl.constexpr, ANGLE_SUM: tl.constexpr = False):
    """``decode_kernels_int8.partial_attention_codes`` for one query head per KV head (program =
    (group of ``HEADS`` KV heads, split)): writes each head's split max, sum and weighted values, as
    that pass does, and the scores of every slot of the split to ``scores_ptr`` ``[heads, C]`` (-inf
    where a slot is empty) where ``WITH_SCORES`` or a split spans several tiles (the values pass
    reads them back). ``ONE_TILE``: a split of one tile is read in one go (keys and values at once),
    its validity and table rows read once for the program's heads; else in two loops per head."""
    if PDL:  # see matvec_kernels.py: the next launch may start placing programs during our last wave
        tl.extra.cuda.gdc_launch_dependents()
    first_head = tl.program_id(0) * HEADS
    split = tl.program_id(1)
    first = split * SPLIT_LEN
    end = tl.minimum(capacity, first + SPLIT_LEN)
    dims = tl.arange(0, DIM)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if ONE_TILE and SPLIT_LEN == BLOCK:  # keys and values requested at once, the softmax exact in registers
        slots = first + tl.arange(0, BLOCK)
        live = slots < end
        keep = slot_validity(valid_ptr, slots, live, VALID_WORDS)
        cos, sin = _turn_rows(cos_ptr, sin_ptr, first, slots, live, capacity, DIM, ANGLE_SUM)  # the same for every head
        for h in tl.static_range(HEADS):
            head = first_head + h
            base = head.to(tl.int64) * capacity * DIM
            row_base = head.to(tl.int64) * capacity
            v = tl.load(v_ptr + base + slots[:, None] * DIM + dims[None, :], mask=live[:, None], other=0)
            v_scale = tl.load(v_scale_ptr + row_base + slots, mask=live, other=0.0)
            front, back = key_halves(k_ptr, base, slots, live, DIM)
            k_scale = tl.load(k_scale_ptr + row_base + slots, mask=live, other=0.0)
            q_front, q_back = _query_halves(q_ptr, head, DIM)
            scores = _scores(q_front, q_back, front, back, cos, sin, k_scale, keep, scale, IEEE)
            if WITH_SCORES:
                tl.store(scores_ptr + row_base + slots, scores, mask=live)
            split_max = tl.max(scores, 0)
            probs = tl.exp(scores - tl.where(split_max == float("-inf"), 0.0, split_max))
            acc = tl.sum((probs * v_scale)[:, None] * _codes_as_float(v, IEEE), 0)
            _store_partial(max_ptr, sum_ptr, acc_ptr, head * NUM_SPLITS + split, split_max, tl.sum(probs, 0), acc,
                           DIM)
    else:
        for h in tl.static_range(HEADS):
            head = first_head + h
            q_front, q_back = _query_halves(q_ptr, head, DIM)
            base = head.to(tl.int64) * capacity * DIM
            row_base = head.to(tl.int64) * capacity
            best = tl.full([BLOCK], float("-inf"), tl.float32)  # the max so far at each tile position
            # keys: later tiles copied into shared memory while this one is scored (a loop without a dot is
            # pipelined only where its stages are given, as tl.range does)
            for offset in tl.range(0, SPLIT_LEN, BLOCK, num_stages=STAGES):
                slots = first + offset + tl.arange(0, BLOCK)
                live = slots < end
                keep = slot_validity(valid_ptr, slots, live, VALID_WORDS)
                if ANGLE_SUM:
                    front, back = key_halves(k_ptr, base, slots, live, DIM)
                    cos, sin = _turn_rows(cos_ptr, sin_ptr, first + offset, slots, live, capacity, DIM, True)
                    k_scale = tl.load(k_scale_ptr + row_base + slots, mask=live, other=0.0)
                else:
                    front, back, cos, sin, k_scale = key_tile(k_ptr, cos_ptr, sin_ptr, k_scale_ptr, base, row_base,
                                                              slots, live, DIM)
                scores = _scores(q_front, q_back, front, back, cos, sin, k_scale, keep, scale, IEEE)
                tl.store(scores_ptr + row_base + slots, scores, mask=live)
                best = tl.maximum(best, scores)
            split_max = tl.max(best, 0)
            shift = tl.where(split_max == float("-inf"), 0.0, split_max)  # a split with no valid slot
            tl.debug_barrier()  # the scores written above, by whichever thread, are read below
            weighted = tl.zeros([BLOCK, DIM], tl.float32)
            total = tl.zeros([BLOCK], tl.float32)
            for offset in tl.range(0, SPLIT_LEN, BLOCK, num_stages=STAGES):  # values: no tile rescaled, max known
                slots = first + offset + tl.arange(0, BLOCK)
                live = slots < end
                scores = tl.load(scores_ptr + row_base + slots, mask=live, other=float("-inf"))
                probs = tl.exp(scores - shift)
                total += probs
                v = tl.load(v_ptr + base + slots[:, None] * DIM + dims[None, :], mask=live[:, None], other=0)
                v_scale = tl.load(v_scale_ptr + row_base + slots, mask=live, other=0.0)
                weighted += (probs * v_scale)[:, None] * _codes_as_float(v, IEEE)
            _store_partial(max_ptr, sum_ptr, acc_ptr, head * NUM_SPLITS + split, split_max, tl.sum(total, 0),
                           tl.sum(weighted, 0), DIM)


@triton.jit
def _turn_rows(cos_ptr, sin_ptr, tile_first, slots, live, capacity, DIM: tl.constexpr, ANGLE_SUM: tl.constexpr):
    """The cos / sin ``[BLOCK, DIM / 2]`` that turn the keys of ``slots`` (a tile from
    ``tile_first`` on): their table rows, or (``ANGLE_SUM``, 16-bit math) the angle sums of the tile's
    first row and rows ``0..BLOCK-1``, the turn from a tile's first slot to each of its slots, which
    are the same rows for every tile and head: one table row per tile instead of ``BLOCK``, the rest
    read where the SM's L1 may hold them (slot j is position j, so row r of the tables turns by r)."""
    if ANGLE_SUM:
        halves = tl.arange(0, DIM // 2)
        row_ok = tile_first + 0 * halves < capacity  # a tile past the cache's end (its slots are not live)
        first_cos = tl.load(cos_ptr + tile_first * (DIM // 2) + halves, mask=row_ok, other=1.0)
        first_sin = tl.load(sin_ptr + tile_first * (DIM // 2) + halves, mask=row_ok, other=0.0)
        steps = (slots - tile_first)[:, None] * (DIM // 2) + halves[None, :]
        step_cos = tl.load(cos_ptr + steps, mask=live[:, None], other=1.0, cache_modifier=".ca")
        step_sin = tl.load(sin_ptr + steps, mask=live[:, None], other=0.0, cache_modifier=".ca")
        cos = first_cos[None, :] * step_cos - first_sin[None, :] * step_sin
        sin = first_sin[None, :] * step_cos + first_cos[None, :] * step_sin
    else:
        cos, sin = table_rows(cos_ptr, sin_ptr, slots, live, DIM)
    return cos, sin


@triton.jit
def _store_partial(max_ptr, sum_ptr, acc_ptr, partial, split_max, split_sum, acc, DIM: tl.constexpr):
    """One (head, split)'s max, probability sum and weighted values ``[DIM]``, as the combine pass reads them."""
    tl.store(max_ptr + partial, split_max)
    tl.store(sum_ptr + partial, split_sum)
    tl.store(acc_ptr + partial * DIM + tl.arange(0, DIM), acc)


@triton.jit
def _query_halves(q_ptr, head, DIM: tl.constexpr):
    """``head``'s q as its rotate-half halves ``[DIM / 2]``, float32."""
    halves = tl.arange(0, DIM // 2)
    return (tl.load(q_ptr + head * DIM + halves).to(tl.float32),
            tl.load(q_ptr + head * DIM + DIM // 2 + halves).to(tl.float32))


@triton.jit
def _scores(q_front, q_back, front, back, cos, sin, k_scale, keep, scale, IEEE: tl.constexpr):
    """Scaled scores ``[BLOCK]`` of q (as its halves, float32) against key codes given as their
    halves, each turned to its slot by its table rows; -inf where not ``keep``."""
    turned_front, turned_back = turned_keys(front, back, cos, sin, IEEE)
    raw = tl.sum(turned_front.to(tl.float32) * q_front[None, :] + turned_back.to(tl.float32) * q_back[None, :], 1)
    return tl.where(keep, raw * (k_scale * scale), float("-inf"))


@triton.jit
def _codes_as_float(codes, IEEE: tl.constexpr):
    """int8 codes as float32 (through float16's byte permute on a GPU, see codes_to_half)."""
    if IEEE:
        return codes.to(tl.float32)
    return codes_to_half(codes).to(tl.float32)
