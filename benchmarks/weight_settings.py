"""Packed-weight settings by name, shared by the quality benchmarks (``weights_quality.py``, and the
memory benchmarks through ``streaming_workers.py`` and ``session_variants.py``), so that a
setting such as ``int4-x8`` means the same model in each of them.

- ``float`` / ``int8`` / ``int4`` / ``auto``: ``load_model(weights=...)`` (on a GGUF, int4 and auto
  keep its Q4 blocks);
- ``int4-rtn-gN``: the float model rounded to int4 with groups of N at load (what a float
  checkpoint gets);
- ``q4_0-rtn`` / ``q4_0-rtn-x8``: the float model rounded to int4 in groups of 32 without offsets
  (llama.cpp's Q4_0, ``QuantizedLinear.from_float(offsets=False)``: 18 bytes per 32 weights against
  20), and the same with its products' inputs rounded as below;
- ``W+head-H``: weights W and the LM head packed as H (``load_model(lm_head_weights=H)``);
  ``W+head-H+emb-E``: and the token table packed as E (``embedding_weights=E``; tied to a head
  packed alike, it reads the head's codes);
- ``int4-x8`` / ``int8-x8``: int4 / int8 with each packed product's input rounded to int8 per
  group, the arithmetic of the GPU's dp4a decode paths (``model/matvec_dp4a.py``), which the CPU
  never does on its own.
"""
from __future__ import annotations

import time

import torch

from ros_infmllm.model import load_model
from ros_infmllm.model.quantized import QuantizedLinear, quantize_decoder

SETTINGS = ("float", "int8", "int4", "auto", "int4-rtn-g32", "int4-rtn-g64", "int4+head-int8", "int4+head-int4",
            "int4-x8", "int8-x8", "int4+head-int8+emb-int8", "int4+head-int4+emb-int4", "q4_0-rtn", "q4_0-rtn-x8")
# the settings a memory benchmark's session may name (session_variants.py's +int8, +int4-x8, ...)
SESSION_SETTINGS = ("int8", "int4", "auto", "int8-x8", "int4-x8")


def load(files, setting: str, device: str, dtype: torch.dtype = torch.float32,
         **parts: str) -> tuple[torch.nn.Module, float]:
    """The model of ``files`` with its projections as ``setting`` names them, and the seconds its
    load took. ``parts``: other ``load_model`` choices (e.g. ``vision_weights``)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown weight setting {setting!r}; one of {', '.join(SETTINGS)}")
    started = time.monotonic()
    base = setting.removesuffix("-x8")
    if base.startswith("int4-rtn-g") or base == "q4_0-rtn":  # the float model rounded to int4 at load
        model = load_model(files, device="cpu", dtype=dtype, **parts)
        offsets = base != "q4_0-rtn"
        quantize_decoder(model.decoder, "int4", int(base.rsplit("g", 1)[1]) if offsets else 32, offsets=offsets)
        model = model.to(device)
    elif "+head-" in base:
        weights, rest = base.split("+head-")
        head, _, embeddings = rest.partition("+emb-")
        model = load_model(files, device=device, dtype=dtype, weights=weights, lm_head_weights=head,
                           embedding_weights=embeddings or "float", **parts)
    else:
        model = load_model(files, device=device, dtype=dtype, weights=base, **parts)
    if setting.endswith("-x8"):
        round_packed_inputs(model, 8 if base == "int8" else 4)
    return model, time.monotonic() - started


def round_packed_inputs(model: torch.nn.Module, bits: int = 4) -> int:
    """Every packed projection of ``bits``-bit weights gets its input rounded to int8 per weight
    group first, as ``model/matvec_dp4a.py`` computes a decode token (here every token, prefill
    included: an upper bound on what decode-only rounding costs). Returns how many projections
    got the hook."""
    from ros_infmllm.model.matvec_dp4a import rounded_activations

    def hook(module: QuantizedLinear, args: tuple) -> tuple:
        return (rounded_activations(args[0], module.group).to(args[0].dtype), *args[1:])

    layers = [m for m in model.decoder.layers.modules() if isinstance(m, QuantizedLinear) and m.bits == bits]
    for layer in layers:
        layer.register_forward_pre_hook(hook)
    return len(layers)
