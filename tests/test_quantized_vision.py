"""Packed vision towers and projectors (model/quantized_vision.py): every linear layer outside the
decoder is packed where its width allows, the decoder is untouched, and a frame's logits stay
close to the float tower's for each layout (LLaVA, Idefics3, Qwen2.5-VL)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from builders import TinySpec, build_tiny_idefics3, build_tiny_llava, build_tiny_qwen2_vl, frame_and_question_logits
from ros_infmllm.model import load_model
from ros_infmllm.model.quantized import QuantizedLinear
from ros_infmllm.model.quantized_vision import quantize_vision
from ros_infmllm.session import StreamingSession

BUILDERS = {"llava": lambda p: build_tiny_llava(p, TinySpec()), "idefics3": build_tiny_idefics3,
            "qwen2.5-vl": lambda p: build_tiny_qwen2_vl(p, "qwen2_5_vl")}


def _linears_outside_decoder(model: nn.Module, kind: type) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind) and not name.startswith("decoder.")]


@pytest.mark.parametrize("layout", list(BUILDERS))
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_packed_tower_keeps_a_frames_logits_close(tmp_path: Path, layout: str, mode: str) -> None:
    BUILDERS[layout](tmp_path)
    floats = load_model(tmp_path)
    packed = load_model(tmp_path, vision_weights=mode)
    eligible = [n for n in _linears_outside_decoder(floats, nn.Linear)
                if floats.get_submodule(n).in_features % 32 == 0]
    assert eligible and _linears_outside_decoder(packed, QuantizedLinear) == eligible
    assert not [n for n in _linears_outside_decoder(packed, nn.Linear) if n in eligible]
    assert all(isinstance(m, nn.Linear) for n, m in packed.decoder.named_modules() if n.endswith("_proj"))
    frame = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    logits = []
    for weights in ("float", mode):
        session = StreamingSession.from_pretrained(tmp_path, policy="h2o", capacity=256, max_chunk=64,
                                                   vision_weights=weights)
        logits.append(frame_and_question_logits(session, frame))
    difference = (logits[0] - logits[1]).abs().max().item()
    scale = logits[0].abs().max().item()
    assert 0 < difference < (0.02 if mode == "int8" else 0.1) * scale  # rounded, not broken


def test_packing_twice_replaces_nothing_and_bad_modes_are_named(tmp_path: Path) -> None:
    BUILDERS["llava"](tmp_path)
    model = load_model(tmp_path, vision_weights="int8")
    assert quantize_vision(model, "int8") == 0  # packed already: nothing left to replace
    with pytest.raises(ValueError, match="vision_weights must be one of"):
        load_model(tmp_path, vision_weights="fp8")
    with pytest.raises(ValueError, match="vision_weights 'int8'"):
        StreamingSession.from_pretrained(tmp_path, backend="onnxruntime", vision_weights="int8")
