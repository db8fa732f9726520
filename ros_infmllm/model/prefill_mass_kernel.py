"""Triton kernel for the attention mass of a whole prefill chunk, without its probability matrix.

Why: ``h2o`` (and every policy whose window is the whole chunk) scores each cache slot by the
attention every query of a chunk pays it. The decoder's explicit path gets that from a
materialised ``[heads, queries, slots]`` float32 softmax, so such a chunk cannot take the fused
attention kernels: on an H200 a frame's prefill then spent two slow batched products and four
passes over that matrix per layer where the fused path spends one kernel (frame ingest 2.6x
``streamingllm``'s). Here the output comes from the fused attention as for other policies, and
this kernel adds the mass, reading the keys twice and writing no score matrix:

- pass 1 (``PASS`` 1): per query row and key split, the softmax's running max and sum over that
  split's keys (``[kv_heads, rows, splits]``), combined into each row's log-sum-exp by the caller;
- pass 2 (``PASS`` 2): each key's probability ``exp(s - lse)`` summed over a block of rows and
  written per (row block, key): the caller sums the row blocks (no atomics, so the result does not
  depend on the order programs finish).

Rows are a KV head's grouped queries in the decoder's order (query head within the group, then
position), so ``row % T`` is the row's position in the chunk and indexes the mask.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scores(q, k_ptr, mask_ptr, head, positions, row_ok, cols, width, scale, dims,
            DIM: tl.constexpr, IEEE: tl.constexpr):
    """Scaled scores of a row block against the keys ``cols`` of one KV head; -inf where masked."""
    col_ok = cols < width
    k = tl.load(k_ptr + (head.to(tl.int64) * width + cols[:, None]) * DIM + dims[None, :], mask=col_ok[:, None],
                other=0.0)
    keep = tl.load(mask_ptr + positions[:, None] * width + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0) != 0
    if IEEE:
        dot = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        dot = tl.dot(q, tl.trans(k))
    return tl.where(keep, dot * scale, float("-inf"))


@triton.jit
def prefill_mass(q_ptr, k_ptr, mask_ptr, max_ptr, sum_ptr, lse_ptr, partial_ptr, rows_total, chunk, width,
                 split_len, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIM: tl.constexpr,
                 PASS: tl.constexpr, IEEE: tl.constexpr):
    head = tl.program_id(0)
    block = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_total
    positions = rows % chunk
    dims = tl.arange(0, DIM)
    q = tl.load(q_ptr + (head.to(tl.int64) * rows_total + rows[:, None]) * DIM + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    first = split * split_len
    end = tl.minimum(width, first + split_len)
    stats = (head * rows_total + rows) * splits + split
    if PASS == 1:
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        for start in range(first, end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            scores = _scores(q, k_ptr, mask_ptr, head, positions, row_ok, tl.where(cols < end, cols, width),
                             width, scale, dims, DIM, IEEE)
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no unmasked key yet
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(scores - shift[:, None]), 1)
            running_max = new_max
        tl.store(max_ptr + stats, running_max, mask=row_ok)
        tl.store(sum_ptr + stats, running_sum, mask=row_ok)
    else:
        lse = tl.load(lse_ptr + head * rows_total + rows, mask=row_ok, other=float("inf"))
        for start in range(first, end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_split = cols < end
            scores = _scores(q, k_ptr, mask_ptr, head, positions, row_ok, tl.where(in_split, cols, width),
                             width, scale, dims, DIM, IEEE)
            probs = tl.exp(scores - lse[:, None])  # masked keys and padding rows: exp(-inf) = 0
            tl.store(partial_ptr + (head * tl.num_programs(1) + block).to(tl.int64) * width + cols,
                     tl.sum(probs, 0), mask=in_split)
