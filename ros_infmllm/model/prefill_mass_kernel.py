"""Triton kernels for the attention mass of a whole prefill chunk, without its probability matrix.

Why: ``h2o`` (and every policy whose window is the whole chunk) scores each cache slot by the
attention every query of a chunk pays it. The decoder's explicit path gets that from a
materialised ``[heads, queries, slots]`` float32 softmax, so such a chunk cannot take the fused
attention kernels: on an H200 a frame's prefill then spent two slow batched products and four
passes over that matrix per layer where the fused path spends one kernel (frame ingest 2.6x
``streamingllm``'s). Here the output comes from the fused attention as for other policies, and
these kernels add the mass, writing no score matrix:

- ``row_stats`` (only where the attention kernel gives no log-sum-exp): per query row and key
  split, the softmax's running max and sum over that split's keys (``[kv_heads, rows, splits]``),
  combined into each row's log-sum-exp by the caller;
- ``mass_by_key``: each program holds one block of keys and walks the query rows, adding
  ``exp(s - lse)`` into a ``[rows, keys]`` register tile element by element and summing it over the
  rows once at the end. The first version walked keys per row block and summed over rows at every
  step (a cross-warp reduction per tile): 88 us a layer on Qwen2.5-VL-3B's frame on an H200,
  about ten times its matrix-unit floor (profile_qwen2.5-vl-3b_h2o_h200.txt). Partial sums are
  written per (row split, key) and summed by the caller: no atomics, so the result does not
  depend on the order programs finish.

Rows are a KV head's grouped queries in the decoder's order (query head within the group, then
position), so ``row % T`` is the row's position in the chunk and indexes the mask.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scores(q, k, mask_ptr, positions, row_ok, cols, col_ok, width, scale, IEEE: tl.constexpr):
    """Scaled scores ``q k^T`` of a row block against a key block; -inf where masked."""
    keep = tl.load(mask_ptr + positions[:, None] * width + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0) != 0
    if IEEE:
        dot = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        dot = tl.dot(q, tl.trans(k))
    return tl.where(keep, dot * scale, float("-inf"))


@triton.jit
def _rows(q_ptr, head, rows, row_ok, rows_total, dims, DIM: tl.constexpr):
    return tl.load(q_ptr + (head.to(tl.int64) * rows_total + rows[:, None]) * DIM + dims[None, :],
                   mask=row_ok[:, None], other=0.0)


@triton.jit
def _keys(k_ptr, head, cols, col_ok, width, dims, DIM: tl.constexpr):
    return tl.load(k_ptr + (head.to(tl.int64) * width + cols[:, None]) * DIM + dims[None, :], mask=col_ok[:, None],
                   other=0.0)


@triton.jit
def row_stats(q_ptr, k_ptr, mask_ptr, max_ptr, sum_ptr, rows_total, chunk, width, split_len, scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIM: tl.constexpr, IEEE: tl.constexpr):
    head = tl.program_id(0)
    block = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_total
    positions = rows % chunk
    dims = tl.arange(0, DIM)
    q = _rows(q_ptr, head, rows, row_ok, rows_total, dims, DIM)
    first = split * split_len
    end = tl.minimum(width, first + split_len)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(first, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        k = _keys(k_ptr, head, cols, col_ok, width, dims, DIM)
        scores = _scores(q, k, mask_ptr, positions, row_ok, cols, col_ok, width, scale, IEEE)
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no unmasked key yet
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(scores - shift[:, None]), 1)
        running_max = new_max
    stats = (head * rows_total + rows) * splits + split
    tl.store(max_ptr + stats, running_max, mask=row_ok)
    tl.store(sum_ptr + stats, running_sum, mask=row_ok)


@triton.jit
def mass_by_key(q_ptr, k_ptr, mask_ptr, lse_ptr, partial_ptr, rows_total, chunk, width, rows_per_split, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIM: tl.constexpr, IEEE: tl.constexpr):
    head = tl.program_id(0)
    key_block = tl.program_id(1)
    split = tl.program_id(2)
    dims = tl.arange(0, DIM)
    cols = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    k = _keys(k_ptr, head, cols, col_ok, width, dims, DIM)
    first = split * rows_per_split
    end = tl.minimum(rows_total, first + rows_per_split)
    scale2 = scale * 1.4426950408889634  # exp(x) = exp2(x log2 e): one multiply folded into the scale
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(first, end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        q = _rows(q_ptr, head, rows, row_ok, rows_total, dims, DIM)
        lse2 = tl.load(lse_ptr + head * rows_total + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        scores = _scores(q, k, mask_ptr, rows % chunk, row_ok, cols, col_ok, width, scale2, IEEE)
        acc += tl.exp2(scores - lse2[:, None])  # masked keys and padding rows: exp2(-inf) = 0
    tl.store(partial_ptr + (head * tl.num_programs(2) + split).to(tl.int64) * width + cols, tl.sum(acc, 0),
             mask=col_ok)
