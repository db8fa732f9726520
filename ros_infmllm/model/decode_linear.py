"""One decode token's linear layers as a torch op run by the Triton kernel of matvec_kernels.py:
faster than cuBLAS at batch 1, with RMSNorm, bias, SwiGLU and the residual add folded in (see that
module for why).

Registered with ``torch.library`` so that ``torch.compile`` keeps each call as one opaque op inside
the compiled decode block and a CUDA graph captures it. Where Triton or CUDA is missing the decoder
keeps ``nn.Linear`` and the separate norms (``kernel_supported``); results agree to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode_attention import triton_runs_on


@dataclass
class MatvecTuning:
    """Launch shape: output rows per program, input elements per loop step, warps per program.
    Chosen on an H100 over the Qwen2-1.5B and LLaMA-2-7B matrices (benchmarks/bench_decode_linear.py,
    results/bench_decode_linear.md): one row per program in 1024-wide chunks was within 2% of the
    best shape for every matrix."""

    block_n: int = 1
    block_k: int = 1024
    num_warps: int = 4


TUNING = MatvecTuning()


def kernel_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton matrix-vector kernel can run here (see ``triton_runs_on``)."""
    return triton_runs_on(device) and dtype in (torch.bfloat16, torch.float16, torch.float32)


@torch.library.custom_op("ros_infmllm::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                  residual: torch.Tensor | None, eps: float, gated: bool) -> torch.Tensor:
    """``residual + W @ norm(x) + bias`` for one token, each term optional.

    x ``[1, K]``; weight ``[N, K]``, or gate and up stacked ``[2N, K]`` with ``gated`` (then the
    result is ``silu(gate) * up``); bias ``[N]`` (``[2N]`` gated); norm_weight ``[K]``: RMSNorm of
    x with this weight and ``eps`` first; residual ``[1, N]``. Returns ``[1, N]`` in x's dtype.
    """
    from . import matvec_kernels

    rows = weight.shape[0] // (2 if gated else 1)
    columns = weight.shape[1]
    out = x.new_empty((1, rows))
    placeholder = out
    tuning = TUNING
    matvec_kernels.matvec[(-(-rows // tuning.block_n),)](
        x.contiguous(), weight.contiguous(), out,
        placeholder if norm_weight is None else norm_weight.contiguous(),
        placeholder if bias is None else bias.contiguous(),
        placeholder if residual is None else residual.contiguous(), eps,
        N=rows, K=columns, NORM=norm_weight is not None, GATED=gated, BIAS=bias is not None,
        RESIDUAL=residual is not None, BLOCK_N=tuning.block_n, BLOCK_K=min(tuning.block_k, _pow2_at_least(columns)),
        num_warps=tuning.num_warps)
    return out


@decode_linear.register_fake
def _decode_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         norm_weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
                         gated: bool) -> torch.Tensor:
    return x.new_empty((1, weight.shape[0] // (2 if gated else 1)))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
