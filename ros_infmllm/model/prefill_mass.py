"""The attention mass of a whole prefill chunk as a torch op, run by prefill_mass_kernel.py.

The decoder's fused prefill path takes it when a policy reads every query of a chunk (``h2o``), so
such chunks get the fused attention kernels for their output too (see the kernel module for why).
Registered with ``torch.library`` so ``torch.compile`` keeps it as one opaque call in a compiled
prefill and a CUDA graph captures its launches. Where Triton or CUDA is missing the decoder keeps
its explicit path (``decode_attention.kernel_supported``); results agree with it to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillMassTuning:
    """Launch shape: query rows per program (``block_m``), keys per loop step (``block_n``), and
    about how many programs to launch (the keys are split to reach it). Swept on an H200 over a
    27-point grid for four model shapes (benchmarks/results/bench_prefill_mass_sweep_h200.md):
    1024 programs instead of the 512 chosen on paper cut the op's time by 21.5% on qwen2-1.5b's
    frame and 2 to 6% on the other three, the best single setting over all four (at 512 the op
    plus fused attention was no faster than the explicit path per layer)."""

    block_m: int = 64
    block_n: int = 64
    programs: int = 1024
    min_split: int = 256


TUNING = PrefillMassTuning()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("ros_infmllm::prefill_mass", mutates_args=())
def prefill_mass(grouped_q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities summed over every query of a chunk, per KV head and key.

    grouped_q ``[kv_heads, group * T, dim]`` (rotated; rows ordered query head within the group,
    then position); keys ``[kv_heads, W, dim]`` (the cache's, then the chunk's); mask ``[T, W]``
    bool (which keys each position may see). Returns ``[kv_heads, W]`` float32: what the explicit
    path's ``softmax(q k^T / sqrt(dim)).sum(group, queries)`` gives.
    """
    from . import prefill_mass_kernel

    kv_heads, rows_total, dim = grouped_q.shape
    width, chunk = keys.shape[1], mask.shape[0]
    tuning = TUNING
    blocks = _cdiv(rows_total, tuning.block_m)
    splits = max(1, min(tuning.programs // (kv_heads * blocks), _cdiv(width, tuning.min_split)))
    split_len = _cdiv(_cdiv(width, splits), tuning.block_n) * tuning.block_n
    splits = _cdiv(width, split_len)
    q, keys, mask = grouped_q.contiguous(), keys.contiguous(), mask.contiguous().view(torch.uint8)
    f32 = dict(dtype=torch.float32, device=q.device)
    split_max = torch.empty((kv_heads, rows_total, splits), **f32)
    split_sum = torch.empty((kv_heads, rows_total, splits), **f32)
    partial = torch.empty((kv_heads, blocks, width), **f32)
    launch = dict(BLOCK_M=tuning.block_m, BLOCK_N=tuning.block_n, DIM=dim, IEEE=q.dtype == torch.float32)
    scale = dim ** -0.5
    grid = (kv_heads, blocks, splits)
    prefill_mass_kernel.prefill_mass[grid](q, keys, mask, split_max, split_sum, split_max, partial, rows_total,
                                           chunk, width, split_len, scale, PASS=1, **launch)
    overall = split_max.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(overall), overall, torch.zeros_like(overall))
    total = (split_sum * torch.exp(split_max - shift)).sum(dim=-1)
    lse = torch.where(total > 0, shift[..., 0] + torch.log(total), torch.full_like(total, float("inf")))
    prefill_mass_kernel.prefill_mass[grid](q, keys, mask, split_max, split_sum, lse, partial, rows_total,
                                           chunk, width, split_len, scale, PASS=2, **launch)
    return partial.sum(dim=1)


@prefill_mass.register_fake
def _prefill_mass_shape(grouped_q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grouped_q.new_empty((grouped_q.shape[0], keys.shape[1]), dtype=torch.float32)
