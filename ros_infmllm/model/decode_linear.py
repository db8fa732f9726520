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

from .decode_attention import KERNEL_DTYPES, dependent_launch, triton_runs_on

X8_MAX_GROUP = 64  # widest weight group whose products may take x's int8 codes (x is rounded per group)


@dataclass
class MatvecTuning:
    """Launch shape: output rows per program (``gated_block_n`` for SwiGLU and rotary, whose
    programs read a pair of rows each; ``wide_block_n`` for products of at least ``wide_rows``
    outputs: the LM head, where one row per program left the chip under-filled with requests),
    input elements per loop step (halved where that divides the input
    size and the full chunk does not), warps per program; ``pdl``: programmatic dependent launch
    on GPUs that have it (compute capability 9+). Chosen on an H100 over the Qwen2-0.5B, 1.5B and
    LLaMA-2-7B matrices (benchmarks/bench_decode_linear.py, results/bench_decode_linear.md)."""

    block_n: int = 1
    gated_block_n: int = 1
    wide_block_n: int = 4
    wide_rows: int = 16384
    block_k: int = 1024
    num_warps: int = 4
    pdl: bool = True
    # packed weights: rows per program (halved for paired rows: SwiGLU, rotary), from a sweep of the
    # LLaMA-2-7B matrices on an H200 (results/bench_decode_linear_int8_h200.md, _int4_h200.md):
    # int8 4 rows (89.5 us per layer against 99.6 at 2), int4 8 (96.9 against 126.6 at 4)
    int8_block_n: int = 4
    int4_block_n: int = 8
    # packed weights' input elements per loop step and warps per program, apart from the float
    # weights' (a packed row's chunk is a half or a quarter of the bytes of a float row's). int4: the
    # 7B matrices' sweep on an H200 (results/bench_decode_linear_int4_sweep_h200.md) gave 81.1 us per
    # layer at 4096 against 95.8 at 1024, and the dp4a path's best is 4096 too
    # (bench_dp4a_matvec_sweep_h200.md). int8's dp4a path: 4096 as well (68.7 us per 7B layer against
    # 75.0 at 1024, bench_decode_linear_int8_dp4a_sweep_h200.md)
    int8_block_k: int = 4096
    int4_block_k: int = 4096
    packed_num_warps: int = 4
    # chunks of packed bytes requested ahead of the one being multiplied (1 or 2; matvec_kernels AHEAD)
    packed_ahead: int = 1
    # int4 products against x rounded to int8 per group ("int8": dp4a, model/matvec_dp4a.py) or float
    # x ("float", exact to the codes). int8 counts 2.20 instructions per code against 7.09 and costs
    # SmolLM2 +0.005 nats/token (docs/quantized_weights.md); on an H200 the 7B int4 model decodes in
    # 2.714 ms with it against 3.826 with float x at the same chunk (results/bench_gpu_int4_x8_h200.md,
    # _float_h200.md), at x8_block_n 4 rows per program (bench_dp4a_matvec_sweep_h200.md), so shipped
    int4_activations: str = "int8"
    # rows per program of the dp4a products: 4 from that H200 sweep until the twenty-fifth session; 8 on
    # an H100 since (7B int4 step 2.604 / 2.605 -> 2.579 / 2.578 ms, 1.5B 1.005 / 1.003 -> 0.953 / 0.961,
    # results/decode_x8_rows_h100.md); not yet timed on an H200
    x8_block_n: int = 8
    # int8 products against x's int8 codes ("int8": one signed dp4a per word of four codes, as
    # llama.cpp's Q8_0 x Q8_1) or float x ("float", exact to the codes); its rows per program stay
    # int8_block_n. Only for groups of at most X8_MAX_GROUP inputs (x is rounded per weight group).
    # On an H200 the 7B int8 layer takes 68.7 us against float x's best 87.0
    # (bench_decode_linear_int8_{dp4a_,}sweep_h200.md) and the 7B int8 model decodes in 3.311 ms,
    # 1.27x llama.cpp's Q8_0 in the same session (bench_llamacpp_h200.md); SmolLM2 +0.0067
    # nats/token against float (weights_quality_cpu_dp4a_int8.md), inside the int8 bound of +0.01
    int8_activations: str = "int8"
    # the launch that rounds x for the dp4a path joins the products' chain of dependent launches
    # (with pdl): the product after it is placed and fetches its first weights while it runs. Off,
    # it ran as a plain launch between two dependent ones, so each packed product paid its latency
    # and ramp in full (0.31 ms of a 2.53 ms 7B int4 step, profile_llama2-7b_int4_h200.txt); joined,
    # the 7B int4 step went 2.537 -> 2.267 ms (bench_gpu_7b_policies_{off,on}_h200.md)
    activation_pdl: bool = True
    # o_proj's x codes written by the attention's combine launch (decode_attention_codes), which
    # owns whole heads and so whole groups, instead of by a rounding launch of their own (one of the
    # four per layer that bound 0.256 ms of the 7B int4 step on an H100, docs/quantized_weights.md)
    fused_x_codes: bool = True
    # groups of x each program of the rounding launch rounds (a power of two; 0: one program for
    # the whole of x, as shipped until the twenty-fifth session). A group needs nothing of the
    # others (each keeps its own sum of squares), so the launch that sits between two products in
    # the chain of dependent launches is spread over many small programs. On an H100 at 4: 7B int4
    # step 2.721 -> 2.629 ms, 1.5B int4 1.062 -> 1.007, 7B int8 3.601 -> 3.530; 1 and 16 alike
    # (results/decode_round_groups_h100.md)
    x8_round_groups: int = 4
    # the bias requested before waiting for the previous launch, the residual and rotary angles right
    # after it (EARLY_EPILOGUE), instead of after the products. On two H100s the 7B bf16 step 5.586 ->
    # 5.558 and 5.582 -> 5.558 ms; the 7B int4 step 2.586 / 2.587 -> 2.583 / 2.583
    # (results/decode_early_loads_h100.md; the scales and offsets requested with the codes, also
    # there, were slower and were removed)
    early_epilogue: bool = True
    # a product whose output the next product reads as int8 codes (o_proj before gate/up, gate/up
    # before down, down before the next block's q/k/v or a packed LM head) rounds it as it writes it
    # (matvec_kernels ROUND: the last program writing a group rounds it), instead of a rounding launch
    # of its own between the two products. Off: on one H100 it took the 7B int4 step over the int8
    # cache 2.406 / 2.408 -> 2.385 / 2.385 ms (and 2.406 -> 2.390 / 2.389 on a second machine), but
    # the Qwen2-1.5B int4 step 0.979 -> 1.040 ms: each product's programs end with a release and an
    # atomic, a tail the dependent launches cannot hide, where the rounding launch it replaces
    # overlapped them (results/decode_round_written_h100.md)
    round_written: bool = False

    def x8(self, bits: int, group: int = 32) -> bool:
        """Whether products with weights of ``bits`` in groups of ``group`` inputs take x's int8
        codes (the dp4a path); a wider group (int8 per output channel) would round x too coarsely,
        and x's codes are laid out in words of eight per group half (a multiple of 8 inputs)."""
        chosen = {4: self.int4_activations, 8: self.int8_activations}.get(bits)
        return chosen == "int8" and group <= X8_MAX_GROUP and group % 8 == 0

    @staticmethod
    def rows_field(bits: int, x8: bool) -> str:
        """The field holding output rows per program for packed weights of ``bits`` (``x8``: the
        dp4a path, whose rows are a field of their own)."""
        return "int8_block_n" if bits == 8 else "x8_block_n" if x8 else "int4_block_n"

    def check(self, bits: int) -> None:
        """Refuse a setting the packed kernels cannot take (a misspelt value would pick a path silently)."""
        if bits and self.packed_ahead not in (1, 2):
            raise ValueError(f"MatvecTuning.packed_ahead is {self.packed_ahead}: "
                             "the kernel requests 1 or 2 chunks ahead")
        from .matvec_dp4a import spreads_evenly

        if bits and not spreads_evenly(self.x8_round_groups):
            raise ValueError(f"MatvecTuning.x8_round_groups is {self.x8_round_groups}: a power of two, "
                             "or 0 for one program")
        for name in {4: ("int4_activations",), 8: ("int8_activations",)}.get(bits, ()):
            if getattr(self, name) not in ("float", "int8"):
                raise ValueError(f"MatvecTuning.{name} is {getattr(self, name)!r}: 'float' or 'int8'")

    def chunk(self, bits: int) -> int:
        """Input elements per loop step for weights of ``bits`` (0: float)."""
        return {8: self.int8_block_k, 4: self.int4_block_k}.get(bits, self.block_k)

    def warps(self, bits: int) -> int:
        """Warps per program for weights of ``bits`` (0: float)."""
        return self.packed_num_warps if bits else self.num_warps


