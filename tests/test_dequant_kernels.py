"""The one-pass dequantization kernel (model/dequant_kernels.py) against ``QuantizedLinear.dequantized``:
compiled on a GPU, in Triton's interpreter on the CPU (whose bfloat16 conversion truncates, so
bfloat16 is checked on the GPU only, as DTYPES says)."""
from __future__ import annotations

import pytest
import torch

from triton_device import DEVICE, DTYPES  # before the kernels: sets TRITON_INTERPRET on a CPU
from ros_infmllm.model.dequant_kernels import BLOCK_BYTES, dequantize_rows  # noqa: E402
from ros_infmllm.model.quantized import QuantizedLinear  # noqa: E402


def centred_int4(rows: int, columns: int) -> QuantizedLinear:
    generator = torch.Generator().manual_seed(rows)
    codes = torch.randint(0, 256, (rows, columns // 2), dtype=torch.uint8, generator=generator)
    return QuantizedLinear(codes, (torch.rand(rows, columns // 32, generator=generator) + 0.5).half(), None, 4, columns)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["int8", "int4", "int4-centred", "int8-per-row"])
def test_dequantized_rows_equal_the_reference(kind: str, dtype: torch.dtype) -> None:
    # 37 rows of 192: neither the bytes nor the codes fill whole programs of BLOCK_BYTES
    rows, columns = 37, 192
    assert (rows * columns // 2) % BLOCK_BYTES
    if kind == "int4-centred":
        layer = centred_int4(rows, columns)
    else:
        weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(1))
        layer = QuantizedLinear.from_float(weight, None, kind[:4], 0 if kind.endswith("per-row") else None)
    layer = layer.to(DEVICE)
    got = dequantize_rows(layer.qweight, layer.scales, layer.offsets, layer.bits, layer.in_features, dtype)
    assert got.dtype == dtype and got.shape == (rows, columns)
    assert torch.equal(got, layer.dequantized(dtype))
    # a piece of whole rows, as forward takes them
    piece = slice(5, 21)
    offsets = None if layer.offsets is None else layer.offsets[piece]
    assert torch.equal(dequantize_rows(layer.qweight[piece], layer.scales[piece], offsets, layer.bits,
                                       layer.in_features, dtype), layer.dequantized(dtype, piece))
