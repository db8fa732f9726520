"""A Triton matrix-vector product for one decode token, with the work around it folded in.

Why: at batch 1 every decoder matrix is read once per token, so decode speed is how fast the
weights stream from memory. cuBLAS picks tile shapes made for matrix products here and reads the
small q/k/v and o matrices at about 1 TB/s and the large ones at 1.8-2.5 TB/s on an H100; this
plain kernel (one output row per program, the row read in wide chunks, each product kept per lane
and summed once at the end) reads them 1.1-2.5x faster, the small ones gaining most
(benchmarks/bench_decode_linear.py). Each launch also costs a few microseconds of ramp, so the
small element-wise kernels around the products are folded into them:

- ``NORM``: RMSNorm of the input. ``W (g * x / rms(x)) = (W (g * x)) / rms(x)``: the program
  accumulates ``sum(x^2)`` from the same input chunks it multiplies and scales its sums at the
  end, so no pass of its own and no normalised copy of x.
- ``GATED``: SwiGLU. The weight is gate and up stacked (``[2N, K]``); a program reads row n of
  both and writes ``silu(gate_n) * up_n``.
- ``HALF``: rotary embedding of q and k (half the head size; 0: none). A program takes rows i and
  i + HALF of a head and rotates the pair by the token's angle before storing; rows from
  ``ROTATED_ROWS`` on (the v heads) pass through. No rotary kernel between q/k/v and attention.
- ``BIAS`` and ``RESIDUAL``: added to the sums before the one rounding to the output dtype.
- ``BITS`` (8 or 4; 0: float weights): packed weights (model/quantized.py), so a token reads a
  half or a quarter of bf16's bytes. Each row's packed bytes are loaded as one contiguous tile
  (wide loads) and prefetched undecoded; an int4 byte's low and high nibbles meet x's even and
  odd elements; the codes times x are summed within each group of ``GROUP`` inputs first and
  then scaled once per group (plus the group's offset times the sum of x where ``OFFSET``), so
  the per-weight work is one multiply-add. Several rows per program (``BLOCK_N``) keep as many
  bytes in flight as a bf16 row does. The first version, which gathered each int4 byte twice and
  decoded chunks to float32 before use, reached 9-24% of the roofline on an H200.
- ``X8`` (``MatvecTuning.int4_activations`` / ``int8_activations`` "int8"): x arrives as int8
  codes per group (``matvec_dp4a.quantize_activations``, a launch of its own, the norm's weight
  folded in). int4: each 32-bit word of eight codes meets them through two ``dp4a``: 2.20
  instructions per code against the float path's 7.09 (benchmarks/results/matvec_sass_dp4a.md),
  for x's rounding; the shipped int4 path since 2026-12-03: with 4,096 inputs per step the 7B
  int4 model decodes 1.4x faster than with float x (docs/quantized_weights.md). int8: each word
  of four signed codes meets four of x's codes in one ``dp4a``, nothing unpacked.
- ``AHEAD`` (packed only; 1 or 2): how many chunks of packed bytes are requested ahead of the one
  being multiplied. A packed chunk is a half or a quarter of a float chunk's bytes, so one chunk
  ahead may leave too few bytes in flight per SM to cover the memory's latency; two cost a few
  registers (``MatvecTuning.packed_ahead``).
- ``EARLY_EPILOGUE`` (``MatvecTuning.early_epilogue``): the bias is requested before waiting for the
  previous launch and the residual and rotary angles right after it, instead of after the products
  (a memory round trip of their own at the end of every program). Same results; on two H100s it
  took 0.025 ms off the 7B bf16 step and left the int4 step as it was. A packed chunk's scales and
  offsets are requested before its products (``_group_scales``); requested with the codes, before
  the wait, they made the 7B int4 step 0.035 ms slower, and that option was removed
  (benchmarks/results/decode_early_loads_h100.md).
- ``ROUND`` (``MatvecTuning.round_written``): the output also rounded to the int8 codes the next
  product reads (its group, int4 layout and norm weight: ``ROUND_SPLIT``, ``ROUND_NORM``), so no
  rounding launch of its own sits between the two products. A group of outputs is written by
  several programs (a few rows each), so the last of them to finish rounds it, counted on an
  arrival counter per group (``_round_written``); the codes are the rounding launch's.
- ``PDL`` (Hopper and later): programmatic dependent launch. Consecutive products (o_proj, gate/up,
  down, the next layer's q/k/v) overlap: a launch lets the next one start placing programs during
  its last wave, and those request their first weight chunk before waiting (``gdc_wait``) for the
  previous launch's output. The launch ramp, a few microseconds per product, is mostly hidden.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import matvec_dp4a


@triton.jit
def _float_chunk(w_ptr, rows, pair, index, live, K: tl.constexpr, PAIRED: tl.constexpr):
    """Rows ``rows`` of a float weight (and rows ``pair`` when paired) at columns ``index``; masked
    past K, so a chunk beyond the end reads nothing."""
    tile = live[:, None] & (index < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * K + index[None, :], mask=tile, other=0.0, eviction_policy="evict_first")
    u = w
    if PAIRED:
        u = tl.load(w_ptr + pair[:, None] * K + index[None, :], mask=tile, other=0.0, eviction_policy="evict_first")
    return w, u


@triton.jit
def _packed_chunk(w_ptr, rows, pair, start, live, K: tl.constexpr, PAIRED: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The packed bytes of a chunk of ``BLOCK_K`` inputs as stored (int8 codes, or int4 codes two
    to a byte): each row's run is contiguous, so the loads are wide; nothing is decoded here."""
    WIDTH: tl.constexpr = BLOCK_K if BITS == 8 else BLOCK_K // 2
    ROW: tl.constexpr = K if BITS == 8 else K // 2
    index = start // (8 // BITS) + tl.arange(0, WIDTH)
    tile = live[:, None] & (index < ROW)[None, :]
    w = tl.load(w_ptr + rows[:, None] * ROW + index[None, :], mask=tile, other=0, eviction_policy="evict_first")
    u = w
    if PAIRED:
        u = tl.load(w_ptr + pair[:, None] * ROW + index[None, :], mask=tile, other=0, eviction_policy="evict_first")
    return w, u