TUNING = MatvecTuning()


def kernel_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton matrix-vector kernel can run here (see ``triton_runs_on``)."""
    return triton_runs_on(device) and dtype in KERNEL_DTYPES


@torch.library.custom_op("ros_infmllm::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                  residual: torch.Tensor | None, eps: float, gated: bool, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None, rotated_rows: int = 0, scales: torch.Tensor | None = None,
                  offsets: torch.Tensor | None = None, bits: int = 0, x_codes: torch.Tensor | None = None,
                  x_stats: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + W @ norm(x) + bias`` for one token, each term optional.

    x ``[1, K]``; weight ``[N, K]``, or gate and up stacked ``[2N, K]`` with ``gated`` (then the
    result is ``silu(gate) * up``); bias ``[N]`` (``[2N]`` gated); norm_weight ``[K]``: RMSNorm of
    x with this weight and ``eps`` first; residual ``[1, N]``; cos, sin ``[1, head_dim]`` (the
    token's rotary angles, as ``Rotary.cos_sin`` gives them): the first ``rotated_rows`` outputs,
    whole heads of ``head_dim``, are rotated (q and k of a fused q/k/v). Returns ``[1, N]`` in x's dtype.
    ``bits`` 8 or 4: ``weight`` holds packed codes (int8 ``[N, K]`` or uint8 ``[N, K / 2]``) with
    float16 ``scales`` ``[N, K / group]`` and, for int4, ``offsets`` of the same shape or None
    (codes centred on 8); the layout of ``QuantizedLinear`` (model/quantized.py).
    ``x_codes``, ``x_stats``: x already rounded to int8 codes by the launch that wrote it
    (``decode_attention_codes``, ``decode_linear_codes``), in ``quantized_activations``' layout,
    with ``norm_weight``'s weight folded in where there is one (its RMS is applied from the stats);
    only where this product reads x's codes (``MatvecTuning.x8``). Then no rounding launch runs.
    """
    return _launch(x, weight, bias, norm_weight, residual, eps, gated, cos, sin, rotated_rows, scales, offsets, bits,
                   x_codes, x_stats)[0]


