"""A Triton matrix-vector product for one decode token, with the work around it folded in.

Why: at batch 1 every decoder matrix is read once per token, so decode speed is how fast the
weights stream from memory. cuBLAS picks tile shapes made for matrix products here and reads the
small q/k/v and o matrices at about 1 TB/s and the large ones at 1.8-2.5 TB/s on an H100; this
plain kernel (one output row per program, the row read in wide chunks, each product kept per lane
and summed once at the end) reads them 15-35% faster (benchmarks/bench_decode_linear.py). Each
launch also costs a few microseconds of ramp, so the small element-wise kernels around the
products are folded into them:

- ``NORM``: RMSNorm of the input. ``W (g * x / rms(x)) = (W (g * x)) / rms(x)``: the program
  accumulates ``sum(x^2)`` from the same input chunks it multiplies and scales its sums at the
  end, so no pass of its own and no normalised copy of x.
- ``GATED``: SwiGLU. The weight is gate and up stacked (``[2N, K]``); a program reads row n of
  both and writes ``silu(gate_n) * up_n``.
- ``BIAS`` and ``RESIDUAL``: added to the sums before the one rounding to the output dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def matvec(x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, residual_ptr, eps,
           N: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr,
           RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    live = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    squares = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(0, K, BLOCK_K):
        index = start + cols
        inside = index < K
        x = tl.load(x_ptr + index, mask=inside, other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + index, mask=inside, other=0.0).to(tl.float32)
        tile = live[:, None] & inside[None, :]
        w = tl.load(w_ptr + rows[:, None] * K + index[None, :], mask=tile, other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        if GATED:
            u = tl.load(w_ptr + (rows[:, None] + N) * K + index[None, :], mask=tile, other=0.0,
                        eviction_policy="evict_first")
            acc_up += u.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    up = tl.sum(acc_up, axis=1)
    if NORM:
        inverse_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        y = y * inverse_rms
        up = up * inverse_rms
    if BIAS:
        y += tl.load(bias_ptr + rows, mask=live, other=0.0).to(tl.float32)
        if GATED:
            up += tl.load(bias_ptr + N + rows, mask=live, other=0.0).to(tl.float32)
    if GATED:
        y = y * tl.sigmoid(y) * up
    if RESIDUAL:
        y += tl.load(residual_ptr + rows, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=live)
