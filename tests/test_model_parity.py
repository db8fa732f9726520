"""Our plain-PyTorch LLaVA against `transformers` on small random checkpoints (fp32, <= 1e-4)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import IMAGE_TOKEN, TinySpec, build_tiny_llava, image_tokens_per_frame
from ros_infmllm.errors import CheckpointError
from ros_infmllm.model import load_model

SPECS = {
    "siglip-qwen2-gqa-default": TinySpec(),
    "clip-llama-mha-tied-bias-full-last": TinySpec(tower="clip", decoder="llama", kv_heads=4, tie=True,
                                                   qkv_bias=True, feature_layer=-1, strategy="full", seed=1),
    "siglip-mistral-mqa-multilayer": TinySpec(decoder="mistral", kv_heads=1, feature_layer=[-3, -1], seed=2),
    "clip-llama-gqa-nobias-layer1": TinySpec(tower="clip", decoder="llama", kv_heads=2, qkv_bias=False,
                                             feature_layer=1, seed=4),
    # -4 of 4 hidden states is the embedding output (transformers mishandles a literal 0).
    "siglip-qwen2-mha-tied-full": TinySpec(kv_heads=4, tie=True, strategy="full", feature_layer=-4, seed=5),
}


def _prompts(spec: TinySpec) -> list[tuple[list[int], int]]:
    """(ids, number of images) with and without images, images at different places."""
    n = image_tokens_per_frame(spec)
    return [
        ([7, 20, 21, 22, 30, 31, 40], 0),
        ([7] + [IMAGE_TOKEN] * n + [20, 21, 22, 5, 6], 1),
        ([4] + [IMAGE_TOKEN] * n + [4] + [IMAGE_TOKEN] * n + [5, 33, 34, 6], 2),
        ([10, 11, 25, 26] + [IMAGE_TOKEN] * n, 1),
    ]


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    spec = SPECS[name]
    reference = build_tiny_llava(tmp_path, spec)
    ours = load_model(tmp_path)
    generator = torch.Generator().manual_seed(spec.seed)
    for ids, images in _prompts(spec):
        input_ids = torch.tensor([ids])
        pixels = torch.randn(images, 3, spec.image_size, spec.image_size, generator=generator) if images else None
        with torch.no_grad():
            expected = reference(input_ids=input_ids, pixel_values=pixels).logits
        got = ours.forward_full(input_ids, pixels)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4, (name, ids[:5])


def test_tied_checkpoint_reuses_embeddings(tmp_path: Path) -> None:
    build_tiny_llava(tmp_path, TinySpec(tie=True))
    model = load_model(tmp_path)
    assert model.decoder.lm_head.weight.data_ptr() == model.decoder.embed_tokens.weight.data_ptr()


def test_bf16_load_runs_and_stays_close(tmp_path: Path) -> None:
    build_tiny_llava(tmp_path, TinySpec())
    full = load_model(tmp_path).forward_full(torch.tensor([[7, 20, 21, 22]]))
    half = load_model(tmp_path, dtype=torch.bfloat16).forward_full(torch.tensor([[7, 20, 21, 22]]))
    assert half.dtype == torch.float32  # logits are returned in float32
    assert (half - full).abs().max().item() < 0.05


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    build_tiny_llava(tmp_path, TinySpec())
    weights = _weights(tmp_path)
    key = next(k for k in weights if k.endswith("layers.1.self_attn.k_proj.weight") and "language_model" in k)
    del weights[key]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor .*layers\.1\.self_attn\.k_proj\.weight"):
        load_model(tmp_path)


def test_wrong_shape_names_file_and_tensor(tmp_path: Path) -> None:
    build_tiny_llava(tmp_path, TinySpec())
    weights = _weights(tmp_path)
    key = next(k for k in weights if k.endswith("mlp.up_proj.weight"))
    weights[key] = torch.zeros(3, 3)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .*up_proj\.weight.* shape \(3, 3\)"):
        load_model(tmp_path)


def test_unknown_model_type_is_refused(tmp_path: Path) -> None:
    build_tiny_llava(tmp_path, TinySpec())
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: text_config\.model_type='gpt_neox'"):
        load_model(tmp_path)


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_model(tmp_path)


def test_corrupt_weights_file(tmp_path: Path) -> None:
    build_tiny_llava(tmp_path, TinySpec())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(tmp_path)
