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
  half or a quarter of bf16's bytes. Each row's packed codes are loaded as one contiguous tile of
  32-bit words (wide loads) and prefetched undecoded. Code k of every word meets the k-th strided
  slice of x; a code becomes a float without a conversion instruction (``_code_fraction``: shifted
  into the mantissa of 1.0), so a weight costs a shift, a logic operation and a multiply-add, and
  each word's products are scaled by its group's scale (``_scaled_words``, plus the group's
  offset times the sum of x where ``OFFSET``). Several rows per program (``BLOCK_N``) keep as many
  bytes in flight as a bf16 row does. The first version gathered each int4 byte twice and decoded
  chunks to float32 before use (9-24% of the roofline on an H200); the second read bytes and
  converted each code with an integer-to-float instruction, which issues at a fraction of the
  rate, and reached 1-2.6 TB/s (results/bench_decode_linear_int{8,4}_h200.md,
  results/matvec_sass.md).
- ``PDL`` (Hopper and later): programmatic dependent launch. Consecutive products (o_proj, gate/up,
  down, the next layer's q/k/v) overlap: a launch lets the next one start placing programs during
  its last wave, and those request their first weight chunk before waiting (``gdc_wait``) for the
  previous launch's output. The launch ramp, a few microseconds per product, is mostly hidden.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
def _packed_words(w_ptr, rows, pair, start, live, K: tl.constexpr, PAIRED: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The packed codes of a chunk of ``BLOCK_K`` inputs as stored, read as 32-bit words (4 int8 or
    8 int4 codes each, code k in bits ``k * BITS`` up): each row's run is contiguous, so the loads
    are wide; nothing is decoded here."""
    PER_WORD: tl.constexpr = 32 // BITS
    index = start // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    tile = live[:, None] & (index < K // PER_WORD)[None, :]
    w = tl.load(w_ptr + rows[:, None] * (K // PER_WORD) + index[None, :], mask=tile, other=0,
                eviction_policy="evict_first")
    u = w
    if PAIRED:
        u = tl.load(w_ptr + pair[:, None] * (K // PER_WORD) + index[None, :], mask=tile, other=0,
                    eviction_policy="evict_first")
    return w, u


@triton.jit
def _code_fraction(words, k: tl.constexpr, BITS: tl.constexpr):
    """Code k of each word as the float32 ``1 + c / 2^BITS`` (int8: ``1 + (c + 128) / 256``), in two
    integer operations and no conversion: the code is shifted to the top of a float's mantissa
    and 1.0's exponent set beside it (int8: its sign bit flipped on the way, which adds 128).
    Why: integer-to-float conversions issue at a fraction of the rate of logic and float operations
    (one per weight capped the first packed kernels near 1 TB/s), and this makes a weight cost a
    shift, a logic operation and its multiply-add."""
    TOP: tl.constexpr = 23 - BITS  # the mantissa bit the code's lowest bit lands on
    LOW: tl.constexpr = k * BITS  # the word bit it starts at
    if LOW <= TOP:
        moved = words << (TOP - LOW)
    else:
        moved = words >> (LOW - TOP)  # arithmetic shift: the bits it fills are masked off
    MASK: tl.constexpr = ((1 << BITS) - 1) << TOP
    if BITS == 8:
        bits = (moved & MASK) ^ (0x3F800000 | (1 << 22))
    else:
        bits = (moved & MASK) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _scaled_words(fractions_x, x_words, scale_ptr, offset_ptr, rows, start, live, K: tl.constexpr,
                  BITS: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each word's partial product, ``[BLOCK_N, words]``, from ``fractions_x`` (the word's
    ``sum_k f_k x_k``, ``f = 1 + (c + H) / R``) and ``x_words`` (the word's ``sum_k x_k``):
    ``sum_k c_k x_k = R sum_k f_k x_k - (R + H) sum_k x_k``, times the scale of the word's group
    (plus its offset times ``sum_k x_k``; int4 without offsets: codes centred on 8). A word lies in
    one group; its scale is read per word, so all of it stays element-wise in the tile's layout
    (a per-group reshape here moved data through shared memory every step). In float32 the removed
    ``sum f x`` costs a few 1e-6 of relative precision, far below bfloat16's rounding."""
    PER_WORD: tl.constexpr = 32 // BITS
    RANGE: tl.constexpr = 1 << BITS
    # what the fractions add beyond the codes: 1 (x R), int8's 128, int4's centre 8 without offsets
    SHIFT: tl.constexpr = RANGE + 128 * (BITS == 8) + 8 * (BITS == 4) * (1 - OFFSET)
    group = (start + PER_WORD * tl.arange(0, BLOCK_K // PER_WORD)) // GROUP
    at_group = rows[:, None] * (K // GROUP) + group[None, :]
    tile = live[:, None] & (group < K // GROUP)[None, :]
    scale = tl.load(scale_ptr + at_group, mask=tile, other=0.0).to(tl.float32)
    codes_x = RANGE * fractions_x - SHIFT * x_words[None, :]
    if BITS == 4 and OFFSET:
        offset = tl.load(offset_ptr + at_group, mask=tile, other=0.0).to(tl.float32)
        return codes_x * scale + offset * x_words[None, :]
    return codes_x * scale


@triton.jit
def matvec(x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, residual_ptr, cos_ptr, sin_ptr, scale_ptr, offset_ptr, eps,
           N: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, HALF: tl.constexpr,
           ROTATED_ROWS: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, PDL: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr):
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
    if BITS == 0:
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc_pair = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        squares = tl.zeros((BLOCK_K,), tl.float32)
        # The first weight chunk is requested before waiting for the previous launch (weights are no
        # launch's output; x and the residual are), then each chunk is requested one step ahead.
        w, u = _float_chunk(w_ptr, rows, pair, cols, live, K, PAIRED)
        if PDL:
            tl.extra.cuda.gdc_wait()
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
    else:
        # Packed: the raw words are prefetched one chunk ahead; decoding, the products and the
        # scaling happen in registers, element-wise per word, summed across words once at the end.
        # Code k of word j is input ``j * PER_WORD + k``, so x is read as PER_WORD strided slices,
        # each meeting one code of every word.
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        acc = tl.zeros((BLOCK_N, WORDS), tl.float32)
        acc_pair = tl.zeros((BLOCK_N, WORDS), tl.float32)
        squares = tl.zeros((WORDS,), tl.float32)
        lanes = tl.arange(0, WORDS)
        w, u = _packed_words(w_ptr, rows, pair, 0, live, K, PAIRED, BITS, BLOCK_K)
        if PDL:
            tl.extra.cuda.gdc_wait()
        for start in range(0, K, BLOCK_K):
            next_w, next_u = _packed_words(w_ptr, rows, pair, start + BLOCK_K, live, K, PAIRED, BITS, BLOCK_K)
            fractions_x = tl.zeros((BLOCK_N, WORDS), tl.float32)
            fractions_x_pair = tl.zeros((BLOCK_N, WORDS), tl.float32)
            x_words = tl.zeros((WORDS,), tl.float32)
            for k in tl.static_range(PER_WORD):
                at = start + PER_WORD * lanes + k
                x = tl.load(x_ptr + at, mask=at < K, other=0.0).to(tl.float32)
                if NORM:
                    squares += x * x
                    x = x * tl.load(norm_ptr + at, mask=at < K, other=0.0).to(tl.float32)
                x_words += x
                fractions_x += _code_fraction(w, k, BITS) * x[None, :]
                if PAIRED:
                    fractions_x_pair += _code_fraction(u, k, BITS) * x[None, :]
            acc += _scaled_words(fractions_x, x_words, scale_ptr, offset_ptr, rows, start, live, K, BITS, GROUP,
                                 OFFSET, BLOCK_K)
            if PAIRED:
                acc_pair += _scaled_words(fractions_x_pair, x_words, scale_ptr, offset_ptr, pair, start, live, K,
                                          BITS, GROUP, OFFSET, BLOCK_K)
            w, u = next_w, next_u
    y = tl.sum(acc, axis=1)
    y_pair = tl.sum(acc_pair, axis=1)
    if NORM:
        inverse_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        y = y * inverse_rms
        y_pair = y_pair * inverse_rms
    if BIAS:
        y += tl.load(bias_ptr + rows, mask=live, other=0.0).to(tl.float32)
        if GATED or HALF > 0:
            y_pair += tl.load(bias_ptr + pair, mask=live, other=0.0).to(tl.float32)
    if GATED:
        y = y * tl.sigmoid(y) * y_pair
    if HALF > 0:
        # x * cos + rotate_half(x) * sin; the angle of column i and i + HALF is the same
        turn = rows < ROTATED_ROWS  # q and k heads; v heads pass through
        cos = tl.where(turn, tl.load(cos_ptr + index_n % HALF, mask=live, other=1.0).to(tl.float32), 1.0)
        sin = tl.where(turn, tl.load(sin_ptr + index_n % HALF, mask=live, other=0.0).to(tl.float32), 0.0)
        y, y_pair = y * cos - y_pair * sin, y_pair * cos + y * sin
        tl.store(out_ptr + pair, y_pair.to(out_ptr.dtype.element_ty), mask=live)
    if RESIDUAL:
        y += tl.load(residual_ptr + rows, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=live)
