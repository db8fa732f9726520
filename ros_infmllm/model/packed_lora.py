"""A checkpoint whose decoder is a packed GGUF base plus float LoRA factors (the demo VLM).

The demo VLM is SmolLM2's Q4_1 GGUF with trained LoRA factors. Its folder holds the merged
weights in bf16 (what ``weights: float`` loads); rounding those merged weights to int4 again loses
most of the small LoRA update (``benchmarks/lora_packing.py``) and the model's answers with it
(docs/quantized_weights.md). So a folder that names its base and factors in ``packed_base.json``
loads, with ``weights: auto``, each block projection as the GGUF's own blocks, kept packed as they
are stored, plus its LoRA pair applied in float beside them: ``y = W_base x + B (A x)``. Bytes read
per token are the packed base's plus ``rank * (in + out)`` values per projection.

``packed_base.json``: ``{"gguf": path, "lora": safetensors path, "lora_alpha": alpha}``; LoRA
tensors are named ``lora.<our linear name>.A`` ``[rank, in]`` and ``.B`` ``[out, rank]`` (the
update is ``alpha / rank * B @ A``, as ``demo.vlm.lora_delta`` merges it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .quantized import QUANTIZED_PROJECTIONS, QuantizedLinear

PACKED_BASE_FILE = "packed_base.json"


class PackedLoRALinear(nn.Module):
    """A packed base projection and its float LoRA pair: ``base(x) + (x @ A.T) @ B.T``, B holding
    the ``alpha / rank`` scale. Not fused with its neighbours, so a GPU runs it through the plain
    block path (the Triton matrix-vector op reads one packed matrix, not a sum)."""

    def __init__(self, base: QuantizedLinear, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        if lora_a.shape[1] != base.in_features or lora_b.shape[0] != base.out_features \
                or lora_a.shape[0] != lora_b.shape[1]:
            raise CheckpointError(f"LoRA factors {tuple(lora_a.shape)} / {tuple(lora_b.shape)} do not fit a "
                                  f"{base.out_features}x{base.in_features} projection")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_a = nn.Parameter(lora_a, requires_grad=False)
        self.lora_b = nn.Parameter(lora_b, requires_grad=False)

    @property
    def mode(self) -> str:
        return f"{self.base.mode}+lora"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight ``W_base + B @ A`` (float32 arithmetic), for references."""
        return (self.base.dequantized(torch.float32) + self.lora_b.float() @ self.lora_a.float()).to(dtype)


def has_packed_base(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / PACKED_BASE_FILE).is_file()


def attach_packed_base(model: nn.Module, folder: Path, dtype: torch.dtype) -> int:
    """Replace the block projections of ``model`` (loaded from ``folder``'s merged weights) by the
    packed base's own blocks plus their LoRA pairs; returns how many were replaced. A projection
    the GGUF stores as floats keeps its merged float weight."""
    from safetensors.torch import load_file

    from .gguf_loader import load_gguf_model

    spec = json.loads((Path(folder) / PACKED_BASE_FILE).read_text())
    for key in ("gguf", "lora", "lora_alpha"):
        if key not in spec:
            raise CheckpointError(f"{folder / PACKED_BASE_FILE}: no {key!r}")
    for key in ("gguf", "lora"):
        if not Path(spec[key]).is_file():
            raise CheckpointError(f"{folder / PACKED_BASE_FILE}: its {key} file {spec[key]} is missing")
    base = load_gguf_model(spec["gguf"], dtype=dtype, weights="auto").decoder
    if len(base.layers) != len(model.decoder.layers):
        raise CheckpointError(f"{spec['gguf']}: {len(base.layers)} layers, the checkpoint has "
                              f"{len(model.decoder.layers)}")
    factors = load_file(spec["lora"])
    replaced = 0
    for index, (block, base_block) in enumerate(zip(model.decoder.layers, base.layers)):
        for path in QUANTIZED_PROJECTIONS:
            packed = base_block.get_submodule(path)
            if not isinstance(packed, QuantizedLinear):
                continue
            name = f"decoder.layers.{index}.{path}"
            a, b = factors.get(f"lora.{name}.A"), factors.get(f"lora.{name}.B")
            if a is None:
                module: nn.Module = packed
            else:
                scale = float(spec["lora_alpha"]) / a.shape[0]
                module = PackedLoRALinear(packed, a.to(dtype), (b.float() * scale).to(dtype))
            parent, attr = path.split(".")
            setattr(block.get_submodule(parent), attr, module)
            replaced += 1
    return replaced
