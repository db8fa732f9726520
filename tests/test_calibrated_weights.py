"""Calibrated packed weights: GPTQ / AWQ by llm-compressor (tools/calibrate.py), written as
compressed-tensors folders and read packed by compressed_checkpoint.py. References: transformers
loading the same folder through compressed-tensors, and the float model it was calibrated from."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import WORDS, build_tiny_causal_lm
from ros_infmllm.errors import CheckpointError
from ros_infmllm.model.checkpoint import load_model
from ros_infmllm.model.quantized import QUANTIZED_PROJECTIONS, QuantizedLinear
from ros_infmllm.tools import calibrate

SHAPE = dict(hidden_size=64, intermediate_size=128)


def calibration_text(seed: int, words: int = 2000) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS[:-3], words))


def calibrated(root: Path, name: str, decoder: str, method: str, bits: int = 4) -> tuple[Path, Path]:
    source = root / f"{name}-float"
    build_tiny_causal_lm(source, decoder=decoder, **SHAPE)
    samples = calibrate.text_samples(source / "tokenizer.json", calibration_text(1), 16, 64)
    out = root / name
    calibrate.calibrate(source, out, samples, calibrate.collate_one, method, bits, 32)
    return source, out


@pytest.fixture(scope="module")
def gptq(tmp_path_factory) -> tuple[Path, Path]:
    return calibrated(tmp_path_factory.mktemp("gptq"), "qwen2-gptq", "qwen2", "gptq")  # q/k/v biases


@pytest.fixture(scope="module")
def awq(tmp_path_factory) -> tuple[Path, Path]:
    return calibrated(tmp_path_factory.mktemp("awq"), "llama-awq", "llama", "awq")


def held_out_ids() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(7).integers(13, 48, (1, 48)))


def our_logits(folder: Path, weights: str) -> torch.Tensor:
    model = load_model(folder, weights=weights)
    with torch.no_grad():
        return model.forward_full(held_out_ids()).float()


def transformers_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(held_out_ids()).logits.float()


def projections(folder: Path, weights: str) -> list:
    model = load_model(folder, weights=weights)
    return [block.get_submodule(p) for block in model.decoder.layers for p in QUANTIZED_PROJECTIONS]


def test_gptq_folder_loads_packed_as_calibrated(gptq) -> None:
    _, folder = gptq
    layers = projections(folder, "auto")
    assert all(isinstance(m, QuantizedLinear) and m.bits == 4 and m.group == 32 for m in layers)
    assert all(m.offsets is None for m in layers)  # GPTQ's symmetric groups: codes centred on 8
    assert all(layers[i].bias is not None for i in range(3))  # Qwen2's q/k/v biases kept beside the codes
    record = json.loads((folder / "calibrated_from.json").read_text())
    assert record["method"] == "gptq" and record["quantized_layers"] == len(layers) and record["samples"] == 16
    ours, reference = our_logits(folder, "auto"), transformers_logits(folder)
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4), (ours - reference).abs().max()
    # weights: float dequantizes the same codes
    assert torch.allclose(our_logits(folder, "float"), reference, atol=1e-4, rtol=1e-4)


def test_stored_codes_are_read_without_change(gptq) -> None:
    """Our nibbles equal compressed-tensors' own unpacking of the file, and the scales its float16
    values (calibrated with float16 scales, so the packed layer is exact)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    _, folder = gptq
    layer = projections(folder, "auto")[4]  # layer 0's gate projection
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.gate_proj.weight_packed")
        scales = f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale")
    expected = unpack_from_int32(packed, 4, torch.Size((layer.out_features, layer.in_features))).to(torch.int16) + 8
    assert torch.equal(layer.codes().to(torch.int16), expected)
    assert torch.equal(layer.scales.to(torch.float32), scales.to(torch.float32))


