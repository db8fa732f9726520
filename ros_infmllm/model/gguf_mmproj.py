"""llama.cpp's ``mmproj`` GGUF (architecture ``clip``): a CLIP or SigLIP tower and a LLaVA MLP
projector, as our ``VisionTower`` and ``Projector``.

What the file says, as llama.cpp's converters write it and its clip runtime reads it:
- ``clip.vision.*`` gives the tower's shape; ``block_count`` counts the blocks *stored*: the
  converter drops the blocks after the deepest feature layer (LLaVA-1.5: the last one).
- ``clip.vision.feature_layer`` (optional) lists the hidden states the projector reads (0: the
  embeddings); without it the projector reads the output of the last stored block.
- A class embedding means a CLIP tower (pre-layernorm, class token dropped before the projector);
  without one it is SigLIP (every patch token kept).
- ``clip.use_gelu``: the tower's MLP uses GELU (tanh form, ggml's) instead of CLIP's quick GELU.
- The projector is ``mm.0`` -> GELU -> ``mm.2`` (projector type ``mlp``).
- Older converters named a block's first MLP matrix ``ffn_down`` and the second ``ffn_up``; which
  is which is read from the shapes, so both spellings load.
"""
from __future__ import annotations

from ..errors import CheckpointError
from .config import LlavaConfig, TextConfig, VisionConfig
from .gguf_file import GGUFFile, tensor_names

SUPPORTED_PROJECTORS = ("mlp",)
FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # written by llama.cpp's LLaVA converter


def vision_config(mmproj: GGUFFile) -> VisionConfig:
    from gguf import Keys

    if mmproj.architecture != "clip":
        raise CheckpointError(f"{mmproj.path}: architecture {mmproj.architecture!r} is not an mmproj file "
                              f"(expected 'clip')")
    projector = mmproj.get(Keys.Clip.PROJECTOR_TYPE, "mlp")
    if projector not in SUPPORTED_PROJECTORS:
        raise CheckpointError(f"{mmproj.path}: projector type {projector!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_PROJECTORS)})")
    MODEL_TENSOR, TENSOR_NAMES = tensor_names()
    clip = mmproj.has_tensor(TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_CLS])
    use_gelu = bool(mmproj.get(Keys.ClipVision.USE_GELU, not clip))
    return VisionConfig(
        model_type="clip_vision_model" if clip else "siglip_vision_model",
        hidden_size=int(mmproj.require(Keys.ClipVision.EMBEDDING_LENGTH)),
        intermediate_size=int(mmproj.require(Keys.ClipVision.FEED_FORWARD_LENGTH)),
        num_layers=int(mmproj.require(Keys.ClipVision.BLOCK_COUNT)),
        num_heads=int(mmproj.require(Keys.ClipVision.Attention.HEAD_COUNT)),
        image_size=int(mmproj.require(Keys.ClipVision.IMAGE_SIZE)),
        patch_size=int(mmproj.require(Keys.ClipVision.PATCH_SIZE)), num_channels=3,
        hidden_act="gelu_pytorch_tanh" if use_gelu else "quick_gelu",
        layer_norm_eps=float(mmproj.get(Keys.ClipVision.Attention.LAYERNORM_EPS, 1e-6)),
    )


def llava_config(mmproj: GGUFFile, text: TextConfig, image_token_index: int,
                 eos_token_ids: tuple[int, ...]) -> LlavaConfig:
    """The whole model's config: this tower and projector in front of ``text``."""
    vision = vision_config(mmproj)
    layers = tuple(int(x) for x in (mmproj.get(FEATURE_LAYER_KEY) or [vision.num_layers]))
    for layer in layers:
        if not 0 <= layer <= vision.num_layers:
            raise CheckpointError(f"{mmproj.path}: feature layer {layer} is outside the {vision.num_layers + 1} "
                                  f"hidden states of the stored tower")
    MODEL_TENSOR, TENSOR_NAMES = tensor_names()
    first = TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=0)
    width = mmproj.tensor_shape(first + ".weight")
    if width != (text.hidden_size, vision.hidden_size * len(layers)):
        raise CheckpointError(f"{mmproj.path}: projector {first}.weight has shape {width}, but the decoder's width "
                              f"is {text.hidden_size} and the tower gives {vision.hidden_size * len(layers)}")
    return LlavaConfig(text=text, vision=vision, image_token_index=image_token_index, vision_feature_layers=layers,
                       vision_feature_select_strategy="default" if vision.has_class_token else "full",
                       projector_hidden_act="gelu", projector_bias=mmproj.has_tensor(first + ".bias"),
                       eos_token_ids=eos_token_ids)


def vision_tensor_names(mmproj: GGUFFile, cfg: LlavaConfig) -> dict[str, str]:
    """``{our parameter name: GGUF tensor name}`` for the tower and the projector."""
    MODEL_TENSOR, TENSOR_NAMES = tensor_names()
    vision = cfg.vision
    names = {"vision_tower.embeddings.patch_embedding.weight": TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight",
             "vision_tower.embeddings.position_embedding.weight": TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight"}
    if vision.has_class_token:
        names["vision_tower.embeddings.class_embedding"] = TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_CLS]
        for part in ("weight", "bias"):
            names[f"vision_tower.pre_layrnorm.{part}"] = f"{TENSOR_NAMES[MODEL_TENSOR.V_PRE_NORM]}.{part}"
    else:
        names["vision_tower.embeddings.patch_embedding.bias"] = TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".bias"
    per_block = {"layer_norm1": MODEL_TENSOR.V_ENC_INPUT_NORM, "layer_norm2": MODEL_TENSOR.V_ENC_POST_ATTN_NORM,
                 "self_attn.q_proj": MODEL_TENSOR.V_ENC_ATTN_Q, "self_attn.k_proj": MODEL_TENSOR.V_ENC_ATTN_K,
                 "self_attn.v_proj": MODEL_TENSOR.V_ENC_ATTN_V, "self_attn.out_proj": MODEL_TENSOR.V_ENC_ATTN_O}
    for bid in range(vision.num_layers):
        for ours, kind in per_block.items():
            for part in ("weight", "bias"):
                names[f"vision_tower.encoder.layers.{bid}.{ours}.{part}"] = \
                    f"{TENSOR_NAMES[kind].format(bid=bid)}.{part}"
        fc1, fc2 = _mlp_order(mmproj, bid, vision)
        for ours, theirs in (("fc1", fc1), ("fc2", fc2)):
            for part in ("weight", "bias"):
                names[f"vision_tower.encoder.layers.{bid}.mlp.{ours}.{part}"] = f"{theirs}.{part}"
    for ours, bid in (("linear_1", 0), ("linear_2", 2)):
        parts = ("weight", "bias") if cfg.projector_bias else ("weight",)
        for part in parts:
            names[f"projector.{ours}.{part}"] = f"{TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=bid)}.{part}"
    return names


def _mlp_order(mmproj: GGUFFile, bid: int, vision: VisionConfig) -> tuple[str, str]:
    """(first, second) MLP matrix names of block ``bid``: the first widens to the intermediate size."""
    MODEL_TENSOR, TENSOR_NAMES = tensor_names()
    up = TENSOR_NAMES[MODEL_TENSOR.V_ENC_FFN_UP].format(bid=bid)
    down = TENSOR_NAMES[MODEL_TENSOR.V_ENC_FFN_DOWN].format(bid=bid)
    if mmproj.has_tensor(up + ".weight") and mmproj.tensor_shape(up + ".weight")[0] == vision.intermediate_size:
        return up, down
    return down, up
