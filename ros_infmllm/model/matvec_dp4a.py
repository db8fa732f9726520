"""int4 and int8 weights times int8 activations by the 4-way byte dot product (PTX ``dp4a``): the
pieces of the packed decode matvec's ``X8`` path (matvec_kernels.py). int4: ``MatvecTuning.int4_activations``
"int8", shipped since 2026-12-03: on an H200 the 7B int4 model decodes in 2.714 ms with it against
3.826 with float x, benchmarks/results/bench_gpu_int4_x8_h200.md. int8: ``int8_activations``, each
32-bit word of four signed codes meets four of x's codes in one ``dp4a`` with nothing to unpack
(llama.cpp's Q8_0 x Q8_1 product).

Why: the packed kernel with float x (matvec_kernels.py) is bound by instructions, not memory. Its loop
spends 7.1 instructions per int4 code (unpacking, int-to-float conversion, float sums), and an
H200 SM must stay under about 3.5 to keep up with its memory
(benchmarks/results/matvec_sass.md). ``dp4a`` multiplies four byte pairs and adds them to a 32-bit
sum in one instruction, so a 32-bit word of eight codes costs two masks, a shift and two
``dp4a``: under one instruction per code. llama.cpp's CUDA kernels for Q4_0 work this way. The
price is x quantized to int8 per group (as llama.cpp's Q8_1 does); its error is bounded and
tested.

Layout (int4): the weights are ``QuantizedLinear``'s int4 bytes (byte j holds element 2j in its low
nibble and 2j + 1 in its high one), read as 32-bit words. A word holds elements 8i..8i+7:
``w & 0x0F0F0F0F`` gives the even ones as four bytes, ``(w >> 4) & 0x0F0F0F0F`` the odd ones.
``quantize_activations`` stores x's int8 codes as its even elements, then its odd ones (one
buffer of K bytes, K / 4 words), so word i of each half meets the low and the high nibbles of word
i of a row; beside them, per group, the scale, the sum of dequantized x and the sum of x^2
(the RMSNorm's, summed over the groups by a product that folds one in: the codes are then of
``x * norm_weight`` and the matvec divides by the RMS at the end, as the float path does). Per
group of the weights' ``group`` inputs (32): ``sum_j (q_j s + m) x_j = s dx sum_j q_j c_j + m X`` with x_j ~ dx c_j and
``X = dx sum_j c_j`` (``m = -8 s`` without offsets).

Layout (int8): the weights' int8 codes read as words of four elements in order, and x's codes in
order too (``SPLIT`` off), the same stats beside them; ``m = 0``.

On the CPU (Triton's interpreter, which has no inline PTX) ``dp4a`` is computed byte by byte,
the same integer sum.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .decode_attention import dependent_launch

DP4A = tl.constexpr("dp4a.u32.s32 $0, $1, $2, $3;")  # unsigned codes (0..15) times signed activation bytes
DP4A_SIGNED = tl.constexpr("dp4a.s32.s32 $0, $1, $2, $3;")  # signed int8 codes times signed activation bytes
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
def _signed_byte(word, shift: tl.constexpr):
    """Byte ``shift / 8`` of ``word`` as a signed value."""
    byte = (word >> shift) & 0xFF
    return tl.where(byte >= 128, byte - 256, byte)


@triton.jit
def dp4a_signed(a, b, acc):
    """``acc + sum_k a.byte[k] * b.byte[k]``, both words' bytes signed."""
    if INTERPRETED:
        total = acc
        for shift in tl.static_range(0, 32, 8):
            total += _signed_byte(a, shift) * _signed_byte(b, shift)
        return total
    return tl.inline_asm_elementwise(DP4A_SIGNED, "=r,r,r,r", [a, b, acc], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def quantize_activations(x_ptr, norm_ptr, codes_ptr, stats_ptr, K: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_G: tl.constexpr, NORM: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    """x ``[K]`` (times ``norm_ptr``'s weight where ``NORM``) -> its int8 codes (``codes_ptr``, K
    bytes: even elements then odd ones where ``SPLIT``, for int4 weights; in order otherwise), and
    ``stats_ptr``: per group the scale (``max |x| / 127``), then per group the sum of dequantized
    x, then per group the sum of the raw x^2 (the norm's sum of squares, summed by the product).
    Each program rounds ``BLOCK_G`` groups: a group needs nothing of the others, so the launch
    is spread over programs instead of one program walking all of x
    (``MatvecTuning.x8_round_groups``).
    ``PDL``: a link in the products' chain of dependent launches (matvec_kernels.py): the product
    that reads these codes may be placed and fetch its first weights while this runs, and this
    waits for the launch that wrote x; without it every packed product paid this launch's latency
    and its own ramp in full."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    live = groups < K // GROUP
    index = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x = tl.load(x_ptr + index, mask=live[:, None], other=0.0).to(tl.float32)
    squares = tl.sum(x * x, axis=1)
    if NORM:
        x = x * tl.load(norm_ptr + index, mask=live[:, None], other=0.0).to(tl.float32)
    store_group_codes(x, squares, groups, live, codes_ptr, stats_ptr, K, GROUP, SPLIT)


@triton.jit
def store_group_codes(x, squares, groups, live, codes_ptr, stats_ptr, K, GROUP: tl.constexpr,
                      SPLIT: tl.constexpr):
    """Groups ``groups`` (where ``live``) of a K-wide x, given as ``x [len(groups), GROUP]`` float32,
    rounded to int8 codes and written in ``quantize_activations``' layout: codes (even then odd
    elements where ``SPLIT``), per group the scale (``max |x| / 127``), the sum of dequantized x
    and ``squares`` (the group's sum of raw x^2, before a folded norm's weight). Also the
    attention's combine launch rounds o_proj's x with it (decode_kernels.py), so both writers give
    the same codes."""
    scale = tl.max(tl.abs(x), axis=1) / 127.0
    inverse = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)  # an all-zero group: codes 0
    codes = tl.minimum(tl.maximum(tl.floor(x * inverse[:, None] + 0.5), -127.0), 127.0)
    tl.store(stats_ptr + groups, scale, mask=live)
    tl.store(stats_ptr + K // GROUP + groups, scale * tl.sum(codes, axis=1), mask=live)
    tl.store(stats_ptr + 2 * (K // GROUP) + groups, squares, mask=live)
    if SPLIT:
        even, odd = tl.split(tl.reshape(codes.to(tl.int8), (x.shape[0], GROUP // 2, 2)))
        pairs = groups[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]
        tl.store(codes_ptr + pairs, even, mask=live[:, None])
        tl.store(codes_ptr + K // 2 + pairs, odd, mask=live[:, None])
    else:
        tl.store(codes_ptr + groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :], codes.to(tl.int8),
                 mask=live[:, None])


@triton.jit
def group_dots(words, x_even, x_odd, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """``[BLOCK_N, BLOCK_K / GROUP]`` integer sums of codes times x's codes per group: a chunk's
    packed words ``[BLOCK_N, BLOCK_K / 8]`` against x's even and odd code words ``[BLOCK_K / 8]``."""
    dots = dp4a(words & 0x0F0F0F0F, x_even[None, :], tl.zeros((BLOCK_N, BLOCK_K // 8), tl.int32))
    dots = dp4a((words >> 4) & 0x0F0F0F0F, x_odd[None, :], dots)
    return tl.sum(tl.reshape(dots, (BLOCK_N, BLOCK_K // GROUP, GROUP // 8)), axis=2)


@triton.jit
def group_dots_int8(words, x_words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """``group_dots`` for int8 weights: a chunk's words of four signed codes ``[BLOCK_N, BLOCK_K / 4]``
    against x's code words in order ``[BLOCK_K / 4]``, one ``dp4a`` per word."""
    dots = dp4a_signed(words, x_words[None, :], tl.zeros((BLOCK_N, BLOCK_K // 4), tl.int32))
    return tl.sum(tl.reshape(dots, (BLOCK_N, BLOCK_K // GROUP, GROUP // 4)), axis=2)


def stats_size(columns: int, group: int) -> int:
    """Floats of x's stats in ``quantize_activations``' layout for ``columns`` inputs: per group a
    scale, a sum of dequantized x and a sum of x^2. Every buffer of them is sized by this
    (``quantized_activations``, the attention op that rounds o_proj's x, and its fake kernel)."""
    return 3 * (columns // group)


def spreads_evenly(groups_per_program: int) -> bool:
    """Whether ``groups_per_program`` is a launch shape the rounding launch takes: a power of two
    (a program's block of groups), or 0 for one program over all of x."""
    return groups_per_program >= 0 and not groups_per_program & (groups_per_program - 1)


def quantized_activations(x: torch.Tensor, group: int = 32, norm_weight: torch.Tensor | None = None,
                          split: bool = True, pdl: bool = False, groups_per_program: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[K]`` (times ``norm_weight``) -> its codes as int32 words ``[K / 4]`` (even elements,
    then odd, where ``split``: for int4 weights; in order for int8) and the float32 stats
    ``[3 K / group]`` (scales, sums, sums of x^2 per group): the layout ``quantize_activations``
    describes. ``pdl``: launched as a dependent launch where the GPU has them
    (``dependent_launch``); ``groups_per_program``: groups each program rounds (a power of two;
    0: one program for all of x)."""
    columns = x.numel()
    if columns % group or group % 8:
        raise ValueError(f"{columns} inputs in groups of {group}: both must be multiples of 8 and divide")
    if not spreads_evenly(groups_per_program):
        raise ValueError(f"groups_per_program {groups_per_program}: a power of two, or 0 for one program")
    groups = columns // group
    block = triton.next_power_of_2(groups)
    if groups_per_program:
        block = min(groups_per_program, block)
    codes = torch.empty(columns, dtype=torch.int8, device=x.device)
    stats = torch.empty(stats_size(columns, group), dtype=torch.float32, device=x.device)
    launch = dependent_launch(codes, pdl)
    quantize_activations[(triton.cdiv(groups, block),)](
        x.contiguous().view(-1), x if norm_weight is None else norm_weight.contiguous(), codes, stats, K=columns,
        GROUP=group, BLOCK_G=block, NORM=norm_weight is not None, SPLIT=split, PDL=bool(launch),
        num_warps=max(1, min(8, block * group // 512)), **launch)
    return codes.view(torch.int32), stats


def rounded_activations(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x ``[..., K]`` as the kernel sees it: rounded to int8 per group of ``group`` inputs (scale
    ``max |x| / 127``) and back, in float64. For tests' references, and to measure what the
    rounding costs a whole model (benchmarks/weights_quality.py, setting ``int4-x8``)."""
    xg = x.reshape(-1, group).float()
    dx = xg.abs().amax(dim=1) / 127.0
    inverse = torch.where(dx > 0, 1.0 / torch.where(dx > 0, dx, torch.ones_like(dx)), torch.zeros_like(dx))
    codes = torch.floor(xg * inverse[:, None] + 0.5).clamp(-127, 127)
    return (codes.double() * dx.double()[:, None]).reshape(x.shape)
