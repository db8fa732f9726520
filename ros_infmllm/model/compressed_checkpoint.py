"""Projections stored packed in a Hugging Face folder in the compressed-tensors format, the one
llm-compressor writes after GPTQ or AWQ (``config.json``'s ``quantization_config``:
``quant_method: compressed-tensors``, ``format: pack-quantized``).

Why: a calibrated method places each weight on its 4-bit grid knowing what the layer's inputs
look like, where round-to-nearest does not (the demo VLM's merged LoRA updates are lost to
round-to-nearest int4: docs/quantized_weights.md). Such a folder is read into ``QuantizedLinear``'s
layout without a float copy:

- ``weight_packed`` int32 ``[out, in * bits / 32]`` holds element ``i`` of a row at bits
  ``bits * i`` from the row's start, offset by ``2 ** (bits - 1)`` (compressed-tensors'
  ``pack_to_int32``). Read as little-endian bytes that is our layout already: int4 element ``2j``
  in the low nibble of byte ``j`` as the code ``q + 8`` (``w = (code - 8) * scale``), int8 element
  ``j`` as byte ``j`` holding ``q + 128`` (one XOR makes it signed).
- ``weight_scale`` ``[out, in / group]`` (one column: a scale per output channel), to float16 as
  every packed layer's scales; exact where the calibration kept float16 scales
  (``tools/calibrate.py`` asks for them), else within float16's rounding (2^-11 relative).
- asymmetric int4 (AWQ's usual scheme): ``weight_zero_point`` packed along the output rows;
  ``w = (q - zp) * scale`` becomes ``code * scale + offset`` with ``offset = -(8 + zp) * scale``
  rounded to float16. Asymmetric int8 has no place in our int8 layout and is refused.

Activation-ordered groups (a ``weight_g_idx`` tensor, GPTQ's ``actorder: group``) would need a
column permutation per group in the kernel and are refused with a message naming the setting that
avoids them.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .quantized import QuantizedLinear, is_block_projection

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


@dataclass(frozen=True)
class PackedScheme:
    """One config group's weight quantization, as far as our layout needs it."""

    bits: int
    group: int  # 0: one scale per output channel
    symmetric: bool


@dataclass(frozen=True)
class PackedProjection:
    """Where one packed projection's tensors are, under the checkpoint's key ``key`` (without the
    ``.weight_*`` suffix)."""

    key: str
    file: Path
    scheme: PackedScheme

    @property
    def mode(self) -> str:
        return f"int{self.scheme.bits}"


def _scheme(group: dict, path: Path) -> PackedScheme:
    weights = group.get("weights") or {}
    if group.get("input_activations") or group.get("output_activations"):
        raise CheckpointError(f"{path}: quantized activations are not supported (weight-only schemes such as "
                              "W4A16 / W8A16 are)")
    if weights.get("type", "int") != "int" or weights.get("num_bits") not in (4, 8):
        raise CheckpointError(f"{path}: weights of type {weights.get('type')} with {weights.get('num_bits')} bits "
                              "are not supported (int with 4 or 8 bits are)")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise CheckpointError(f"{path}: weight strategy {strategy!r} is not supported (group or channel are)")
    if weights.get("actorder") == "group":
        raise CheckpointError(f"{path}: activation-ordered groups (actorder: group) are not supported; "
                              "quantize with actorder 'static' or none")
    scheme = PackedScheme(int(weights["num_bits"]), int(weights.get("group_size") or 0) if strategy == "group" else 0,
                          bool(weights.get("symmetric", True)))
    if scheme.bits == 8 and not scheme.symmetric:
        raise CheckpointError(f"{path}: asymmetric int8 weights are not supported (symmetric int8 and int4 "
                              "of either kind are)")
    return scheme


def quantization_config(folder: Path) -> dict | None:
    """The folder's compressed-tensors ``quantization_config``, or None for a float checkpoint."""
    raw = json.loads((folder / "config.json").read_text())
    config = raw.get("quantization_config")
    if not config:
        return None
    method = config.get("quant_method")
    if method != "compressed-tensors":
        raise CheckpointError(f"{folder / 'config.json'}: quantization method {method!r} is not supported "
                              "(compressed-tensors is; GGUF files are read directly)")
    return config


def _group_for(key: str, groups: dict[str, dict], path: Path) -> dict:
    """The config group whose targets name this layer: a class name (every target here is a
    ``Linear``) or ``re:`` pattern on the checkpoint's module name."""
    matches = [group for group in groups.values()
               if any(t == "Linear" or (t.startswith("re:") and re.match(t[3:], key)) for t in group.get("targets", []))]
    if not matches:
        raise CheckpointError(f"{path}: no quantization config group names the packed layer {key!r}")
    return matches[-1]


