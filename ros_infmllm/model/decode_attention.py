"""One decode token's attention over the bounded cache as a torch op, run by the Triton kernels of
decode_kernels.py (two launches per layer instead of about six; see that module for why).

Registered with ``torch.library`` so that ``torch.compile`` keeps it as one opaque call inside the
compiled decode block and a CUDA graph captures its launches. Where Triton or CUDA is missing the
decoder keeps its explicit path (``kernel_supported``); results agree with it to rounding.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .launch_splits import cdiv, whole_tile_splits


@dataclass
class DecodeKernelTuning:
    """Launch shape. block: slots per loop step of a split where each KV head serves one query
    head; grouped_block: the same where it serves several (grouped-query attention: the score
    tile has a row per query head, so a longer step pays for its loads on more rows); programs:
    about how many (KV head, split) programs to launch; min_split: fewest slots per split (the
    splits per head follow from both); num_warps, num_stages: per program of the partial kernel;
    int8_block, int8_programs, int8_num_warps, int8_num_stages: the same for an int8 cache's pass;
    valid_words: that pass reads the slots' validity bytes as whole 32-bit words where it can;
    mass_block / grouped_mass_block: slots per mass program of the combine kernel where a KV head
    serves one query head / several (a grouped program sums a row per query head, so it takes
    more slots per program); combine_warps / grouped_combine_warps: warps per program of the
    combine kernel, alike; merge_elements: most split values one merge step loads at once; pdl:
    programmatic dependent launch on GPUs that have it (compute capability 9+, see
    matvec_kernels.py): the partial pass requests its first keys before q is written.
    Chosen on an H100 (benchmarks/bench_decode_attention.py, results/bench_decode_attention.md);
    where each KV head serves one query head, on an H200 since (below)."""

    # one query head per KV head (SmolVLM2, LLaMA-2-7B; bench_decode_attention_split_*_h200.md):
    # more, shorter splits than the first 264 programs (8 splits of 512 slots per head), so that
    # each program's chain of dependent loads is short: LLaMA-2-7B's call 27.4 -> 23.0 us with the
    # mass, SmolVLM2's 26.6 -> 19.6 at this shape (19.1 at 64 slots and 528 programs, its best);
    # with the one-warp combine below, 21.0 and 14.5 (bench_decode_attention_combine1_h200.md).
    # The grouped shapes keep 32 splits per head (grouped_block rounds them up to 128 slots).
    block: int = 128
    grouped_block: int = 128
    programs: int = 1056
    min_split: int = 32
    num_warps: int = 4
    num_stages: int = 3
    # an int8 cache's partial pass (decode_kernels_int8.py): slots per loop step, about how many
    # programs, warps and pipeline stages, for every group size. Its loop is pipelined (the next
    # tiles' codes and table rows copied into shared memory), so its programs walk several tiles
    # each (the 7B shape: 8 splits of 512 slots per KV head). On an H100 the 7B call took 28.1 us at
    # this shape and 27.3 at the sweep's best (64 slots, 8 warps, 3 stages), against 38.6 for the
    # previous pass and 26.1 over bf16; in the whole 7B int4 step the two shapes measured alike
    # (2.903 and 2.910 ms: results/bench_decode_attention_kv8_pipelined_h100.md,
    # decode_kv8_pipelined_h100.md). At 3 stages of 128 slots it needs 145 KB of shared memory
    # (under a Jetson Orin's 163 KB; tests/test_decode_attention.py checks both GPUs)
    int8_block: int = 128
    int8_programs: int = 264
    int8_num_warps: int = 4
    int8_num_stages: int = 2
    # the one-pass pass's keys requested before waiting for q where a split is one tile (as
    # two_pass_keys_early does for the two-pass kernel; Qwen2-1.5B's shipped shape at 4,096 slots is
    # 32 one-tile splits per KV head). Compiled for sm_90 it then holds 147 registers against 185 (3
    # programs per SM instead of 2: no pipelined loop). On an H100 the 1.5B int4 step over the int8
    # cache 0.981 / 0.979 -> 0.938 / 0.937 ms, alternated (results/decode_int8_keys_early_1p5b_h100.md)
    int8_keys_early: bool = True
    # an int8 cache's pass reads the slots' validity bytes as whole 32-bit words where the capacity
    # and the tensor's address allow (decode_kernels_int8.slot_validity): on an H100 the 7B int4
    # step over the int8 cache 2.677 -> 2.654 ms (results/decode_valid_words_h100.md)
    valid_words: bool = True
    # where each KV head serves one query head, an int8 cache takes the two-pass kernel
    # (decode_kernels_int8_two_pass.py: keys, then values, no padded dot, no tile rescaled) with its
    # own slots per loop step, programs, warps and pipeline stages. On an H100 (one machine; sweep of
    # 54 shapes: results/bench_decode_attention_kv8_two_pass_h100.md) the 7B call with the mass took
    # 20.7 us at this shape (one 128-slot tile per split) against 27.2 for the one-pass kernel, and
    # SmolVLM2's 12.7 against 22.4; the 7B int4 step over the int8 cache 2.686 -> 2.442 / 2.444 ms
    # (results/decode_two_pass_h100.md)
    two_pass: bool = True
    two_pass_block: int = 128
    two_pass_programs: int = 1056
    two_pass_num_warps: int = 4
    two_pass_num_stages: int = 2
    # registers per thread the two-pass kernel is compiled to at most (Triton's ``maxnreg``; 0: no
    # cap, ptxas chooses; CUDA only). Uncapped it takes 124 at the 7B shape, so 4 programs of 4 warps
    # fit an SM, and ncu found it latency-bound there (0.66 of 3.56 warps ready per scheduler, DRAM
    # 54%: results/decode_l2_prefetch_h100.md). Swept on one H100 (Triton 3.6; results/
    # decode_maxnreg_h100.md): 112 took the 7B call 20.4-20.6 -> 19.8-20.1 us and SmolVLM2's
    # 12.7-12.8 -> 12.0-12.3 (still 4 programs per SM: ptxas schedules the capped code better);
    # 120 and 104 gained nothing at 7B, 96 and below spill and lose (7B 24.2 us at 96, 53.5 at 64).
    # The 7B int4 step over the int8 cache, alternated: 2.406 / 2.407 -> 2.385 / 2.378 ms
    two_pass_maxnreg: int = 112
    # where a split is one tile (the shipped shape at 4,096 slots), its keys (codes, table rows,
    # scales, validity) are requested before waiting for the launch that wrote q: a decode step's
    # launches never write the cache, so programs placed during the q/k/v product's last wave load
    # while it finishes (decode_kernels_int8_two_pass.py). On an H100, alternated with the cap of
    # 112 in both: the 7B int4 step over the int8 cache 2.413 / 2.414 -> 2.385 / 2.382 ms, SmolVLM2's
    # 1.673 -> 1.668 (results/decode_keys_early_7b_h100.md, decode_keys_early_smolvlm2_h100.md)
    two_pass_keys_early: bool = True
    # mass slots per program: on an H200 (bench_decode_attention_mass_h200.md) SmolVLM2's call (32
    # KV heads, one query head each) took 26.6 us at 256 against 37.0 at 512 and 47.6 at 1024, and
    # Qwen2-1.5B's (2 KV heads, 6 query heads each) 7.3 at 1024 against 7.5 at 512 and 7.8 at 256
    mass_block: int = 256
    grouped_mass_block: int = 1024
    # one warp where a combine program serves one query head: its merge and mass rows are one
    # row long, and with four warps the reductions across warps cost more than the work. On an
    # H200 (benchmarks/probe_decode_combine.py, results/probe_decode_combine_h200.txt) SmolVLM2's
    # pair of kernels took 19.3 us with the mass at four warps, 14.2 at one (14.0 without the
    # mass); LLaMA-2-7B's, at 256 slots per mass program, 23.2 -> 20.8
    combine_warps: int = 1
    grouped_combine_warps: int = 4
    merge_elements: int = 8192
    pdl: bool = True

    def takes_two_pass(self, group: int, int8: bool) -> bool:
        """Whether an ``int8`` cache whose KV heads serve ``group`` query heads each is read by the
        two-pass kernel."""
        return int8 and group == 1 and self.two_pass

    def block_for(self, group: int, int8: bool = False) -> int:
        """Slots per loop step for KV heads that serve ``group`` query heads each (``int8``: over
        an int8 cache's codes)."""
        if self.takes_two_pass(group, int8):
            return self.two_pass_block
        if int8:
            return self.int8_block
        return self.grouped_block if group > 1 else self.block

    def programs_for(self, group: int, int8: bool = False) -> int:
        """Programs the partial pass aims at for KV heads that serve ``group`` query heads each."""
        if self.takes_two_pass(group, int8):
            return self.two_pass_programs
        return self.int8_programs if int8 else self.programs

    def keys_early_for(self, group: int, int8: bool) -> bool:
        """Whether an ``int8`` cache's pass for KV heads that serve ``group`` query heads each
        requests a one-tile split's keys before the wait for q (its kernel's field)."""
        return int8 and (self.two_pass_keys_early if self.takes_two_pass(group, int8) else self.int8_keys_early)

    def mass_block_for(self, group: int) -> int:
        """Slots per mass program for KV heads that serve ``group`` query heads each."""
        return self.grouped_mass_block if group > 1 else self.mass_block

    def combine_warps_for(self, group: int) -> int:
        """Warps per program of the combine kernel for KV heads that serve ``group`` query heads each."""
        return self.grouped_combine_warps if group > 1 else self.combine_warps


TUNING = DecodeKernelTuning()
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the Triton decode kernels take


def kernel_supported(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels can run here: ``triton_runs_on(device)``, a power-of-two head
    size of at least 16, a float dtype."""
    return (triton_runs_on(device) and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and dtype in KERNEL_DTYPES)


def triton_runs_on(device: torch.device) -> bool:
    """Triton installed, and the device a CUDA GPU (or the CPU under Triton's interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def dependent_launch(tensor: torch.Tensor, enabled: bool) -> dict:
    """Launch options for programmatic dependent launch (see matvec_kernels.py): on where asked
    and the GPU has it (compute capability 9+); empty (off) elsewhere, the interpreter included.
    A kernel's ``PDL`` constant is ``bool`` of this."""
    on = enabled and tensor.is_cuda and torch.cuda.get_device_capability(tensor.device)[0] >= 9
    return {"launch_pdl": True} if on else {}


def register_cap(maxnreg: int, on_gpu: bool = True) -> dict:
    """Launch (or ahead-of-time compile) options capping a kernel's registers per thread at
    ``maxnreg`` (Triton's compile option, part of its cache key): where asked (``maxnreg`` > 0) for
    a GPU; empty elsewhere (``on_gpu`` false: the interpreter, which compiles nothing)."""
    if maxnreg < 0:
        raise ValueError(f"maxnreg {maxnreg}: registers per thread take 0 (no cap) or a positive cap")
    return {"maxnreg": maxnreg} if maxnreg and on_gpu else {}


def reads_valid_words(valid: torch.Tensor, tuning: DecodeKernelTuning) -> bool:
    """Whether the int8 pass reads ``valid`` ``[C]`` (bytes) as whole 32-bit words: asked by
    ``tuning.valid_words``, and C and the tensor's address multiples of 4, so that every word it
    reads lies inside the mask."""
    return tuning.valid_words and valid.shape[-1] % 4 == 0 and valid.data_ptr() % 4 == 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@torch.library.custom_op("ros_infmllm::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, valid: torch.Tensor, with_mass: bool,
                     k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                     read_cos: Optional[torch.Tensor] = None, read_sin: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query token over the cache slots and itself.

    q ``[heads, dim]`` (rotated); k_new, v_new ``[kv_heads, dim]`` (the token's own key and value);
    cache_k, cache_v ``[kv_heads, C, dim]``: values, or an int8 cache's codes (keys unrotated) with
    their row scales ``k_scale``, ``v_scale`` ``[kv_heads, C]`` (float32) and the slots' rotation
    tables ``read_cos``, ``read_sin`` ``[C, dim / 2]`` (float16; cache/kv_codes.py); valid ``[C]``
    bool. Returns the output ``[heads, dim]`` in q's dtype and, with ``with_mass``, the
    probabilities summed over each KV group's query heads ``[kv_heads, C + 1]`` float32 (the
    slots, then the token itself; empty otherwise).
    """
    out, mass, _, _ = _launch(q, k_new, v_new, cache_k, cache_v, valid, with_mass,
                              (k_scale, v_scale, read_cos, read_sin), 0, False)
    return out, mass


@torch.library.custom_op("ros_infmllm::decode_attention_codes", mutates_args=())
def decode_attention_codes(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache_k: torch.Tensor,
                           cache_v: torch.Tensor, valid: torch.Tensor, with_mass: bool, x8_group: int,
                           x8_split: bool, k_scale: Optional[torch.Tensor] = None,
                           v_scale: Optional[torch.Tensor] = None, read_cos: Optional[torch.Tensor] = None,
                           read_sin: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``decode_attention``, and its output rounded for the o projection's int8-activation product
    by the launch that writes it: its int8 codes ``[heads * dim]`` and float32 stats
    ``[3 heads dim / x8_group]`` (``x8_split``: even elements then odd, for int4 weights), as
    ``matvec_dp4a.quantized_activations(out, x8_group, split=x8_split)`` lays them out (its
    ``x_codes`` / ``x_stats`` for ``decode_linear``). ``x8_group`` must divide ``dim``: a combine
    program rounds the groups of its own query head."""
    if x8_group <= 0 or q.shape[1] % x8_group or x8_group % 8:
        raise ValueError(f"x8_group {x8_group}: must be a positive multiple of 8 dividing the head size {q.shape[1]}")
    return _launch(q, k_new, v_new, cache_k, cache_v, valid, with_mass, (k_scale, v_scale, read_cos, read_sin),
                   x8_group, x8_split)


def _launch(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
            valid: torch.Tensor, with_mass: bool, int8_rows: tuple, x8_group: int, x8_split: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both ops' launches: the partial pass (float or int8 cache), then the combine, which also
    rounds the output where ``x8_group`` is set (else the codes and stats are empty)."""
    from . import decode_kernels, decode_kernels_int8, decode_kernels_int8_two_pass
    from .matvec_dp4a import stats_size

    heads, dim = q.shape
    kv_heads, capacity, _ = cache_k.shape
    group = heads // kv_heads
    tuning = TUNING
    scaled = cache_k.dtype == torch.int8
    if any((t is None) == scaled for t in int8_rows):
        raise ValueError("an int8 cache takes its row scales and rotation tables; a float cache takes none")
    two_pass = tuning.takes_two_pass(group, scaled)
    block = tuning.block_for(group, scaled)
    programs = tuning.programs_for(group, scaled)
    splits, split_len = whole_tile_splits(capacity, block, programs // kv_heads, max(block, tuning.min_split))
    keys_early = tuning.keys_early_for(group, scaled) and split_len == block  # a split of one tile only
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    cache_k, cache_v = cache_k.contiguous(), cache_v.contiguous()
    launch = dependent_launch(q, tuning.pdl)
    f32 = dict(dtype=torch.float32, device=q.device)
    # the two-pass kernel's values pass reads back the scores its keys pass wrote
    scores = torch.empty((heads, capacity) if with_mass or two_pass else (1,), **f32)
    split_max, split_sum = torch.empty((heads, splits), **f32), torch.empty((heads, splits), **f32)
    split_acc = torch.empty((heads, splits, dim), **f32)
    out = torch.empty_like(q)
    mass = torch.empty((kv_heads, capacity + 1) if with_mass else (0,), **f32)
    codes = torch.empty(heads * dim if x8_group else 0, dtype=torch.int8, device=q.device)
    x_stats = torch.empty(stats_size(heads * dim, x8_group) if x8_group else 0, **f32)
    scale = dim ** -0.5
    tensors = (q, cache_k, cache_v, valid.contiguous().view(torch.uint8), scores, split_max, split_sum, split_acc)
    # what every partial pass takes; the float and one-pass int8 kernels also pad the query rows of a KV head
    # and store the scores only where the mass asks (the two-pass kernel's values pass always reads them)
    common = dict(SPLIT_LEN=split_len, DIM=dim, BLOCK=block, NUM_SPLITS=splits, IEEE=q.dtype == torch.float32,
                  PDL=bool(launch), **launch)
    shape = dict(common, GROUP=group, GROUP_PAD=max(16, _next_power_of_2(group)), WITH_SCORES=with_mass)
    if scaled:
        codes_in = (*tensors, *(t.contiguous() for t in int8_rows), capacity, scale)
        valid_words = reads_valid_words(tensors[3], tuning)
    if two_pass:
        decode_kernels_int8_two_pass.partial_attention_codes_two_pass[(kv_heads, splits)](
            *codes_in, **common, VALID_WORDS=valid_words, STAGES=tuning.two_pass_num_stages,
            KEYS_EARLY=keys_early,
            num_warps=tuning.two_pass_num_warps, num_stages=tuning.two_pass_num_stages,
            **register_cap(tuning.two_pass_maxnreg, q.is_cuda))
    elif scaled:
        decode_kernels_int8.partial_attention_codes[(kv_heads, splits)](
            *codes_in, **shape, VALID_WORDS=valid_words, KEYS_EARLY=keys_early,
            num_warps=tuning.int8_num_warps, num_stages=tuning.int8_num_stages)
    else:
        decode_kernels.partial_attention[(kv_heads, splits)](
            *tensors, capacity, scale, **shape, num_warps=tuning.num_warps, num_stages=tuning.num_stages)
    splits_pad = _next_power_of_2(splits)
    mass_block = tuning.mass_block_for(group)
    blocks = cdiv(capacity, mass_block) if with_mass else 0
    decode_kernels.combine_attention[(kv_heads, group + blocks)](
        q, k_new, v_new, scores, split_max, split_sum, split_acc, out, mass if with_mass else scores,
        codes if x8_group else scores, x_stats if x8_group else scores, capacity, scale, GROUP=group,
        ROWS=_next_power_of_2(group), DIM=dim, NUM_SPLITS=splits, SPLITS_PAD=splits_pad,
        SPLIT_CHUNK=min(splits_pad, max(1, tuning.merge_elements // dim)), MASS_BLOCK=mass_block, PDL=bool(launch),
        X8_GROUP=x8_group, X8_SPLIT=x8_split, num_warps=tuning.combine_warps_for(group), **launch)
    return out, mass, codes, x_stats


@decode_attention.register_fake
def _decode_attention_shapes(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache_k: torch.Tensor,
                             cache_v: torch.Tensor, valid: torch.Tensor, with_mass: bool,
                             k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                             read_cos: Optional[torch.Tensor] = None, read_sin: Optional[torch.Tensor] = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    mass_shape = (cache_k.shape[0], cache_k.shape[1] + 1) if with_mass else (0,)
    return torch.empty_like(q), q.new_empty(mass_shape, dtype=torch.float32)


@decode_attention_codes.register_fake
def _decode_attention_codes_shapes(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache_k: torch.Tensor,
                                   cache_v: torch.Tensor, valid: torch.Tensor, with_mass: bool, x8_group: int,
                                   x8_split: bool, k_scale: Optional[torch.Tensor] = None,
                                   v_scale: Optional[torch.Tensor] = None, read_cos: Optional[torch.Tensor] = None,
                                   read_sin: Optional[torch.Tensor] = None
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .matvec_dp4a import stats_size

    out, mass = _decode_attention_shapes(q, k_new, v_new, cache_k, cache_v, valid, with_mass)
    width = q.shape[0] * q.shape[1]
    return (out, mass, q.new_empty(width, dtype=torch.int8),
            q.new_empty(stats_size(width, x8_group), dtype=torch.float32))
