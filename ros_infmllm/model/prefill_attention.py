"""Fused prefill attention over grouped queries, and where torch's kernel gives it, each query's
log-sum-exp beside the output.

Why: the prefill mass op (``prefill_mass.py``) needs every query's softmax normaliser. The fused
attention computes it anyway; taken from there, the mass op reads the keys once instead of twice
(its first pass was half of the 6.4 ms ``h2o`` spent per Qwen2.5-VL-3B frame on the mass,
profile_qwen2.5-vl-3b_h2o_h200.txt). torch exposes the normaliser only through its backend ops:
cuDNN's (``lse_from="cudnn"``, the default), the memory-efficient kernel (``"attention"``) and the
flash kernel for the CPU (either source there). ``"kernel"`` keeps plain
``scaled_dot_product_attention`` and lets the mass op compute the normaliser itself.

Measured per layer on an H200 (benchmarks/results/bench_prefill_mass_lse_h200.md), attention plus
mass for a Qwen2.5-VL-3B frame over a full 4096-slot cache: cuDNN 0.200 ms, the mass op's own
first kernel 0.287, the memory-efficient kernel 0.313 (its masked attention is slower than
cuDNN's by more than the pass it saves). Where cuDNN's kernel does not run (``probe_cudnn``: a
GPU, build or head size it lacks) the decoder takes ``"kernel"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LSE_SOURCES = ("cudnn", "attention", "kernel")
# (device type, dtype, head size) -> whether cuDNN's attention with a bias and a log-sum-exp runs;
# filled by ``probe_cudnn`` outside compiled code, read (a constant to the compiler) by attention_with_lse
_CUDNN_RUNS: dict[tuple[str, torch.dtype, int], bool] = {}


def probe_cudnn(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether cuDNN's attention runs here for this dtype and head size: half types and head sizes
    that are multiples of 8 up to 128 only (what torch's own dispatcher sends to cuDNN: called
    directly with float32, cuDNN runs a half-precision kernel without a word, cudnn-frontend issue
    424), then one small masked call checked against the math path (remembered); False off CUDA."""
    device = torch.device(device)
    key = (device.type, dtype, head_dim)
    if key not in _CUDNN_RUNS:
        _CUDNN_RUNS[key] = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                            and head_dim % 8 == 0 and head_dim <= 128 and _cudnn_agrees(device, dtype, head_dim))
    return _CUDNN_RUNS[key]


def _cudnn_agrees(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """cuDNN's output and log-sum-exp of a small masked input against float32 math (or False if it raises)."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, rows, head_dim, device=device, dtype=dtype, generator=generator)
               for rows in (32, 48, 48))
    allowed = torch.ones(32, 48, dtype=torch.bool, device=device)
    allowed[:, 40:] = False
    bias = torch.zeros(32, 48, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias[None, None].expand(1, 2, 32, 48),
                                                                      True)[:2]
        torch.cuda.synchronize(device)
    except (RuntimeError, NotImplementedError):
        return False
    scores = (q.float() @ k.float().transpose(-1, -2)) * head_dim ** -0.5 + bias.float()
    expected_out, expected_lse = scores.softmax(-1) @ v.float(), scores.logsumexp(-1)
    return (bool((out.float() - expected_out).abs().max() < 2e-2)
            and bool((lse.reshape(1, 2, -1)[..., :32].float() - expected_lse).abs().max() < 2e-2))


def padded_rows(mask: torch.Tensor, group: int) -> torch.Tensor:
    """``[T, W]`` -> ``[group * T, W']``: rows following the grouped queries (query head within the
    group, then position), ``W`` padded with False to ``W'``, a multiple of 16: slicing the first
    ``W`` columns keeps a row stride the fused kernels take."""
    return F.pad(mask, (0, -mask.shape[1] % 16)).repeat(group, 1)


def grouped_bool_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """``[T, W]`` -> ``[group * T, W]`` on padded storage (``padded_rows``)."""
    return padded_rows(mask, group)[:, :mask.shape[1]]


def attention(grouped_q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
              group: int) -> torch.Tensor:
    """``[kv_heads, group * T, dim]`` outputs by ``scaled_dot_product_attention`` (4-D, the layout
    its fused kernels take; 3-D falls back to the math path, which materialises the scores)."""
    return F.scaled_dot_product_attention(grouped_q[None], keys[None], values[None],
                                          attn_mask=grouped_bool_mask(mask, group))[0]


def attention_with_lse(grouped_q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                       group: int, lse_from: str = "cudnn") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs ``[kv_heads, group * T, dim]`` and each row's natural log-sum-exp of its scaled masked
    scores ``[kv_heads, group * T]`` float32 (None with ``lse_from="kernel"``, or ``"cudnn"`` on a
    GPU where ``probe_cudnn`` found it does not run or was not asked)."""
    if lse_from not in LSE_SOURCES:
        raise ValueError(f"lse_from {lse_from!r}: choose from {', '.join(LSE_SOURCES)}")
    on_gpu = grouped_q.device.type != "cpu"
    if lse_from == "cudnn" and on_gpu and not _CUDNN_RUNS.get((grouped_q.device.type, grouped_q.dtype,
                                                                grouped_q.shape[-1]), False):
        lse_from = "kernel"
    if lse_from == "kernel":
        return attention(grouped_q, keys, values, mask, group), None
    kv_heads, rows, _ = grouped_q.shape
    width = keys.shape[1]
    allowed = padded_rows(mask, group)  # the bias is sliced from padded storage, as for the bool mask
    bias = torch.zeros(allowed.shape, dtype=grouped_q.dtype, device=grouped_q.device).masked_fill_(
        ~allowed, float("-inf"))[:, :width][None, None].expand(1, kv_heads, rows, width)
    q, k, v = grouped_q[None], keys[None], values[None]
    if not on_gpu:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
    elif lse_from == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
    return out[0], lse[0].reshape(kv_heads, -1)[:, :rows].float()
