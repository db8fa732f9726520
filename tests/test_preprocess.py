"""OpenCV preprocessing against the processor config fields it must honour."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ros_infmllm.model.config import parse_vision_config
from ros_infmllm.session import ImagePreprocessor


def _vision(model_type: str, size: int):
    return parse_vision_config({"model_type": model_type, "image_size": size, "patch_size": 8}, Path("x"))


def test_siglip_style_resizes_to_fixed_size_and_normalises(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 32, "width": 32}, "resample": 2, "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    pre = ImagePreprocessor.for_model(tmp_path, _vision("siglip_vision_model", 32))
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = pre(rgb)
    expected = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255 * 2 - 1
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out[0].permute(1, 2, 0), torch.from_numpy(expected), atol=1e-5)


def test_clip_style_resizes_shortest_edge_then_centre_crops(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
        "resample": 3}))
    pre = ImagePreprocessor.for_model(tmp_path, _vision("clip_vision_model", 32))
    rgb = np.zeros((40, 80, 3), np.uint8)
    rgb[:, 38:42] = 255  # a white bar in the middle survives the centre crop, the sides do not
    out = pre(rgb)
    assert out.shape == (1, 3, 32, 32)
    centre, edge = out[0, 0, :, 16], out[0, 0, :, 0]
    assert bool((centre > edge).all())
    assert pre.mean[0] == pytest.approx(0.48145466)  # CLIP defaults when the file gives none


def test_defaults_without_a_config_file() -> None:
    pre = ImagePreprocessor.for_model(None, _vision("siglip_vision_model", 24))
    assert (pre.height, pre.width) == (24, 24)
    assert pre(np.full((10, 10, 3), 255, np.uint8)).max().item() == pytest.approx(1.0)
