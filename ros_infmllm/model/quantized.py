"""Weight-only quantized linear layers: int8 and int4 weights with per-group scales.

Why: a decoder's decode speed is the bytes of weights it reads per token, and a robot's memory is
shared by everything it runs; 8-bit weights halve both against bf16, 4-bit ones quarter them.

One layout for every source, so that one kernel reads them all:

- ``int8``: ``qweight`` int8 ``[out, in]``, ``w = q * scale`` (symmetric); groups of 32 (or one
  group spanning the row) from float checkpoints, groups of 32 from GGUF ``Q8_0``, groups of 16
  from ``Q6_K`` (codes -32..31, scale ``d * sc`` rounded to float16).
- ``int4``: ``qweight`` uint8 ``[out, in / 2]``, element ``2j`` in the low nibble of byte ``j``
  and ``2j + 1`` in the high one, ``q`` in 0..15 and ``w = q * scale + offset``, or
  ``w = (q - 8) * scale`` where there is no offset; groups of 32 or 64 from float checkpoints
  (round to nearest between the group's min and max), groups of 32 from GGUF ``Q4_0`` (no offset),
  ``Q4_1`` (``offset = m``) and ``Q4_K`` (sub-blocks of 32: scale ``d * sc``, offset ``-dmin * m``,
  rounded to float16).

Scales and offsets are float16 ``[out, in / group]``, as GGUF stores them, so a Q8_0 / Q4_0 /
Q4_1 block's values are reproduced exactly (Q4_K's and Q6_K's within float16 rounding of their products).
``forward`` dequantizes the matrix and multiplies (the reference path: the CPU and prefill);
one-token decode steps read the packed bytes in the Triton matrix-vector kernel
(matvec_kernels.py), q/k/v and gate/up fused by ``FusedQuantizedLinear``.
"""
from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WeightMode = Literal["int8", "int4"]
WEIGHT_MODES = ("auto", "float", "int8", "int4")
HEAD_MODES = ("float", "int8", "int4")  # the LM head: in the model's dtype, or packed
DEFAULT_GROUPS = {"int8": 32, "int4": 32}  # as GGUF Q8_0 / Q4_x; 0 would be one group per output channel
# weights dequantized at once by ``QuantizedLinear.forward`` (whole output rows; 64 MiB in float32):
# a prefill chunk's float copy of a projection is transient, but it sets the peak memory of a packed
# model (a 7B gate projection whole took about 0.6 GB of float32 temporaries)
FORWARD_ELEMENTS = 1 << 24
# on a GPU the pieces are written in the model's dtype by one kernel, with no float32 temporary, so
# twice the weights fit the same 64 MiB (bf16); a wide-input matrix cut into pieces of few rows
# leaves cuBLAS too few tiles (LLaMA-2-7B's down projection at 729 tokens: 324 us in pieces of 2^24, 159 in
# pieces of 2^25; benchmarks/results/bench_packed_prefill_shipped_h200.md)
GPU_FORWARD_ELEMENTS = 1 << 25
# weights rounded at once by ``QuantizedLinear.from_float`` (whole rows; 16 MiB in float32)
ROUNDING_ELEMENTS = 1 << 22
QUANTIZED_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def is_block_projection(module: str) -> bool:
    """Whether ``module`` (our name) is one of a decoder block's packable projections, not a vision
    tower's layer of the same local name (``vision_tower.encoder.layers.0.self_attn.q_proj``)."""
    return module.startswith("decoder.layers.") and module.endswith(QUANTIZED_PROJECTIONS)


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held packed (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 bits: int, in_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        if in_features % scales.shape[1]:
            raise ValueError(f"{in_features} input features do not split into {scales.shape[1]} groups")
        self.bits, self.in_features, self.out_features = bits, in_features, qweight.shape[0]
        self.group = in_features // scales.shape[1]
        self.register_buffer("qweight", qweight)
        # float16 bits held as int16, so that a module-wide .to(dtype) cannot round them again
        self.register_buffer("scale_bits", scales.to(torch.float16).view(torch.int16))
        self.register_buffer("offset_bits", None if offsets is None else offsets.to(torch.float16).view(torch.int16))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def mode(self) -> str:
        return f"int{self.bits}"

    @property
    def scales(self) -> torch.Tensor:
        """Per-group scales, float16 ``[out, in / group]``."""
        return self.scale_bits.view(torch.float16)

    @property
    def offsets(self) -> torch.Tensor | None:
        """Per-group offsets, float16, or None (int8; int4 centred on code 8)."""
        return None if self.offset_bits is None else self.offset_bits.view(torch.float16)

    def codes(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The integer codes ``[out, in]`` (of ``rows``: a slice or row indices): int8 values, or
        int4 ones in 0..15."""
        qweight = self.qweight[rows]
        if self.bits == 8:
            return qweight
        return torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).reshape(qweight.shape[0], self.in_features)

    def dequantized(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """``W[rows]`` ``[out, in]`` in ``dtype`` (computed in float32, the order GGUF's dequantizers
        use, in place on one float32 copy of the codes: no second or third temporary of that size)."""
        scales = self.scales[rows]
        offsets = None if self.offsets is None else self.offsets[rows]
        count, groups = scales.shape
        w = self.codes(rows).to(torch.float32)  # a new tensor (a dtype change), so it may change in place
        if self.bits == 4 and offsets is None:
            w.sub_(8)
        w = w.view(count, groups, self.group).mul_(scales.to(torch.float32)[..., None])
        if offsets is not None:
            w.add_(offsets.to(torch.float32)[..., None])
        return w.view(count, self.in_features).to(dtype)

    def dequantized_by_kernel(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """``dequantized``'s values made on a GPU by one Triton pass (``dequant_kernels.py``)."""
        from .dequant_kernels import dequantize_rows

        offsets = None if self.offsets is None else self.offsets[rows]
        return dequantize_rows(self.qweight[rows], self.scales[rows], offsets, self.bits, self.in_features, dtype)

    def product_in_pieces(self, x: torch.Tensor, elements: int, kernel: bool) -> torch.Tensor:
        """``x @ W.T + b`` through float copies of ``elements`` weights (whole rows) at a time, made
        by ``dequantized_by_kernel`` (``kernel``) or ``dequantized``."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        copy = self.dequantized_by_kernel if kernel else self.dequantized
        step = max(1, elements // self.in_features)
        if self.out_features <= step:
            return F.linear(x, copy(x.dtype), bias)
        parts = [F.linear(x, copy(x.dtype, slice(start, start + step))) for start in range(0, self.out_features, step)]
        out = torch.cat(parts, dim=-1)
        return out if bias is None else out + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prefill product: a float copy of a piece of whole rows at a time, then the dtype's
        matrix product, so a large matrix's copy stays small. On a GPU one Triton pass makes each
        piece (``dequant_kernels.py``: a 7B layer's products 5-7x faster than with the torch
        operations of ``dequantized``, benchmarks/results/bench_packed_prefill_shipped_h200.md),
        ``GPU_FORWARD_ELEMENTS`` weights at a time; elsewhere ``dequantized`` does,
        ``FORWARD_ELEMENTS`` at a time."""
        if x.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return self.product_in_pieces(x, GPU_FORWARD_ELEMENTS, kernel=True)
        return self.product_in_pieces(x, FORWARD_ELEMENTS, kernel=False)

    def packed_bytes(self) -> int:
        """Bytes the weight occupies (codes, scales, offsets; bias excluded)."""
        parts = (self.qweight, self.scale_bits, self.offset_bits)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.mode}, group={self.group}"

    # ---- from float weights (round to nearest) ---------------------------------------------------
    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: WeightMode,
                   group: int | None = None, offsets: bool = True) -> "QuantizedLinear":
        """Round-to-nearest quantization of ``weight [out, in]``; ``group`` input features share a
        scale (0: the whole row; default ``DEFAULT_GROUPS``: 32, as GGUF's blocks). int4 ``offsets``:
        each group spans its min to max with a float16 offset (Q4_1's layout, 20 bytes per 32
        weights), or, off, codes centred on 8 with a signed scale and no offset (Q4_0's, 18 bytes:
        a tenth fewer bytes per decode token, a coarser grid). ``weight`` may
        be any object with a ``shape`` whose row slices are tensors (``checkpoint.TensorRows``:
        a checkpoint's tensor read a piece at a time)."""
        if mode not in DEFAULT_GROUPS:
            raise ValueError(f"weight mode {mode!r} is not one of {', '.join(DEFAULT_GROUPS)}")
        out_features, in_features = weight.shape
        group = DEFAULT_GROUPS[mode] if group is None else group
        group = group or in_features
        if in_features % group or (mode == "int4" and group % 2):
            raise ValueError(f"group {group} does not divide {in_features} input features into even groups")
        # whole rows at a time: rounding a matrix at once takes several float32 copies of it (a 7B
        # gate projection: 180 MB each) beside the packed model being loaded
        step = max(1, ROUNDING_ELEMENTS // in_features)
        pieces = [_rounded_rows(weight[start:start + step].detach(), mode, group, offsets)
                  for start in range(0, out_features, step)]
        codes, scales, shifts = (None if pieces[0][i] is None else torch.cat([p[i] for p in pieces]) for i in range(3))
        return cls(codes, scales, shifts, 8 if mode == "int8" else 4, in_features, bias)

    # ---- from GGUF blocks ------------------------------------------------------------------------
    @classmethod
    def from_gguf_blocks(cls, blocks: np.ndarray, kind: str, shape: tuple[int, int],
                         bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """The raw bytes of a GGUF ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q4_K`` or ``Q6_K`` matrix (``shape``
        = [out, in], PyTorch's order) re-laid into ours without passing through floats (``Q4_K``,
        ``Q6_K``: see ``_from_q4_k``, ``_from_q6_k``)."""
        out_features, in_features = shape
        if kind not in GGUF_BLOCK_BYTES:
            raise ValueError(f"GGUF type {kind} is not read directly (direct: {', '.join(GGUF_BLOCK_BYTES)})")
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        if kind == "Q4_K":
            return cls._from_q4_k(blocks, out_features, in_features, bias)
        if kind == "Q6_K":
            return cls._from_q6_k(blocks, out_features, in_features, bias)
        groups = in_features // 32
        raw = blocks.reshape(out_features, groups, GGUF_BLOCK_BYTES[kind])
        scales = torch.from_numpy(raw[..., 0:2].copy().view(np.float16).reshape(out_features, groups))
        if kind == "Q8_0":
            codes = torch.from_numpy(raw[..., 2:].copy().view(np.int8).reshape(out_features, in_features))
            return cls(codes, scales, None, 8, in_features, bias)
        if kind == "Q4_0":
            offsets, nibbles = None, raw[..., 2:]
        else:  # Q4_1: d, m, nibbles
            offsets = torch.from_numpy(raw[..., 2:4].copy().view(np.float16).reshape(out_features, groups))
            nibbles = raw[..., 4:]
        # GGUF: byte j of a block holds element j (low nibble) and element j + 16 (high nibble)
        codes = np.concatenate((nibbles & 0x0F, nibbles >> 4), axis=-1).reshape(out_features, in_features)
        return cls(pack_int4(torch.from_numpy(codes)), scales, offsets, 4, in_features, bias)

    @classmethod
    def _from_q4_k(cls, blocks: np.ndarray, out_features: int, in_features: int,
                   bias: torch.Tensor | None) -> "QuantizedLinear":
        """GGUF ``Q4_K``: super-blocks of 256 weights (float16 ``d`` and ``dmin``, eight 6-bit scales
        and mins, 4-bit codes), each sub-block of 32 one of our groups with scale ``d * sc`` and
        offset ``-dmin * m``. The codes are kept; the two products are rounded to float16 (GGUF
        forms them in float32 at every use, so a weight moves by at most 2^-11 of its group's scale
        times its code plus its offset: the price of one layout and one kernel for every type)."""
        from gguf.quants import Q4_K

        supers = in_features // 256
        raw = blocks.reshape(out_features * supers, 144)
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(raw[:, 4:16].copy())  # gguf's unpacking of the 6-bit fields
        scales = torch.from_numpy((d * sc.astype(np.float32)).astype(np.float16).reshape(out_features, supers * 8))
        offsets = torch.from_numpy((-dmin * m.astype(np.float32)).astype(np.float16).reshape(out_features, supers * 8))
        # 64 weights per 32 bytes: the first 32 in the low nibbles, the next 32 in the high ones
        qs = raw[:, 16:].reshape(-1, 4, 32)
        codes = np.stack((qs & 0x0F, qs >> 4), axis=2).reshape(out_features, in_features)
        return cls(pack_int4(torch.from_numpy(codes)), scales, offsets, 4, in_features, bias)


    @classmethod
    def _from_q6_k(cls, blocks: np.ndarray, out_features: int, in_features: int,
                   bias: torch.Tensor | None) -> "QuantizedLinear":
        """GGUF ``Q6_K``: super-blocks of 256 weights (6-bit codes, sixteen int8 sub-block scales,
        a float16 ``d``) as int8 codes ``q - 32`` (-32..31) in groups of 16, each group's scale
        ``d * sc`` rounded to float16 (as ``_from_q4_k``'s). The codes come from gguf's own
        dequantizer run on the blocks with every scale set to 1, so the bit layout is its, not a
        second reading of it. Why: llama.cpp's Q4_K_M files keep v and down in Q6_K
        (in some blocks or all); read this way they stay packed (int8) instead of becoming floats."""
        from gguf.quants import Q6_K

        supers = in_features // 256
        raw = blocks.reshape(out_features * supers, 210)
        d = raw[:, 208:210].copy().view(np.float16).astype(np.float32)
        sc = raw[:, 192:208].view(np.int8).astype(np.float32)
        scales = torch.from_numpy((d * sc).astype(np.float16).reshape(out_features, supers * 16))
        unit = raw.copy()
        unit[:, 192:208] = 1  # every sub-block scale 1 ...
        unit[:, 208:210] = np.array([1.0], np.float16).view(np.uint8)  # ... and d = 1: the values are the codes
        codes = np.empty((out_features * supers, 256), np.int8)
        step = max(1, ROUNDING_ELEMENTS // 256)
        for start in range(0, unit.shape[0], step):  # float32 temporaries a piece at a time
            codes[start:start + step] = Q6_K.dequantize_blocks(unit[start:start + step]).astype(np.int8)
        return cls(torch.from_numpy(codes.reshape(out_features, in_features)), scales, None, 8, in_features, bias)


GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q6_K": 210}  # 32 weights a block (K: 256)
GGUF_DIRECT_MODES = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q6_K": "int8"}


def _rounded_rows(rows: torch.Tensor, mode: str, group: int, offsets: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes (int8, or int4 packed two to a byte), float16 scales and offsets
    (int4 with ``offsets``) of the float matrix ``rows [count, in]``. int4 without offsets rounds
    as llama.cpp's Q4_0: the scale is the group's value of largest magnitude over -8, so that value
    is code 0 exactly and codes 0..15 stand for -8..7 scales (the bytes of a Q4_0 file of the same
    floats)."""
    count, in_features = rows.shape
    w = rows.to(torch.float32).reshape(count, in_features // group, group)
    if mode == "int8":
        scales = (w.abs().amax(-1) / 127).to(torch.float16)
        codes = torch.round(w / _divisor(scales)).clamp(-127, 127).to(torch.int8)
        return codes.reshape(count, in_features), scales, None
    if not offsets:  # llama.cpp's (and the gguf package's) Q4_0 rounding, step for step
        peak = w.gather(-1, w.abs().argmax(-1, keepdim=True))
        scales = peak / -8
        inverse = torch.where(scales == 0, torch.zeros_like(scales), 1 / torch.where(scales == 0, 1.0, scales))
        codes = torch.trunc(w * inverse + 8.5).clamp(0, 15)
        return pack_int4(codes.reshape(count, in_features).to(torch.uint8)), scales[..., 0].to(torch.float16), None
    low, high = w.amin(-1), w.amax(-1)
    scales = ((high - low) / 15).to(torch.float16)
    lows = low.to(torch.float16)
    codes = torch.round((w - lows.to(torch.float32)[..., None]) / _divisor(scales)).clamp(0, 15)
    return pack_int4(codes.reshape(count, in_features).to(torch.uint8)), scales, lows


def _divisor(scales: torch.Tensor) -> torch.Tensor:
    """Per-group float16 scales as float32 divisors ``[..., 1]`` (1 for an all-zero group)."""
    scales = scales.to(torch.float32)
    return torch.where(scales > 0, scales, torch.ones_like(scales))[..., None]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[out, in]`` -> bytes ``[out, in / 2]`` (element 2j low nibble, 2j + 1 high)."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


class FusedQuantizedLinear:
    """``FusedLinear`` for packed layers: their codes, scales, offsets and biases concatenated by
    output row (one weight pass per decode token for q/k/v, one for gate/up); each layer's buffers
    become views into the fused ones, so nothing is held twice. Layers fuse when they share the
    width, the group and the presence of offsets and biases (``layers.fusion_key``; ``fuse_linears``
    puts others in runs)."""

    PARTS = ("qweight", "scale_bits", "offset_bits")

    def __init__(self, owner: nn.Module, name: str, linears: tuple[QuantizedLinear, ...]) -> None:
        from .layers import fusion_key

        if len({fusion_key(m) for m in linears}) > 1:
            raise ValueError(f"{name}: packed layers of different widths, groups or offsets do not fuse")
        self.name, self.linears = name, linears
        self.sizes = [m.out_features for m in linears]
        for part in self.PARTS + ("bias",):
            if getattr(linears[0], part) is None:
                owner.register_buffer(f"{name}_{part}", None, persistent=False)
                continue
            fused = torch.cat([getattr(m, part).detach() for m in linears])
            owner.register_buffer(f"{name}_{part}", fused, persistent=False)
            start = 0
            for module, size in zip(linears, self.sizes):
                view = fused[start:start + size]
                if part == "bias":
                    module.bias = nn.Parameter(view, requires_grad=False)
                else:
                    setattr(module, part, view)
                start += size

    def __call__(self, owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(module(x) for module in self.linears)

    def matvec_operands(self, owner: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """The fused codes and bias, and their packing (scales, offsets, bits) for decode_linear."""
        codes, scale_bits, offset_bits, bias = (getattr(owner, f"{self.name}_{part}")
                                                for part in self.PARTS + ("bias",))
        offsets = None if offset_bits is None else offset_bits.view(torch.float16)
        return codes, bias, {"scales": scale_bits.view(torch.float16), "offsets": offsets,
                             "bits": self.linears[0].bits}


def linear_operands(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Weight, bias and packing of one linear layer (float or packed) for decode_linear."""
    if isinstance(layer, QuantizedLinear):
        return layer.qweight, layer.bias, {"scales": layer.scales, "offsets": layer.offsets, "bits": layer.bits}
    return layer.weight, layer.bias, {}


def quantize_decoder(decoder: nn.Module, mode: WeightMode, group: int | None = None,
                     head: WeightMode | None = None, offsets: bool = True) -> int:
    """Replace each block's projections (q, k, v, o, gate, up, down) by ``QuantizedLinear`` from their
    float weights, and the LM head too where ``head`` names a mode (a tied head gets a packed copy:
    the embedding table stays float for its row lookups); embeddings and norms stay as they are.
    ``offsets``: int4's layout (``QuantizedLinear.from_float``). Returns the layers replaced."""
    replaced = int(head is not None and quantize_head(decoder, head))
    for block in decoder.layers:
        for path in QUANTIZED_PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, name)
            if isinstance(layer, nn.Linear):
                setattr(parent, name, QuantizedLinear.from_float(layer.weight, layer.bias, mode, group, offsets))
                replaced += 1
    return replaced


def quantize_head(decoder: nn.Module, mode: WeightMode) -> bool:
    """Pack the LM head (round to nearest, groups of 32) unless it is packed already; a tied head
    gets a packed copy and the embedding table stays float for its row lookups. For a large
    vocabulary the head is a large share of a packed model's bytes per token (Qwen2-1.5B: 467 MB in
    bf16 beside 0.76 GB of int4 projections). Returns whether it was replaced."""
    if not isinstance(decoder.lm_head, nn.Linear):
        return False
    decoder.lm_head = QuantizedLinear.from_float(decoder.lm_head.weight, decoder.lm_head.bias, mode)
    return True


def weight_modes(decoder: nn.Module) -> set[str]:
    """The weight kinds of the block projections: ``float`` and/or ``int8`` / ``int4`` (``int4+lora``:
    a packed base with float LoRA factors, packed_lora.py)."""
    return {getattr(layer, "mode", "float")
            for block in decoder.layers for layer in (block.get_submodule(p) for p in QUANTIZED_PROJECTIONS)}


def held_weights(decoder: nn.Module) -> dict[str, str]:
    """What the decoder holds after the load chose (``weights: auto`` keeps only the types it reads
    directly: a Q5_K_M file's Q5_K projections stay float): the block projections' kinds joined by
    ``+`` (``int4+int8`` for a Q4_K_M file), the LM head's and the token table's."""
    return {"weights": "+".join(sorted(weight_modes(decoder))),
            "lm_head_weights": getattr(decoder.lm_head, "mode", "float"),
            "embedding_weights": getattr(decoder.embed_tokens, "mode", "float")}
