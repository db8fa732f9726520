"""Loading Hugging Face LLaVA checkpoints (safetensors) into ``LlavaModel``.

The key-name map lives here and only here. Hugging Face has saved LLaVA under two layouts
(``language_model.model.layers.0...`` before transformers 4.52 and in files it writes today;
``model.language_model.layers.0...`` in some newer files) and vision towers with or without the
``vision_model.`` level; all map to our module names. Every tensor we need must be present with
the right shape, else one ``CheckpointError`` names the file and the tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .config import LlavaConfig, load_config
from .llava import LlavaModel

# (checkpoint prefix, our prefix), longest first so the most specific prefix wins.
_PREFIXES: list[tuple[str, str]] = sorted([
    ("language_model.model.", "decoder."),
    ("model.language_model.", "decoder."),
    ("language_model.lm_head.", "decoder.lm_head."),
    ("lm_head.", "decoder.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "projector."),
    ("model.multi_modal_projector.", "projector."),
], key=lambda pair: -len(pair[0]))
# Checkpoint tensors that LLaVA never uses (SigLIP pooling head, final vision norm).
_UNUSED = ("vision_tower.head.", "vision_tower.post_layernorm.")


def canonical_name(key: str) -> str | None:
    """Our parameter name for a checkpoint key, or None for keys outside the LLaVA layout."""
    for prefix, ours in _PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return None


def checkpoint_name(name: str) -> str:
    """The Hugging Face key (transformers' saved layout) for one of our parameter names."""
    for prefix, ours in _PREFIXES:
        if name.startswith(ours) and prefix.startswith(("language_model.", "vision_tower.vision_model.",
                                                        "multi_modal_projector.")):
            return prefix + name[len(ours):]
    return name


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files")
    return files


def load_state(model: LlavaModel, model_dir: Path, dtype: torch.dtype) -> None:
    """Copy every tensor the model needs from the folder's safetensors files."""
    expected = dict(model.state_dict())
    found: dict[str, Path] = {}
    with torch.no_grad():
        for file in _weight_files(model_dir):
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index but missing")
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
            with handle:
                for key in handle.keys():
                    name = canonical_name(key)
                    if name is None or name.startswith(_UNUSED) or name not in expected:
                        continue
                    tensor = handle.get_tensor(key)
                    target = expected[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                              f"the config implies {tuple(target.shape)}")
                    target.copy_(tensor.to(dtype))
                    found[name] = file
    lm_head, embed = "decoder.lm_head.weight", "decoder.embed_tokens.weight"
    if lm_head not in found and embed in found and model.cfg.text.tie_word_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
        found[lm_head] = found[embed]
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint is missing tensor {checkpoint_name(missing[0])!r}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LlavaModel:
    """Build the model from ``config.json`` and load its safetensors weights, ready for inference."""
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model folder not found")
    cfg: LlavaConfig = load_config(model_dir)
    with torch.device("meta"):
        model = LlavaModel(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    load_state(model, model_dir, dtype)
    model = model.to(device).eval()
    model.decoder.rotary.to(device)
    model.requires_grad_(False)
    return model