def test_gptq_loses_less_than_rounding_to_nearest(gptq) -> None:
    """On tokens it was not calibrated on, the calibrated model's logits stay closer to the float
    model's than round-to-nearest int4 of the same groups does."""
    source, folder = gptq
    reference = our_logits(source, "float")
    calibrated_error = (our_logits(folder, "auto") - reference).pow(2).mean()
    nearest_error = (our_logits(source, "int4") - reference).pow(2).mean()
    assert calibrated_error < nearest_error, (calibrated_error, nearest_error)


def test_awq_folder_loads_with_offsets(awq) -> None:
    _, folder = awq
    layers = projections(folder, "auto")
    assert all(isinstance(m, QuantizedLinear) and m.bits == 4 and m.offsets is not None for m in layers)
    ours, reference = our_logits(folder, "auto"), transformers_logits(folder)
    # offsets -(8 + zero point) * scale are rounded to float16 (compressed_checkpoint.py)
    assert torch.allclose(ours, reference, atol=2e-3, rtol=2e-3), (ours - reference).abs().max()


def test_int8_gptq_loads_packed_and_int4_rounds_it_again(tmp_path) -> None:
    _, folder = calibrated(tmp_path, "llama-int8", "llama", "gptq", bits=8)
    layers = projections(folder, "auto")
    assert all(isinstance(m, QuantizedLinear) and m.bits == 8 for m in layers)
    assert torch.allclose(our_logits(folder, "auto"), transformers_logits(folder), atol=1e-4, rtol=1e-4)
    # weights: int4 keeps only 4-bit codes as stored: these are dequantized, then rounded to int4
    assert all(m.bits == 4 for m in projections(folder, "int4"))


def edited_copy(folder: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config["quantization_config"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(quant_method="gptq"), "quantization method 'gptq'"),
    (lambda q: q["config_groups"]["group_0"].update(format="float-quantized"), "format 'float-quantized'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "actorder"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3), "3 bits"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "quantized activations"),
    (lambda q: q["config_groups"]["group_0"].update(targets=["re:nothing"]), "no quantization config group"),
])
def test_unsupported_schemes_are_refused_by_name(gptq, tmp_path, edit, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_model(edited_copy(gptq[1], tmp_path, edit), weights="auto")


def test_cli_reports_bad_input(gptq, tmp_path, capsys) -> None:
    source, folder = gptq
    text = tmp_path / "calibration.txt"
    text.write_text("what is in view")
    assert calibrate.main(["--model", str(source), "--out", str(tmp_path / "x"), "--text", str(text)]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    text.write_text(calibration_text(2))
    assert calibrate.main(["--model", str(source), "--out", str(folder), "--text", str(text)]) == 2
    assert "exists" in capsys.readouterr().err


def test_awq_pairs_are_anchored_at_the_decoders_blocks() -> None:
    """In a VLM the tower's layers share the decoder's local names (its v_proj feeds out_proj, not
    an o_proj): AWQ's pairs match the decoder's blocks only, and projections under two stems are
    refused rather than guessed."""
    import re

    mappings = calibrate.awq_mappings(["model.language_model.layers.0.self_attn.q_proj",
                                       "model.language_model.layers.11.mlp.down_proj"])
    matches = lambda pattern, name: re.match(pattern.removeprefix("re:"), name) is not None  # noqa: E731
    smooths = [m.smooth_layer for m in mappings]
    assert any(matches(p, "model.language_model.layers.11.self_attn.v_proj") for p in smooths)
    assert not any(matches(p, "model.vision_tower.vision_model.encoder.layers.0.self_attn.v_proj") for p in smooths)
    assert not any(matches(p, "model.language_model.layers.1.self_attn.v_proj_extra") for p in smooths)
    balances = [b for m in mappings for b in m.balance_layers]
    assert sum(matches(p, "model.language_model.layers.3.mlp.down_proj") for p in balances) == 1
    with pytest.raises(CheckpointError, match="under one"):
        calibrate.awq_mappings(["model.layers.0.self_attn.q_proj", "other.layers.0.self_attn.q_proj"])
