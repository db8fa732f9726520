"""One-pass dequantization of packed weights on the GPU, for the prefill product.

Why: a prefill chunk multiplies by a packed projection's float copy, made a piece of rows at a
time (``QuantizedLinear.forward``). Made with torch operations that copy is five passes over the
piece (codes unpacked, to float32, times scales, plus offsets, to the model's dtype); this kernel
reads each packed byte once and writes the dtype's values once, so the copy costs what its bytes
cost. ``benchmarks/bench_packed_prefill.py`` times it against the torch operations, cuBLAS on
float weights and PyTorch's int4 GEMM (``torch._weight_int4pack_mm``).

The layout is ``quantized.py``'s: row-major codes, so flat byte ``b`` of an int4 matrix holds
elements ``2b`` (low nibble) and ``2b + 1`` (high), both in flat group ``b // (group / 2)``; an
int8 matrix's flat element ``e`` is in group ``e // group``. Values as ``dequantized`` computes
them (float32 arithmetic, rounded once to the output's dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_BYTES = 2048  # packed bytes per program


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, offsets_ptr, out_ptr, total,
                       BITS: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < total  # total: packed bytes (int4) or codes (int8)
    if BITS == 4:
        byte = tl.load(codes_ptr + index, mask=inside, other=0).to(tl.int32)
        group = index // (GROUP // 2)
        scale = tl.load(scales_ptr + group, mask=inside, other=0.0).to(tl.float32)
        low = (byte & 15).to(tl.float32)
        high = (byte >> 4).to(tl.float32)
        if OFFSET:
            offset = tl.load(offsets_ptr + group, mask=inside, other=0.0).to(tl.float32)
            low = low * scale + offset
            high = high * scale + offset
        else:
            low = (low - 8.0) * scale
            high = (high - 8.0) * scale
        pairs = tl.join(low, high)  # [BLOCK, 2]: element 2b, then 2b + 1
        out_index = tl.join(2 * index, 2 * index + 1)
        tl.store(out_ptr + out_index, pairs.to(out_ptr.dtype.element_ty), mask=tl.join(inside, inside))
    else:
        code = tl.load(codes_ptr + index, mask=inside, other=0).to(tl.float32)
        scale = tl.load(scales_ptr + index // GROUP, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + index, (code * scale).to(out_ptr.dtype.element_ty), mask=inside)


@torch.library.custom_op("ros_infmllm::dequantize_rows", mutates_args=())
def dequantize_rows(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int,
                    in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, in_features]`` in ``dtype`` from a piece of whole rows of packed codes (``qweight``),
    their float16 ``scales`` and, for int4 with offsets, ``offsets``. Registered with
    ``torch.library`` so that a compiled prefill keeps it as one opaque call."""
    rows = qweight.shape[0]
    group = in_features // scales.shape[1]
    out = torch.empty(rows, in_features, dtype=dtype, device=qweight.device)
    total = qweight.numel()
    scales = scales.contiguous()
    has_offsets = offsets is not None
    _dequantize_kernel[(triton.cdiv(total, BLOCK_BYTES),)](
        qweight.contiguous(), scales, offsets.contiguous() if has_offsets else scales, out, total,  # scales: unread
        BITS=bits, GROUP=group, OFFSET=has_offsets, BLOCK=BLOCK_BYTES)
    return out


@dequantize_rows.register_fake
def _dequantize_rows_shape(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int,
                           in_features: int, dtype: torch.dtype) -> torch.Tensor:
    return qweight.new_empty((qweight.shape[0], in_features), dtype=dtype)
