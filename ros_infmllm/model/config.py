"""Model configuration read from a Hugging Face ``config.json``: ``LlavaForConditionalGeneration``,
``Idefics3ForConditionalGeneration`` (SmolVLM, SmolVLM2), ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration``, or a text-only ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` /
``MistralForCausalLM``.

Checkpoints often leave out fields that equal the `transformers` class defaults, so each supported
``model_type`` carries a table of those defaults here. Anything we do not implement (rope scaling,
MLP bias, an unknown tower or decoder) is refused with an error naming the field, instead of
loading a model that silently computes something else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# Defaults of the transformers config classes, for the fields we read.
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                  hidden_act="silu", tie_word_embeddings=False, max_position_embeddings=2048),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                  hidden_act="silu", tie_word_embeddings=False, max_position_embeddings=32768),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                    hidden_act="silu", tie_word_embeddings=False, max_position_embeddings=32768),
}
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16, num_channels=3,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "idefics3_vision": dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=16, image_size=224, patch_size=32, num_channels=3,
                            hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
# Qwen2-VL / Qwen2.5-VL decoders: Qwen2 blocks, their config classes' own defaults.
_QWEN_VL_TEXT = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
                     hidden_act="silu", tie_word_embeddings=False, max_position_embeddings=32768)
_TEXT_DEFAULTS["qwen2_vl_text"] = _QWEN_VL_TEXT
_TEXT_DEFAULTS["qwen2_5_vl_text"] = _QWEN_VL_TEXT
# Their vision towers (transformers' Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig defaults).
_QWEN_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                       in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
}
# Qwen2 always has q/k/v biases and no o_proj bias; LLaMA's `attention_bias` covers all four.
_QKV_BIAS_ALWAYS = {"qwen2", "qwen2_vl_text", "qwen2_5_vl_text"}


@dataclass(frozen=True)
class TextConfig:
    """Decoder shape (LLaMA / Qwen2 / Mistral family)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    hidden_act: str
    tie_word_embeddings: bool
    max_position_embeddings: int
    # Multimodal RoPE (Qwen2-VL): rotary frequency pairs taken by the temporal, height and width
    # position components, in that order; None: plain RoPE.
    mrope_section: tuple[int, ...] | None = None