@triton.jit
def _packed_words(w_ptr, rows, pair, start, live, K: tl.constexpr, PAIRED: tl.constexpr, WORDS: tl.constexpr,
                  BITS: tl.constexpr):
    """``_packed_chunk`` for ``X8``: the packed bytes read as int32 words, eight int4 codes or four
    int8 codes each."""
    PER_WORD: tl.constexpr = 32 // BITS
    index = start // PER_WORD + tl.arange(0, WORDS)
    tile = live[:, None] & (index < K // PER_WORD)[None, :]
    w = tl.load(w_ptr + rows[:, None] * (K // PER_WORD) + index[None, :], mask=tile, other=0,
                eviction_policy="evict_first")
    u = w
    if PAIRED:
        u = tl.load(w_ptr + pair[:, None] * (K // PER_WORD) + index[None, :], mask=tile, other=0,
                    eviction_policy="evict_first")
    return w, u


@triton.jit
def _packed_sums(packed, x_lo, x_hi, x_groups, scale, offset, BITS: tl.constexpr, GROUP: tl.constexpr,
                 OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-group partial products of a packed chunk, ``[BLOCK_N, BLOCK_K / GROUP]``: the codes
    times x summed within each group first, then one scale (and offset) per group:
    ``sum_j (q_j s + m) x_j = s sum_j q_j x_j + m sum_j x_j`` (int4 without offsets: ``m = -8 s``).
    int8: ``x_lo`` is the chunk of x; int4: ``x_lo`` / ``x_hi`` are its even / odd elements, which
    meet a byte's low / high nibble. ``x_groups``: x summed per group; ``scale`` / ``offset``: the
    chunk's groups' (``_group_scales``)."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    if BITS == 8:
        products = packed.to(tl.float32) * x_lo[None, :]
        sums = tl.sum(tl.reshape(products, (BLOCK_N, GROUPS, GROUP)), axis=2)
    else:
        codes = packed.to(tl.int32)
        products = (codes & 0xF).to(tl.float32) * x_lo[None, :] + (codes >> 4).to(tl.float32) * x_hi[None, :]
        sums = tl.sum(tl.reshape(products, (BLOCK_N, GROUPS, GROUP // 2)), axis=2)
    return _scaled_groups(sums, x_groups, scale, offset, BITS, OFFSET)


@triton.jit
def _group_scales(scale_ptr, offset_ptr, rows, start, live, K: tl.constexpr, BITS: tl.constexpr,
                  GROUP: tl.constexpr, OFFSET: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float16 scales (and int4 offsets; else the scales again) of rows ``rows``' groups in the
    chunk at ``start``, ``[BLOCK_N, BLOCK_K / GROUP]``; masked past K, so a chunk beyond the end
    reads nothing. Requested in the loop before the chunk's products (the compiler places them among
    the products' instructions); written after the products, as until the twenty-sixth session,
    they came after a barrier the compiler does not hoist loads over. Requested with the chunk's
    codes instead, before the wait for the previous launch, they made the 7B int4 step slower
    (benchmarks/results/decode_early_loads_h100.md)."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    group = start // GROUP + tl.arange(0, GROUPS)
    at_group = rows[:, None] * (K // GROUP) + group[None, :]
    tile = live[:, None] & (group < K // GROUP)[None, :]
    scale = tl.load(scale_ptr + at_group, mask=tile, other=0.0, eviction_policy="evict_first")
    offset = scale
    if BITS == 4 and OFFSET:
        offset = tl.load(offset_ptr + at_group, mask=tile, other=0.0, eviction_policy="evict_first")
    return scale, offset


@triton.jit
def _scaled_groups(sums, x_groups, scale, offset, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """Per-group sums of codes times x, ``[BLOCK_N, BLOCK_K / GROUP]``, scaled by their groups'
    scales (and offsets times ``x_groups``, x's sums per group)."""
    scale = scale.to(tl.float32)
    if BITS == 4 and OFFSET:
        return sums * scale + offset.to(tl.float32) * x_groups[None, :]
    if BITS == 4:
        return (sums - 8.0 * x_groups[None, :]) * scale
    return sums * scale


@triton.jit
def _x8_sums(words, x_even, x_odd, dx, x_sum, scale, offset, BITS: tl.constexpr, GROUP: tl.constexpr,
             OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_packed_sums`` for packed codes against x's int8 codes (``X8``): integer sums per group by
    ``dp4a`` (matvec_dp4a.py), times x's group scales ``dx``; ``x_sum``: dequantized x per group.
    int4: ``x_even`` / ``x_odd`` are x's even and odd code words; int8: ``x_even`` its words in order."""
    if BITS == 8:
        dots = matvec_dp4a.group_dots_int8(words, x_even, BLOCK_N, BLOCK_K, GROUP)
    else:
        dots = matvec_dp4a.group_dots(words, x_even, x_odd, BLOCK_N, BLOCK_K, GROUP)
    sums = dots.to(tl.float32) * dx[None, :]
    return _scaled_groups(sums, x_sum, scale, offset, BITS, OFFSET)


@triton.jit
def _chunk_scales(scale_ptr, offset_ptr, rows, pair, start, live, K: tl.constexpr, PAIRED: tl.constexpr,
                  BITS: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_group_scales`` of a chunk's rows and, when paired, of its pair rows (else the rows' again)."""
    s, m = _group_scales(scale_ptr, offset_ptr, rows, start, live, K, BITS, GROUP, OFFSET, BLOCK_K)
    s_pair, m_pair = s, m
    if PAIRED:
        s_pair, m_pair = _group_scales(scale_ptr, offset_ptr, pair, start, live, K, BITS, GROUP, OFFSET, BLOCK_K)
    return s, m, s_pair, m_pair


@triton.jit
def _bias_rows(bias_ptr, rows, pair, live, PAIRED: tl.constexpr, BIAS: tl.constexpr, LOAD: tl.constexpr):
    """The bias of rows ``rows`` (and ``pair`` when paired; else zeros) in float32, loaded where
    ``BIAS and LOAD``: a parameter, so it may be requested before the previous launch is waited for."""
    bias = tl.zeros(rows.shape, tl.float32)
    bias_pair = bias
    if BIAS and LOAD:
        bias = tl.load(bias_ptr + rows, mask=live, other=0.0).to(tl.float32)
        if PAIRED:
            bias_pair = tl.load(bias_ptr + pair, mask=live, other=0.0).to(tl.float32)
    return bias, bias_pair


@triton.jit
def _wait_previous(residual_ptr, cos_ptr, sin_ptr, rows, index_n, turn, live, HALF: tl.constexpr,
                   PDL: tl.constexpr, RESIDUAL: tl.constexpr, LOAD: tl.constexpr):
    """Wait for the previous launch (``PDL``), then, where ``LOAD``, request what its chain wrote and
    the epilogue adds: the residual rows and the token's rotary cos / sin (1 and 0 for rows not
    turned), in float32. Requested here, their round trips overlap the weights' instead of
    following the products (``MatvecTuning.early_epilogue``)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    residual = tl.zeros(rows.shape, tl.float32)
    cos = residual + 1.0
    sin = residual
    if LOAD and RESIDUAL:
        residual = tl.load(residual_ptr + rows, mask=live, other=0.0).to(tl.float32)
    if LOAD and HALF > 0:
        cos, sin = _rotary_angles(cos_ptr, sin_ptr, index_n, turn, live, HALF)
    return residual, cos, sin


@triton.jit
def _rotary_angles(cos_ptr, sin_ptr, index_n, turn, live, HALF: tl.constexpr):
    """The token's cos / sin for rows ``index_n`` of their heads, float32; 1 and 0 where not ``turn``."""
    cos = tl.where(turn, tl.load(cos_ptr + index_n % HALF, mask=live, other=1.0).to(tl.float32), 1.0)
    sin = tl.where(turn, tl.load(sin_ptr + index_n % HALF, mask=live, other=0.0).to(tl.float32), 0.0)
    return cos, sin


@triton.jit
def matvec(x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, residual_ptr, cos_ptr, sin_ptr, scale_ptr, offset_ptr,
           stats_ptr, codes_out_ptr, stats_out_ptr, norm_out_ptr, arrivals_ptr, eps, N: tl.constexpr,
           K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, HALF: tl.constexpr, ROTATED_ROWS: tl.constexpr,
           BIAS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           PDL: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr, X8: tl.constexpr,
           AHEAD: tl.constexpr = 1, EARLY_EPILOGUE: tl.constexpr = False, ROUND: tl.constexpr = 0,
           ROUND_SPLIT: tl.constexpr = False, ROUND_NORM: tl.constexpr = False):
    if PDL:  # the next launch may start placing its programs as ours run their last wave
        tl.extra.cuda.gdc_launch_dependents()
    index_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if HALF > 0:  # rotary: a program takes row pairs (i, i + HALF) of a head
        live = index_n < N // 2
        rows = (index_n // HALF) * (2 * HALF) + index_n % HALF
        pair = rows + HALF
    else:  # gated: row n of the gate half and of the up half
        live = index_n < N
        rows = index_n
        pair = rows + N
    PAIRED: tl.constexpr = GATED or HALF > 0
    bias, bias_pair = _bias_rows(bias_ptr, rows, pair, live, PAIRED, BIAS, EARLY_EPILOGUE)
    turn = rows < ROTATED_ROWS  # rotary: q and k heads; v heads pass through
    if BITS == 0:
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc_pair = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        squares = tl.zeros((BLOCK_K,), tl.float32)
        # The first weight chunk is requested before waiting for the previous launch (weights are no
        # launch's output; x and the residual are), then each chunk is requested one step ahead.
        w, u = _float_chunk(w_ptr, rows, pair, cols, live, K, PAIRED)
        residual, cos, sin = _wait_previous(residual_ptr, cos_ptr, sin_ptr, rows, index_n, turn, live, HALF, PDL,
                                             RESIDUAL, EARLY_EPILOGUE)
        for start in range(0, K, BLOCK_K):
            index = start + cols
            next_w, next_u = _float_chunk(w_ptr, rows, pair, index + BLOCK_K, live, K, PAIRED)
            x = tl.load(x_ptr + index, mask=index < K, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(norm_ptr + index, mask=index < K, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
            if PAIRED:
                acc_pair += u.to(tl.float32) * x[None, :]
            w, u = next_w, next_u
    elif X8:
        # packed codes against x's int8 codes (matvec_dp4a.py): x_ptr holds x's codes as words (for
        # int4 its even codes, then its odd ones), stats_ptr their group scales, sums and sums of
        # x^2 (a folded norm's weight is already in the codes; its RMS is applied at the end as below).
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        WORDS: tl.constexpr = BLOCK_K // (32 // BITS)  # weight words per row and chunk
        X_STEP: tl.constexpr = 8 if BITS == 4 else 4  # inputs per x word: int4 reads x's even and odd halves
        X_WORDS: tl.constexpr = BLOCK_K // X_STEP
        acc = tl.zeros((BLOCK_N, GROUPS), tl.float32)
        acc_pair = tl.zeros((BLOCK_N, GROUPS), tl.float32)
        w, u = _packed_words(w_ptr, rows, pair, 0, live, K, PAIRED, WORDS, BITS)
        w1, u1 = w, u
        if AHEAD == 2:
            w1, u1 = _packed_words(w_ptr, rows, pair, BLOCK_K, live, K, PAIRED, WORDS, BITS)
        residual, cos, sin = _wait_previous(residual_ptr, cos_ptr, sin_ptr, rows, index_n, turn, live, HALF, PDL,
                                             RESIDUAL, EARLY_EPILOGUE)
        squares = tl.zeros((GROUPS,), tl.float32)  # x's sums of squares per group (used with NORM)
        for start in range(0, K, BLOCK_K):
            next_w, next_u = _packed_words(w_ptr, rows, pair, start + AHEAD * BLOCK_K, live, K, PAIRED, WORDS, BITS)
            word = start // X_STEP + tl.arange(0, X_WORDS)
            x_even = tl.load(x_ptr + word, mask=word < K // X_STEP, other=0)
            x_odd = x_even
            if BITS == 4:
                x_odd = tl.load(x_ptr + K // 8 + word, mask=word < K // 8, other=0)
            group = start // GROUP + tl.arange(0, GROUPS)
            dx = tl.load(stats_ptr + group, mask=group < K // GROUP, other=0.0)
            if NORM:
                squares += tl.load(stats_ptr + 2 * (K // GROUP) + group, mask=group < K // GROUP, other=0.0)
            x_sum = dx  # int8 codes are symmetric: no offsets, no sums of x
            if BITS == 4:
                x_sum = tl.load(stats_ptr + K // GROUP + group, mask=group < K // GROUP, other=0.0)
            # the chunk's scales, requested before its products (see _group_scales)
            s, m, s_pair, m_pair = _chunk_scales(scale_ptr, offset_ptr, rows, pair, start, live, K, PAIRED, BITS,
                                                 GROUP, OFFSET, BLOCK_K)
            acc += _x8_sums(w, x_even, x_odd, dx, x_sum, s, m, BITS, GROUP, OFFSET, BLOCK_N, BLOCK_K)
            if PAIRED:
                acc_pair += _x8_sums(u, x_even, x_odd, dx, x_sum, s_pair, m_pair, BITS, GROUP, OFFSET, BLOCK_N, BLOCK_K)
            if AHEAD == 2:
                w, u, w1, u1 = w1, u1, next_w, next_u
            else:
                w, u = next_w, next_u
    else:
        # Packed: the raw bytes are prefetched one chunk ahead; decoding, the products and the
        # per-group scaling happen in registers (``_packed_sums``). int4 bytes hold elements 2j
        # (low nibble) and 2j + 1 (high), so x is read as its even and odd elements.
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        SPAN: tl.constexpr = BLOCK_K if BITS == 8 else BLOCK_K // 2
        STRIDE: tl.constexpr = 1 if BITS == 8 else 2
        acc = tl.zeros((BLOCK_N, GROUPS), tl.float32)
        acc_pair = tl.zeros((BLOCK_N, GROUPS), tl.float32)
        squares = tl.zeros((SPAN,), tl.float32)
        lanes = tl.arange(0, SPAN)
        w, u = _packed_chunk(w_ptr, rows, pair, 0, live, K, PAIRED, BITS, BLOCK_K)
        w1, u1 = w, u
        if AHEAD == 2:
            w1, u1 = _packed_chunk(w_ptr, rows, pair, BLOCK_K, live, K, PAIRED, BITS, BLOCK_K)
        residual, cos, sin = _wait_previous(residual_ptr, cos_ptr, sin_ptr, rows, index_n, turn, live, HALF, PDL,
                                             RESIDUAL, EARLY_EPILOGUE)
        for start in range(0, K, BLOCK_K):
            next_w, next_u = _packed_chunk(w_ptr, rows, pair, start + AHEAD * BLOCK_K, live, K, PAIRED, BITS, BLOCK_K)
            first = start + STRIDE * lanes  # every element (int8) or the even ones (int4)
            x_lo = tl.load(x_ptr + first, mask=first < K, other=0.0).to(tl.float32)
            x_hi = x_lo
            if BITS == 4:
                x_hi = tl.load(x_ptr + first + 1, mask=first + 1 < K, other=0.0).to(tl.float32)
            if NORM:
                squares += x_lo * x_lo
                x_lo = x_lo * tl.load(norm_ptr + first, mask=first < K, other=0.0).to(tl.float32)
                if BITS == 4:
                    squares += x_hi * x_hi
                    x_hi = x_hi * tl.load(norm_ptr + first + 1, mask=first + 1 < K, other=0.0).to(tl.float32)
            x_groups = x_lo  # int8 needs no per-group sums of x
            if BITS == 4:
                x_groups = tl.sum(tl.reshape(x_lo + x_hi, (GROUPS, GROUP // 2)), axis=1)
            # the chunk's scales, requested before its products (see _group_scales)
            s, m, s_pair, m_pair = _chunk_scales(scale_ptr, offset_ptr, rows, pair, start, live, K, PAIRED, BITS,
                                                 GROUP, OFFSET, BLOCK_K)
            acc += _packed_sums(w, x_lo, x_hi, x_groups, s, m, BITS, GROUP, OFFSET, BLOCK_N, BLOCK_K)
            if PAIRED:
                acc_pair += _packed_sums(u, x_lo, x_hi, x_groups, s_pair, m_pair, BITS, GROUP, OFFSET, BLOCK_N, BLOCK_K)
            if AHEAD == 2:  # two chunks in flight while one is multiplied
                w, u, w1, u1 = w1, u1, next_w, next_u
            else:
                w, u = next_w, next_u
    y = tl.sum(acc, axis=1)
    y_pair = tl.sum(acc_pair, axis=1)
    if NORM:
        inverse_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        y = y * inverse_rms
        y_pair = y_pair * inverse_rms
    if BIAS:
        if not EARLY_EPILOGUE:
            bias, bias_pair = _bias_rows(bias_ptr, rows, pair, live, PAIRED, BIAS, True)
        y += bias
        y_pair += bias_pair
    if GATED:
        y = y * tl.sigmoid(y) * y_pair
    if HALF > 0:
        # x * cos + rotate_half(x) * sin; the angle of column i and i + HALF is the same
        if not EARLY_EPILOGUE:
            cos, sin = _rotary_angles(cos_ptr, sin_ptr, index_n, turn, live, HALF)
        y, y_pair = y * cos - y_pair * sin, y_pair * cos + y * sin
        tl.store(out_ptr + pair, y_pair.to(out_ptr.dtype.element_ty), mask=live)
    if RESIDUAL:
        if not EARLY_EPILOGUE:
            residual = tl.load(residual_ptr + rows, mask=live, other=0.0).to(tl.float32)
        y += residual
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=live)
    if ROUND > 0:
        _round_written(out_ptr, codes_out_ptr, stats_out_ptr, norm_out_ptr, arrivals_ptr, N, BLOCK_N, ROUND,
                       ROUND_SPLIT, ROUND_NORM)


@triton.jit
def _round_written(out_ptr, codes_ptr, stats_ptr, norm_ptr, arrivals_ptr, N: tl.constexpr, BLOCK_N: tl.constexpr,
                   ROUND: tl.constexpr, SPLIT: tl.constexpr, NORM: tl.constexpr):
    """The output rounded for the next product's int8 codes (``ROUND``, its group; ``SPLIT`` and
    ``NORM``: its int4 layout and the norm's weight to fold in), as ``quantize_activations`` would
    round the stored output in a launch of its own. A group spans ``ROUND / BLOCK_N`` programs:
    each counts itself in on the group's arrival counter once its rows are stored, and the last
    one reads the group back from L2 and rounds it, then sets the counter to 0 for the next call."""
    PROGRAMS: tl.constexpr = ROUND // BLOCK_N  # programs writing one group
    group = tl.program_id(0) // PROGRAMS
    tl.debug_barrier()  # every thread's rows stored before the program counts itself in (release)
    arrived = tl.atomic_add(arrivals_ptr + group, 1, sem="acq_rel", scope="gpu")
    if arrived == PROGRAMS - 1:  # the group's last writer: the others' rows are visible (acquire)
        index = group * ROUND + tl.arange(0, ROUND)
        x = tl.reshape(tl.load(out_ptr + index, cache_modifier=".cg").to(tl.float32), (1, ROUND))
        squares = tl.sum(x * x, axis=1)
        if NORM:
            x = x * tl.reshape(tl.load(norm_ptr + index).to(tl.float32), (1, ROUND))
        groups = group + tl.arange(0, 1)
        matvec_dp4a.store_group_codes(x, squares, groups, groups < N // ROUND, codes_ptr, stats_ptr, N, ROUND,
                                      SPLIT)
        tl.store(arrivals_ptr + group, 0)
