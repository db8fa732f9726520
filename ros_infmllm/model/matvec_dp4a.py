"""int4 weights times int8 activations by the 4-way byte dot product (PTX ``dp4a``): a candidate
for the packed decode matvec, off by default (``MatvecTuning.int4_activations``) until a GPU has
timed it.

Why: the shipped packed kernel (matvec_kernels.py) is bound by instructions, not memory. Its loop
spends 7.1 instructions per int4 code (unpacking, int-to-float conversion, float sums), and an
H200 SM must stay under about 3.5 to keep up with its memory
(benchmarks/results/matvec_sass.md). ``dp4a`` multiplies four byte pairs and adds them to a 32-bit
sum in one instruction, so a 32-bit word of eight codes costs two masks, a shift and two
``dp4a``: under one instruction per code. llama.cpp's CUDA kernels for Q4_0 work this way. The
price is x quantized to int8 per group (as llama.cpp's Q8_1 does); its error is bounded and
tested.

Layout: the weights are ``QuantizedLinear``'s int4 bytes (byte j holds element 2j in its low
nibble and 2j + 1 in its high one), read as 32-bit words. A word holds elements 8i..8i+7:
``w & 0x0F0F0F0F`` gives the even ones as four bytes, ``(w >> 4) & 0x0F0F0F0F`` the odd ones.
``quantize_activations`` stores x's int8 codes as its even elements, then its odd ones (one
buffer of K bytes, K / 4 words), so word i of each half meets the low and the high nibbles of word
i of a row; beside them, per group, the scale and the sum of dequantized x, then the sum of x^2
(the RMSNorm's, when the product folds one in: the codes are then of ``x * norm_weight`` and the
matvec divides by the RMS at the end, as the float path does). Per group of the weights' ``group``
inputs (32): ``sum_j (q_j s + m) x_j = s dx sum_j q_j c_j + m X`` with x_j ~ dx c_j and
``X = dx sum_j c_j`` (``m = -8 s`` without offsets).

On the CPU (Triton's interpreter, which has no inline PTX) ``dp4a`` is computed byte by byte,
the same integer sum. ``matvec_kernels.matvec`` uses the same pieces with its fusions (``X8``),
when ``MatvecTuning.int4_activations`` is "int8".
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DP4A = tl.constexpr("dp4a.u32.s32 $0, $1, $2, $3;")  # unsigned codes (0..15) times signed activation bytes
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))  # read at import, as Triton does


@triton.jit
def dp4a(a, b, acc):
    """``acc + sum_k a.byte[k] * b.byte[k]``, ``a``'s bytes unsigned, ``b``'s signed."""
    if INTERPRETED:
        total = acc
        for shift in tl.static_range(0, 32, 8):
            low = (b >> shift) & 0xFF
            total += ((a >> shift) & 0xFF) * tl.where(low >= 128, low - 256, low)
        return total
    return tl.inline_asm_elementwise(DP4A, "=r,r,r,r", [a, b, acc], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def quantize_activations(x_ptr, norm_ptr, codes_ptr, stats_ptr, K: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_G: tl.constexpr, NORM: tl.constexpr):
    """x ``[K]`` (times ``norm_ptr``'s weight where ``NORM``) -> its int8 codes, even elements then
    odd ones (``codes_ptr``, K bytes), and ``stats_ptr``: per group the scale (``max |x| / 127``),
    then per group the sum of dequantized x, then the sum of the raw x^2. One program: K is a
    decoder's width (at most some 10^4)."""
    groups = tl.arange(0, BLOCK_G)
    live = groups < K // GROUP
    index = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x = tl.load(x_ptr + index, mask=live[:, None], other=0.0).to(tl.float32)
    tl.store(stats_ptr + 2 * (K // GROUP), tl.sum(tl.sum(x * x, axis=1), axis=0))
    if NORM:
        x = x * tl.load(norm_ptr + index, mask=live[:, None], other=0.0).to(tl.float32)
    scale = tl.max(tl.abs(x), axis=1) / 127.0
    inverse = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)  # an all-zero group: codes 0
    codes = tl.minimum(tl.maximum(tl.floor(x * inverse[:, None] + 0.5), -127.0), 127.0)
    tl.store(stats_ptr + groups, scale, mask=live)
    tl.store(stats_ptr + K // GROUP + groups, scale * tl.sum(codes, axis=1), mask=live)
    even, odd = tl.split(tl.reshape(codes.to(tl.int8), (BLOCK_G, GROUP // 2, 2)))
    pairs = groups[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]
    tl.store(codes_ptr + pairs, even, mask=live[:, None])
    tl.store(codes_ptr + K // 2 + pairs, odd, mask=live[:, None])


@triton.jit
def _words(w_ptr, rows, live, start, K: tl.constexpr, WORDS: tl.constexpr):
    """The packed words of a chunk starting at input ``start`` for each row (nothing past K)."""
    word = start // 8 + tl.arange(0, WORDS)
    return tl.load(w_ptr + rows[:, None] * (K // 8) + word[None, :], mask=live[:, None] & (word < K // 8)[None, :],
                   other=0, eviction_policy="evict_first")


@triton.jit
def group_dots(words, x_even, x_odd, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """``[BLOCK_N, BLOCK_K / GROUP]`` integer sums of codes times x's codes per group: a chunk's
    packed words ``[BLOCK_N, BLOCK_K / 8]`` against x's even and odd code words ``[BLOCK_K / 8]``."""
    dots = dp4a(words & 0x0F0F0F0F, x_even[None, :], tl.zeros((BLOCK_N, BLOCK_K // 8), tl.int32))
    dots = dp4a((words >> 4) & 0x0F0F0F0F, x_odd[None, :], dots)
    return tl.sum(tl.reshape(dots, (BLOCK_N, BLOCK_K // GROUP, GROUP // 8)), axis=2)


@triton.jit
def matvec_int4_dp4a(codes_ptr, stats_ptr, w_ptr, scale_ptr, offset_ptr, residual_ptr, out_ptr,
                     N: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr,
                     RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out = W x (+ residual)`` for ``BLOCK_N`` rows per program, no other fusions. ``w_ptr``:
    the packed bytes as int32 words ``[N, K / 8]``; ``codes_ptr``: x's codes as words ``[K / 4]``."""
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    acc = tl.zeros((BLOCK_N, GROUPS), tl.float32)
    w = _words(w_ptr, rows, live, 0, K, WORDS)
    for start in range(0, K, BLOCK_K):  # each chunk's words requested one step ahead, as the shipped kernel does
        word = start // 8 + tl.arange(0, WORDS)
        inside = word < K // 8
        next_w = _words(w_ptr, rows, live, start + BLOCK_K, K, WORDS)
        x_even = tl.load(codes_ptr + word, mask=inside, other=0)
        x_odd = tl.load(codes_ptr + K // 8 + word, mask=inside, other=0)
        group = start // GROUP + tl.arange(0, GROUPS)
        known = group < K // GROUP
        dx = tl.load(stats_ptr + group, mask=known, other=0.0)
        x_sum = tl.load(stats_ptr + K // GROUP + group, mask=known, other=0.0)
        sums = group_dots(w, x_even, x_odd, BLOCK_N, BLOCK_K, GROUP).to(tl.float32) * dx[None, :]
        at = rows[:, None] * (K // GROUP) + group[None, :]
        tile = live[:, None] & known[None, :]
        scale = tl.load(scale_ptr + at, mask=tile, other=0.0).to(tl.float32)
        if OFFSET:
            offset = tl.load(offset_ptr + at, mask=tile, other=0.0).to(tl.float32)
            acc += sums * scale + offset * x_sum[None, :]
        else:
            acc += (sums - 8.0 * x_sum[None, :]) * scale
        w = next_w
    y = tl.sum(acc, axis=1)
    if RESIDUAL:
        y += tl.load(residual_ptr + rows, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=live)


def quantized_activations(x: torch.Tensor, group: int = 32,
                          norm_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[K]`` (times ``norm_weight``) -> its codes as int32 words ``[K / 4]`` (even elements,
    then odd) and the float32 stats ``[2 K / group + 1]`` (scales, sums, sum of x^2): the layout
    ``quantize_activations`` describes."""
    columns = x.numel()
    if columns % group or group % 8:
        raise ValueError(f"{columns} inputs in groups of {group}: both must be multiples of 8 and divide")
    codes = torch.empty(columns, dtype=torch.int8, device=x.device)
    stats = torch.empty(2 * (columns // group) + 1, dtype=torch.float32, device=x.device)
    quantize_activations[(1,)](x.contiguous().view(-1), x if norm_weight is None else norm_weight.contiguous(), codes,
                               stats, K=columns, GROUP=group, BLOCK_G=triton.next_power_of_2(columns // group),
                               NORM=norm_weight is not None, num_warps=8)
    return codes.view(torch.int32), stats


def int4_dp4a_matvec(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                     residual: torch.Tensor | None = None, block_n: int = 8, block_k: int = 1024) -> torch.Tensor:
    """``residual + W x`` for one token (``[1, K]`` -> ``[1, N]`` in x's dtype), W in
    ``QuantizedLinear``'s int4 layout (``qweight`` uint8 ``[N, K / 2]``, float16 ``scales`` and
    ``offsets`` ``[N, K / group]``), x quantized to int8 per group first."""
    rows, columns = qweight.shape[0], qweight.shape[1] * 2
    group = columns // scales.shape[1]
    codes, stats = quantized_activations(x, group)
    out = x.new_empty((1, rows))
    block_k = min(block_k, triton.next_power_of_2(columns))
    if block_k % group:
        raise ValueError(f"chunks of {block_k} inputs must hold whole groups of {group}")
    matvec_int4_dp4a[(triton.cdiv(rows, block_n),)](
        codes, stats, qweight.contiguous().view(torch.int32), scales.contiguous(),
        scales if offsets is None else offsets.contiguous(), out if residual is None else residual.contiguous(), out,
        N=rows, K=columns, GROUP=group, OFFSET=offsets is not None, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def rounded_activations(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x ``[..., K]`` as the kernel sees it: rounded to int8 per group of ``group`` inputs (scale
    ``max |x| / 127``) and back, in float64. For the reference, and to measure what the rounding
    costs a whole model (benchmarks/weights_quality.py, setting ``int4-x8``)."""
    xg = x.reshape(-1, group).float()
    dx = xg.abs().amax(dim=1) / 127.0
    inverse = torch.where(dx > 0, 1.0 / torch.where(dx > 0, dx, torch.ones_like(dx)), torch.zeros_like(dx))
    codes = torch.floor(xg * inverse[:, None] + 0.5).clamp(-127, 127)
    return (codes.double() * dx.double()[:, None]).reshape(x.shape)


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in float64 from the same int8 activation codes (for tests)."""
    rows, columns = qweight.shape[0], qweight.shape[1] * 2
    group = columns // scales.shape[1]
    x_hat = rounded_activations(x, group).reshape(-1)
    q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).reshape(rows, columns).double()
    s = scales.double().repeat_interleave(group, dim=1)
    m = -8.0 * s if offsets is None else offsets.double().repeat_interleave(group, dim=1)
    y = (q * s + m) @ x_hat
    if residual is not None:
        y = y + residual.double().reshape(-1)
    return y.reshape(1, rows)