@dataclass(frozen=True)
class VisionConfig:
    """ViT shape (CLIP or SigLIP vision tower)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        return self.model_type == "clip_vision_model"


@dataclass(frozen=True)
class CausalLMConfig:
    """A text-only language model: the decoder and its end-of-sequence ids. It has no vision
    tower, so no frame can be ingested (``vision`` is None, no visual tokens per image)."""

    text: TextConfig
    eos_token_ids: tuple[int, ...]
    vision = None
    image_token_index = -1  # never a real id: text-only streams hold no image placeholders
    num_image_tokens = 0


@dataclass(frozen=True)
class Idefics3Config:
    """SmolVLM / SmolVLM2 (transformers' Idefics3 layout): a SigLIP tower whose last hidden state
    (after its post-layernorm) is pixel-shuffled (``scale_factor`` x ``scale_factor`` patches into
    one token) and projected by one linear layer into a LLaMA decoder. In the prompt each image is
    ``<fake_token_around_image><global-img>`` + the image tokens + ``<fake_token_around_image>``."""

    text: TextConfig
    vision: VisionConfig
    image_token_index: int
    scale_factor: int
    eos_token_ids: tuple[int, ...]
    image_prefix: tuple[str, ...] = ("<fake_token_around_image>", "<global-img>")
    image_suffix: tuple[str, ...] = ("<fake_token_around_image>",)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches // self.scale_factor ** 2


@dataclass(frozen=True)
class QwenVisionConfig:
    """The Qwen2-VL / Qwen2.5-VL vision tower: 3-D patches (``temporal_patch_size`` frames x
    ``patch_size``^2 pixels) at any resolution that is a multiple of ``patch_size * merge_size``,
    2-D rotary positions, then ``merge_size`` x ``merge_size`` patches merged into one token of
    ``out_size`` (the decoder's width). Qwen2-VL blocks: LayerNorm + MLP (``mlp_width``);
    Qwen2.5-VL: RMSNorm + SwiGLU, attention inside ``window_size``-pixel windows except in
    ``full_attention_blocks``."""

    variant: str  # "qwen2_vl" or "qwen2_5_vl"
    width: int
    depth: int
    num_heads: int
    mlp_width: int
    hidden_act: str
    out_size: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    window_size: int = 0  # 0: every block attends over the whole image (Qwen2-VL)
    full_attention_blocks: tuple[int, ...] = ()
    rope_theta: float = 10000.0

    @property
    def model_type(self) -> str:
        return self.variant

    @property
    def pixel_factor(self) -> int:
        """An image's sides are multiples of this (one merged token's side in pixels)."""
        return self.patch_size * self.merge_size

    @property
    def patch_values(self) -> int:
        """Numbers in one flattened patch, as transformers' processor writes it."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass(frozen=True)
class Qwen2VLConfig:
    """Qwen2-VL / Qwen2.5-VL: the vision tower above and a Qwen2 decoder with multimodal RoPE.
    In the prompt each image is ``<|vision_start|>`` + one ``<|image_pad|>`` per merged token +
    ``<|vision_end|>``; an image's tokens count depends on its size (dynamic resolution)."""

    text: TextConfig
    vision: QwenVisionConfig
    image_token_index: int
    eos_token_ids: tuple[int, ...]
    image_prefix: tuple[str, ...] = ("<|vision_start|>",)
    image_suffix: tuple[str, ...] = ("<|vision_end|>",)


@dataclass(frozen=True)
class LlavaConfig:
    """The whole vision-language model: tower, projector, decoder and how they are joined."""

    text: TextConfig
    vision: VisionConfig
    image_token_index: int
    vision_feature_layers: tuple[int, ...]
    vision_feature_select_strategy: str
    projector_hidden_act: str
    projector_bias: bool
    eos_token_ids: tuple[int, ...]

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image after feature selection (the CLS token is dropped by 'default')."""
        tokens = self.vision.num_patches + (1 if self.vision.has_class_token else 0)
        return tokens - 1 if self.vision_feature_select_strategy == "default" else tokens


def _merged(section: dict[str, Any], defaults: dict[str, dict[str, Any]], where: str, path: Path) -> dict[str, Any]:
    model_type = section.get("model_type")
    if model_type not in defaults:
        raise CheckpointError(f"{path}: {where}.model_type={model_type!r} is not supported "
                              f"(supported: {sorted(defaults)})")
    return {**defaults[model_type], **{k: v for k, v in section.items() if v is not None}}


def _rope_theta(text: dict[str, Any], path: Path, mrope: bool = False) -> float:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if mrope and rope_type == "mrope":  # Qwen2-VL files name M-RoPE a rope type; transformers reads it as default
        rope_type = "default"
    if rope_type != "default":
        raise CheckpointError(f"{path}: text_config rope_type={rope_type!r} is not supported (only 'default')")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def parse_text_config(text: dict[str, Any], path: Path, tie_default: bool = False, mrope: bool = False) -> TextConfig:
    """``mrope``: the decoder is Qwen2-VL's, whose files may name M-RoPE a rope type (the caller
    sets ``mrope_section``)."""
    text = _merged({"model_type": "llama", **text}, _TEXT_DEFAULTS, "text_config", path)
    if text.get("mlp_bias"):
        raise CheckpointError(f"{path}: text_config.mlp_bias=true is not supported")
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise CheckpointError(f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    qkv_bias = text["model_type"] in _QKV_BIAS_ALWAYS or bool(text.get("attention_bias", False))
    return TextConfig(
        model_type=text["model_type"], vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]), num_layers=int(text["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
        rms_norm_eps=float(text["rms_norm_eps"]), rope_theta=_rope_theta(text, path, mrope),
        qkv_bias=qkv_bias, o_bias=text["model_type"] == "llama" and bool(text.get("attention_bias", False)),
        hidden_act=str(text["hidden_act"]),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", tie_default)),
        max_position_embeddings=int(text["max_position_embeddings"]),
    )


def parse_vision_config(vision: dict[str, Any], path: Path) -> VisionConfig:
    vision = _merged({"model_type": "clip_vision_model", **vision}, _VISION_DEFAULTS, "vision_config", path)
    return VisionConfig(
        model_type=vision["model_type"], hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]), num_layers=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]), image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]), num_channels=int(vision["num_channels"]),
        hidden_act=str(vision["hidden_act"]), layer_norm_eps=float(vision["layer_norm_eps"]),
    )


def _eos_ids(section: dict[str, Any], fallback: Any = None) -> tuple[int, ...]:
    eos = section.get("eos_token_id", fallback)
    return () if eos is None else ((int(eos),) if isinstance(eos, int) else tuple(int(x) for x in eos))


def idefics3_config(raw: dict[str, Any], path: Path) -> Idefics3Config:
    """``config.json`` of an ``Idefics3ForConditionalGeneration`` checkpoint (transformers'
    ``Idefics3Config`` defaults where a field is left out)."""
    text_raw = raw.get("text_config") or {}
    text = parse_text_config(text_raw, path, bool(raw.get("tie_word_embeddings", False)))
    if text.model_type != "llama":
        raise CheckpointError(f"{path}: Idefics3 text_config.model_type={text.model_type!r} is not supported (only 'llama')")
    vision = parse_vision_config({"model_type": "idefics3_vision", **(raw.get("vision_config") or {})}, path)
    if vision.model_type != "idefics3_vision":
        raise CheckpointError(f"{path}: Idefics3 vision_config.model_type={vision.model_type!r} is not 'idefics3_vision'")
    scale = int(raw.get("scale_factor", 2))
    side = vision.image_size // vision.patch_size
    if scale < 1 or side % scale:
        raise CheckpointError(f"{path}: scale_factor={scale} does not divide the tower's {side}x{side} patch grid")
    return Idefics3Config(text=text, vision=vision, image_token_index=int(raw.get("image_token_id", 128257)),
                          scale_factor=scale, eos_token_ids=_eos_ids(text_raw, raw.get("eos_token_id")))


def _mrope_section(text: dict[str, Any], head_dim: int, path: Path) -> tuple[int, ...]:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    section = tuple(int(x) for x in params.get("mrope_section", (16, 24, 24)))
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise CheckpointError(f"{path}: mrope_section={list(section)} must be three numbers summing to head_dim / 2 "
                              f"= {head_dim // 2}")
    return section


def qwen2_vl_config(raw: dict[str, Any], path: Path) -> Qwen2VLConfig:
    """``config.json`` of a ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``
    checkpoint: the decoder's fields at the top level (files the Qwen team published) or under
    ``text_config`` (files transformers writes today)."""
    variant = raw["model_type"]
    text_raw = dict(raw.get("text_config") or {k: v for k, v in raw.items() if k != "vision_config"})
    text_raw["model_type"] = f"{variant}_text"
    if text_raw.get("use_sliding_window"):
        raise CheckpointError(f"{path}: use_sliding_window=true is not supported (every layer attends to the cache)")
    text = parse_text_config(text_raw, path, bool(raw.get("tie_word_embeddings", False)), mrope=True)
    text = replace(text, mrope_section=_mrope_section(text_raw, text.head_dim, path))
    given = {k: x for k, x in (raw.get("vision_config") or {}).items() if x is not None}
    v = {**_QWEN_VISION_DEFAULTS[variant], **given}
    if "in_chans" in v:  # the name in the Qwen team's files
        v["in_channels"] = v.pop("in_chans")
    rope = v.get("rope_parameters") or {}
    if variant == "qwen2_vl":
        width, out_size = int(v["embed_dim"]), int(v["hidden_size"])
        mlp_width = width * int(v["mlp_ratio"])
        window, full = 0, ()
    else:
        width, mlp_width, out_size = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["out_hidden_size"])
        window, full = int(v["window_size"]), tuple(int(i) for i in v["fullatt_block_indexes"])
    vision = QwenVisionConfig(
        variant=variant, width=width, depth=int(v["depth"]), num_heads=int(v["num_heads"]), mlp_width=mlp_width,
        hidden_act=str(v["hidden_act"]), out_size=out_size, patch_size=int(v["patch_size"]),
        temporal_patch_size=int(v["temporal_patch_size"]), merge_size=int(v["spatial_merge_size"]),
        in_channels=int(v["in_channels"]), window_size=window, full_attention_blocks=full,
        rope_theta=float(rope.get("rope_theta", 10000.0)))
    if out_size != text.hidden_size:
        raise CheckpointError(f"{path}: the vision tower's output width {out_size} is not the decoder's "
                              f"{text.hidden_size}")
    if window and window % vision.pixel_factor:
        raise CheckpointError(f"{path}: vision window_size={window} is not a multiple of patch_size * "
                              f"spatial_merge_size = {vision.pixel_factor}")
    return Qwen2VLConfig(text=text, vision=vision, image_token_index=int(raw.get("image_token_id", 151655)),
                         eos_token_ids=_eos_ids(text_raw, raw.get("eos_token_id")))


def load_config(model_dir: str | Path) -> LlavaConfig | Idefics3Config | Qwen2VLConfig | CausalLMConfig:
    """Read ``config.json`` of a checkpoint folder: LLaVA or Idefics3 layout, or a text-only
    LLaMA-family model."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (expected a Hugging Face checkpoint folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    model_type = raw.get("model_type")
    if model_type in _TEXT_DEFAULTS and not model_type.endswith("_vl_text"):
        return CausalLMConfig(text=parse_text_config(raw, path), eos_token_ids=_eos_ids(raw))
    if model_type == "idefics3":
        return idefics3_config(raw, path)
    if model_type in _QWEN_VISION_DEFAULTS:
        return qwen2_vl_config(raw, path)
    if model_type != "llava":
        text_types = ", ".join(sorted(t for t in _TEXT_DEFAULTS if not t.endswith("_vl_text")))
        raise CheckpointError(f"{path}: model_type={model_type!r} is not supported "
                              f"(expected 'llava', 'idefics3', 'qwen2_vl', 'qwen2_5_vl' or a text model: {text_types})")
    text = parse_text_config(raw.get("text_config") or {}, path, bool(raw.get("tie_word_embeddings", False)))
    vision = parse_vision_config(raw.get("vision_config") or {}, path)
    layers = raw.get("vision_feature_layer", -2)
    layers = (int(layers),) if isinstance(layers, int) else tuple(int(x) for x in layers)
    for layer in layers:
        if not -(vision.num_layers + 1) <= layer <= vision.num_layers:
            raise CheckpointError(f"{path}: vision_feature_layer={layer} is outside the tower's "
                                  f"{vision.num_layers + 1} hidden states")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{path}: vision_feature_select_strategy={strategy!r} is not 'default' or 'full'")
    eos_ids = _eos_ids(raw.get("text_config") or {}, raw.get("eos_token_id"))
    return LlavaConfig(
        text=text, vision=vision,
        image_token_index=int(raw.get("image_token_index", raw.get("image_token_id", 32000))),
        vision_feature_layers=layers, vision_feature_select_strategy=strategy,
        projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        eos_token_ids=eos_ids,
    )
