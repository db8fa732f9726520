"""The attention mass of a whole prefill chunk as a torch op, run by prefill_mass_kernel.py.

The decoder's fused prefill path takes it when a policy reads every query of a chunk (``h2o``), so
such chunks get the fused attention kernels for their output too (see the kernel module for why).
Each query's log-sum-exp comes from the fused attention where torch's kernel returns it
(``prefill_attention.py``), so the op reads the keys once; without it, a first kernel computes it.
Registered with ``torch.library`` so ``torch.compile`` keeps it as one opaque call in a compiled
prefill and a CUDA graph captures its launches. Where Triton or CUDA is missing the decoder keeps
its explicit path (``decode_attention.kernel_supported``); results agree with it to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .launch_splits import cdiv, whole_tile_splits


@dataclass
class PrefillMassTuning:
    """Launch shapes. The mass kernel (``mass_by_key``): tiles of ``block_m`` query rows by
    ``mass_block_n`` keys, rows split to reach about ``mass_programs`` programs, ``num_warps``
    warps; swept on an H200 over 24 points for four model shapes (bench_prefill_mass_lse_h200.md:
    64 by 128 on 512 programs and 4 warps was the best for Qwen2.5-VL-3B, 7% under 64 by 64 on
    1024, and the best summed over the four within 1%). The log-sum-exp kernel (``row_stats``, only
    where the attention gives none): ``block_m`` by ``block_n`` tiles, keys split to reach about
    ``programs`` programs with at least ``min_split`` keys each; its 1024 programs were swept over
    27 points (bench_prefill_mass_sweep_h200.md). ``lse_from``: where the decoder takes each
    query's log-sum-exp (``prefill_attention.LSE_SOURCES``)."""

    block_m: int = 64
    block_n: int = 64
    programs: int = 1024
    min_split: int = 256
    mass_block_n: int = 128
    mass_programs: int = 512
    num_warps: int = 4
    lse_from: str = "cudnn"


TUNING = PrefillMassTuning()


@torch.library.custom_op("ros_infmllm::prefill_mass", mutates_args=())
def prefill_mass(grouped_q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                 lse: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities summed over every query of a chunk, per KV head and key.

    grouped_q ``[kv_heads, group * T, dim]`` (rotated; rows ordered query head within the group,
    then position); keys ``[kv_heads, W, dim]`` (the cache's, then the chunk's); mask ``[T, W]``
    bool (which keys each position may see); lse ``[kv_heads, group * T]`` float32, each row's
    natural log-sum-exp of its scaled masked scores if the attention already gave it (None:
    computed here). Returns ``[kv_heads, W]`` float32: what the explicit path's
    ``softmax(q k^T / sqrt(dim)).sum(group, queries)`` gives.
    """
    from . import prefill_mass_kernel

    kv_heads, rows_total, dim = grouped_q.shape
    width, chunk = keys.shape[1], mask.shape[0]
    tuning = TUNING
    q, keys, mask = grouped_q.contiguous(), keys.contiguous(), mask.contiguous().view(torch.uint8)
    ieee = q.dtype == torch.float32
    scale = dim ** -0.5
    if lse is None:  # +inf for a row that sees no key
        lse = _row_lse(q, keys, mask, chunk, scale, dict(BLOCK_M=tuning.block_m, BLOCK_N=tuning.block_n, DIM=dim,
                                                         IEEE=ieee))
    else:  # +inf where a row sees no key (the attention may report -inf or nan): its terms exp(s - inf) are 0
        lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf"))).float().contiguous()
    key_blocks = cdiv(width, tuning.mass_block_n)
    most = tuning.mass_programs // (kv_heads * key_blocks)
    splits, rows_per_split = whole_tile_splits(rows_total, tuning.block_m, most, tuning.block_m)
    partial = torch.empty((kv_heads, splits, width), dtype=torch.float32, device=q.device)
    prefill_mass_kernel.mass_by_key[(kv_heads, key_blocks, splits)](
        q, keys, mask, lse, partial, rows_total, chunk, width, rows_per_split, scale, BLOCK_M=tuning.block_m,
        BLOCK_N=tuning.mass_block_n, DIM=dim, IEEE=ieee, num_warps=tuning.num_warps)
    return partial.sum(dim=1)


def _row_lse(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, chunk: int, scale: float,
             launch: dict) -> torch.Tensor:
    """Each row's log-sum-exp by the ``row_stats`` kernel (keys split across programs, combined
    here); +inf for a row that sees no key."""
    from . import prefill_mass_kernel

    kv_heads, rows_total, _ = q.shape
    width, tuning = keys.shape[1], TUNING
    blocks = cdiv(rows_total, tuning.block_m)
    most = tuning.programs // (kv_heads * blocks)
    splits, split_len = whole_tile_splits(width, tuning.block_n, most, tuning.min_split)
    split_max = torch.empty((kv_heads, rows_total, splits), dtype=torch.float32, device=q.device)
    split_sum = torch.empty_like(split_max)
    prefill_mass_kernel.row_stats[(kv_heads, blocks, splits)](q, keys, mask, split_max, split_sum, rows_total, chunk,
                                                              width, split_len, scale, **launch)
    overall = split_max.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(overall), overall, torch.zeros_like(overall))
    total = (split_sum * torch.exp(split_max - shift)).sum(dim=-1)
    return torch.where(total > 0, shift[..., 0] + torch.log(total), torch.full_like(total, float("inf")))


@prefill_mass.register_fake
def _prefill_mass_shape(grouped_q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                        lse: torch.Tensor | None = None) -> torch.Tensor:
    return grouped_q.new_empty((grouped_q.shape[0], keys.shape[1]), dtype=torch.float32)