def packed_projections(folder: Path, files: list[Path], canonical) -> dict[str, PackedProjection]:
    """Our module name -> where its packed tensors are, for each block projection the folder
    stores packed (``canonical``: the layout's checkpoint-key -> our-name map)."""
    config = quantization_config(folder)
    if config is None:
        return {}
    path = folder / "config.json"
    fmt = config.get("format")
    groups = config.get("config_groups") or {}
    found: dict[str, PackedProjection] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if not key.endswith(".weight_packed"):
                    continue
                base = key.removesuffix(".weight_packed")
                ours = canonical(base + ".weight")
                if ours is None or not is_block_projection(ours.removesuffix(".weight")):
                    raise CheckpointError(f"{file}: packed tensor {key!r} is not a decoder block projection "
                                          "(only those may be packed; quantize with the others ignored)")
                group = _group_for(base, groups, path)
                if group.get("format", fmt) != "pack-quantized":
                    raise CheckpointError(f"{path}: compressed-tensors format {group.get('format', fmt)!r} is not "
                                          "supported (pack-quantized is)")
                found[ours.removesuffix(".weight")] = PackedProjection(base, file, _scheme(group, path))
    return found


def library_unpack():
    """compressed-tensors' own unpacking (zero points, and codes for a float copy), imported on use:
    symmetric folders load packed without the library."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32 as unpack
    except ImportError as exc:
        raise CheckpointError("reading this folder's zero points or float weights needs compressed-tensors "
                              "(pip install compressed-tensors, or the package's 'calibrate' extra)") from exc
    return unpack


def _tensors(entry: PackedProjection) -> dict[str, torch.Tensor]:
    with safe_open(str(entry.file), framework="pt") as handle:
        present = set(handle.keys())
        return {suffix: handle.get_tensor(f"{entry.key}.{suffix}") for suffix in PACKED_SUFFIXES
                if f"{entry.key}.{suffix}" in present}


def _scales_and_zeros(entry: PackedProjection, tensors: dict[str, torch.Tensor],
                      in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales as float32 ``[out, groups]`` (one column per output channel) and, for an
    asymmetric scheme, the zero points unpacked alike (float32), else None."""
    scales = tensors["weight_scale"].to(torch.float32)
    if scales.dim() == 1:
        scales = scales[:, None]
    if in_features % scales.shape[1]:
        raise CheckpointError(f"{entry.file}: {entry.key}.weight_scale has {scales.shape[1]} groups for "
                              f"{in_features} inputs")
    if entry.scheme.symmetric:
        return scales, None
    if "weight_zero_point" not in tensors:
        raise CheckpointError(f"{entry.file}: {entry.key} is asymmetric but has no weight_zero_point")
    zero = library_unpack()(tensors["weight_zero_point"], entry.scheme.bits, torch.Size(scales.shape), packed_dim=0)
    return scales, zero.to(torch.float32)


def read_packed(entry: PackedProjection, shape: tuple[int, int], bias: torch.Tensor | None = None) -> QuantizedLinear:
    """One projection as ``QuantizedLinear``, its codes taken as stored (see the module docstring)."""
    tensors = _tensors(entry)
    out_features, in_features = shape
    stored = tuple(int(v) for v in tensors["weight_shape"].tolist())
    if stored != (out_features, in_features):
        raise CheckpointError(f"{entry.file}: {entry.key} has shape {stored}, the config implies {shape}")
    if "weight_g_idx" in tensors:
        raise CheckpointError(f"{entry.file}: {entry.key} has activation-ordered groups (weight_g_idx), which are "
                              "not supported; quantize with actorder 'static' or none")
    bits, packed = entry.scheme.bits, tensors["weight_packed"]
    if (in_features * bits) % 32 or tuple(packed.shape) != (out_features, in_features * bits // 32):
        raise CheckpointError(f"{entry.file}: {entry.key}.weight_packed has shape {tuple(packed.shape)}, expected "
                              f"{(out_features, in_features * bits // 32)}")
    if sys.byteorder != "little":
        raise CheckpointError("reading packed int32 words as bytes needs a little-endian machine")
    raw = packed.contiguous().view(torch.uint8)  # [out, in * bits / 8]
    scales, zero = _scales_and_zeros(entry, tensors, in_features)
    if bits == 8:
        codes = (raw ^ 0x80).view(torch.int8)
        return QuantizedLinear(codes.clone(), scales.to(torch.float16), None, 8, in_features, bias)
    offsets = None if zero is None else (-(8 + zero) * scales).to(torch.float16)
    return QuantizedLinear(raw.clone(), scales.to(torch.float16), offsets, 4, in_features, bias)


def dequantized(entry: PackedProjection, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The float weight, for ``weights: float`` (and a width the caller does not keep): the stored
    scales applied in float32, as compressed-tensors' own ``dequantize`` does."""
    tensors = _tensors(entry)
    codes = library_unpack()(tensors["weight_packed"], entry.scheme.bits, torch.Size(shape)).to(torch.float32)
    scales, zero = _scales_and_zeros(entry, tensors, shape[1])
    group = shape[1] // scales.shape[1]
    if zero is not None:
        codes = codes - zero.repeat_interleave(group, dim=1)
    return (codes * scales.repeat_interleave(group, dim=1)).to(dtype)