@torch.library.custom_op("ros_infmllm::decode_linear_codes", mutates_args=())
def decode_linear_codes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        norm_weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float, gated: bool,
                        round_group: int, round_split: bool, round_norm: torch.Tensor | None = None,
                        scales: torch.Tensor | None = None, offsets: torch.Tensor | None = None, bits: int = 0,
                        x_codes: torch.Tensor | None = None, x_stats: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``decode_linear`` (no rotary), and its output rounded for the next product by the launch that
    writes it: int8 codes ``[N]`` and float32 stats ``[3 N / round_group]`` as
    ``matvec_dp4a.quantized_activations(out, round_group, round_norm, split=round_split)`` lays them
    out (its ``x_codes`` / ``x_stats`` for that product). ``round_group`` must be a multiple of 8
    dividing N and a multiple of the launch's rows per program (``written_group``)."""
    return _launch(x, weight, bias, norm_weight, residual, eps, gated, None, None, 0, scales, offsets, bits,
                   x_codes, x_stats, round_group, round_split, round_norm)


def rows_per_program(tuning: MatvecTuning, rows: int, bits: int, x8: bool, paired: bool) -> int:
    """Output rows each program of the launch writes (``paired``: SwiGLU or rotary, whose
    programs read a pair of rows each)."""
    if bits:
        return max(1, getattr(tuning, tuning.rows_field(bits, x8)) // (2 if paired else 1))
    return tuning.gated_block_n if paired else tuning.wide_block_n if rows >= tuning.wide_rows else tuning.block_n


def written_group(weight: torch.Tensor, packing: dict, gated: bool, next_weight: torch.Tensor | None,
                  next_packing: dict) -> int:
    """The group in which a product of ``weight`` (``packing``: its ``decode_linear`` keywords)
    rounds its output for the next product (``next_weight``, ``next_packing``) as it writes it
    (``decode_linear_codes``), or 0 where it does not: ``MatvecTuning.round_written`` is on, the
    next product reads x's int8 codes (``MatvecTuning.x8``), and the group divides the output and
    is whole programs of the launch."""
    tuning = TUNING
    next_bits = next_packing.get("bits", 0)
    if not (tuning.round_written and next_bits):
        return 0
    group = input_group(next_weight, next_packing["scales"], next_bits)
    bits = packing.get("bits", 0)
    rows = weight.shape[0] // (2 if gated else 1)
    block_n = rows_per_program(tuning, rows, bits, tuning.x8(bits, input_group(weight, packing.get("scales"), bits)),
                               gated)
    return group if tuning.x8(next_bits, group) and writes_whole_groups(rows, group, block_n) else 0


def writes_whole_groups(rows: int, group: int, block_n: int) -> bool:
    """Whether a launch of ``block_n`` output rows per program writes ``rows`` outputs as whole
    groups of ``group`` (a multiple of 8, x's code words): what its last writers round."""
    return rows % group == 0 and group % 8 == 0 and group % block_n == 0


_ARRIVALS: dict[tuple, torch.Tensor] = {}


def arrival_counters(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The int32 arrival counters of a rounding product's groups (``matvec_kernels._round_written``),
    zero between calls: each group's last writer resets its own. One set per weight, so products
    of other matrices never share one; two streams running the same weights at once would. A set
    stays for the process (4 bytes a group: 1.4 KB for a 7B gate/up); a matrix later allocated at
    the same address finds its counters at 0."""
    key = (weight.device, weight.data_ptr(), groups)
    counters = _ARRIVALS.get(key)
    if counters is None:
        if weight.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode_linear_codes: run the step once before capturing it in a CUDA graph "
                               "(its arrival counters are allocated on the first call)")
        counters = _ARRIVALS[key] = torch.zeros(groups, dtype=torch.int32, device=weight.device)
    return counters


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
            residual: torch.Tensor | None, eps: float, gated: bool, cos: torch.Tensor | None,
            sin: torch.Tensor | None, rotated_rows: int, scales: torch.Tensor | None, offsets: torch.Tensor | None,
            bits: int, x_codes: torch.Tensor | None, x_stats: torch.Tensor | None, round_group: int = 0,
            round_split: bool = False, round_norm: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both ops' launch: the product, and where ``round_group`` is set its output's codes and
    stats (else both empty)."""
    from . import matvec_kernels
    from .matvec_dp4a import stats_size

    if bits not in (0, 4, 8) or bool(bits) != (scales is not None) or (offsets is not None and bits != 4):
        raise ValueError(f"packed weights: bits 8 or 4 with scales (offsets for int4 only); got bits={bits}, "
                         f"scales {'given' if scales is not None else 'missing'}, "
                         f"offsets {'given' if offsets is not None else 'missing'}")
    tuning = TUNING
    tuning.check(bits)
    rows = weight.shape[0] // (2 if gated else 1)
    columns = weight.shape[1] * (2 if bits == 4 else 1)
    out = x.new_empty((1, rows))
    placeholder = out
    half = 0 if cos is None else cos.shape[-1] // 2
    group = input_group(weight, scales, bits)
    x8 = tuning.x8(bits, group)
    block_n = rows_per_program(tuning, rows, bits, x8, gated or bool(half))
    programs = -(-(rows // 2 if half else rows) // block_n)
    stats = placeholder
    if (x_codes is None) != (x_stats is None) or (x_codes is not None and not x8):
        raise ValueError("x_codes and x_stats come together, for a product that reads x's int8 codes "
                         "(MatvecTuning.x8)")
    if round_group and (half or not writes_whole_groups(rows, round_group, block_n)):
        raise ValueError(f"round_group {round_group}: a multiple of 8 dividing the {rows} outputs and a multiple "
                         f"of the {block_n} rows each program writes (no rotary)")
    if x_codes is not None:  # rounded by the launch that wrote x
        x, stats = x_codes.view(torch.int32), x_stats
        weight = weight.contiguous().view(torch.int32)
    elif x8:  # x (times the norm's weight) rounded to int8 codes per group, in a launch of its own
        from .matvec_dp4a import quantized_activations

        x, stats = quantized_activations(x, group, norm_weight, split=bits == 4,
                                          pdl=tuning.pdl and tuning.activation_pdl,
                                          groups_per_program=tuning.x8_round_groups)
        weight = weight.contiguous().view(torch.int32)
    codes_out = torch.empty(rows if round_group else 0, dtype=torch.int8, device=out.device)
    stats_out = torch.empty(stats_size(rows, round_group) if round_group else 0, dtype=torch.float32,
                            device=out.device)
    arrivals = arrival_counters(weight, rows // round_group) if round_group else placeholder
    launch = dependent_launch(out, tuning.pdl)
    matvec_kernels.matvec[(programs,)](
        x.contiguous(), weight.contiguous(), out,
        placeholder if norm_weight is None else norm_weight.contiguous(),
        placeholder if bias is None else bias.contiguous(),
        placeholder if residual is None else residual.contiguous(),
        placeholder if cos is None else cos.contiguous(), placeholder if sin is None else sin.contiguous(),
        placeholder if scales is None else scales.contiguous(), placeholder if offsets is None else offsets.contiguous(),
        stats, codes_out if round_group else placeholder, stats_out if round_group else placeholder,
        placeholder if round_norm is None else round_norm.contiguous(), arrivals, eps,
        N=rows, K=columns, NORM=norm_weight is not None, GATED=gated, HALF=half, ROTATED_ROWS=rotated_rows,
        BIAS=bias is not None,
        RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=max(chunk_size(columns, tuning.chunk(bits)), group),
        PDL=bool(launch), BITS=bits, GROUP=group,
        OFFSET=offsets is not None, X8=x8, AHEAD=tuning.packed_ahead if bits else 1,
        EARLY_EPILOGUE=tuning.early_epilogue, ROUND=round_group, ROUND_SPLIT=round_split,
        ROUND_NORM=round_norm is not None, num_warps=tuning.warps(bits), **launch)
    return out, codes_out, stats_out


@decode_linear.register_fake
def _decode_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         norm_weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
                         gated: bool, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                         rotated_rows: int = 0, scales: torch.Tensor | None = None,
                         offsets: torch.Tensor | None = None, bits: int = 0, x_codes: torch.Tensor | None = None,
                         x_stats: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((1, weight.shape[0] // (2 if gated else 1)))


@decode_linear_codes.register_fake
def _decode_linear_codes_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                norm_weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
                                gated: bool, round_group: int, round_split: bool,
                                round_norm: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                                offsets: torch.Tensor | None = None, bits: int = 0,
                                x_codes: torch.Tensor | None = None, x_stats: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .matvec_dp4a import stats_size

    rows = weight.shape[0] // (2 if gated else 1)
    return (x.new_empty((1, rows)), x.new_empty(rows, dtype=torch.int8),
            x.new_empty(stats_size(rows, round_group), dtype=torch.float32))


def input_group(weight: torch.Tensor, scales: torch.Tensor | None, bits: int) -> int:
    """Inputs per scale group of a packed weight (``decode_linear``'s layout: int4 holds two
    inputs a byte); 1 for float weights."""
    if scales is None:
        return 1
    return weight.shape[1] * (2 if bits == 4 else 1) // scales.shape[1]


def chunk_size(columns: int, block_k: int) -> int:
    """Input elements per loop step: ``block_k``, or half of it where that divides ``columns`` and
    ``block_k`` does not (1536 = 3 x 512: no half-empty second chunk), never wider than needed."""
    if columns % block_k and not columns % (block_k // 2):
        block_k //= 2
    return min(block_k, 1 << max(0, (columns - 1).bit_length()))
