"""GGUF files written by the tests from small random `transformers` models, the way llama.cpp's
converters lay them out (tensor names from the `gguf` package's constants, LLaMA's q/k rows
permuted, the mmproj tower cut after its deepest feature layer).

Types with a quantizer in the `gguf` package are quantized from the model's weights; the K-quant
types have none there, so their blocks are random bytes with small scales: the file is then a
different (random) model, which is fine for parity against transformers loading the same file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from builders import VOCAB_SIZE, VOCAB_WORDS, WORDS

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Block sizes in bytes and where the block's f16 scale(s) sit: (bytes, offsets of f16 scales).
_K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}
K_TYPES = tuple(_K_BLOCKS)


def _vocabulary() -> list[str]:
    words = VOCAB_WORDS + WORDS
    return words + [f"w{i}" for i in range(len(words), VOCAB_SIZE)]


def finish(writer: Any, path: Path) -> Path:
    """Write a ``GGUFWriter``'s header, metadata and tensors to ``path`` and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half rows -> interleaved rows, per head."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _encode(values: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    if kind == "F32" or values.ndim == 1:  # llama.cpp keeps 1-D tensors (norms, biases) in f32
        return values.astype(np.float32), None
    if kind == "F16":
        return values.astype(np.float16), None
    if kind in _K_BLOCKS:
        size, scales = _K_BLOCKS[kind]
        rows, cols = values.shape
        blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
        for offset in scales:
            blocks[..., offset:offset + 2] = np.array([2e-3 if kind != "Q6_K" else 2e-4], np.float16).view(np.uint8)
        return blocks.reshape(rows, -1), qtype
    return quants.quantize(values.astype(np.float32), qtype), qtype


def _text_weights(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Decoder tensors by their ``*ForCausalLM`` names (``layers.0.self_attn.q_proj.weight``, ...)."""
    out = {}
    for key, value in state.items():
        for prefix in ("model.language_model.", "language_model.model.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            if key.startswith("language_model.lm_head."):
                key = key[len("language_model."):]
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        out[key] = value.detach().float().numpy()
    return out


def write_text_gguf(path: Path, text_cfg: Any, state: dict[str, torch.Tensor], kind: str = "F32",
                    seed: int = 0, chat_template: str | None = CHATML, tokens: list[str] | None = None,
                    kinds: dict[str, str] | None = None) -> Path:
    """A text GGUF of a LLaMA or Qwen2 decoder: ``text_cfg`` its transformers config, ``state`` the
    (causal LM or LLaVA) state dict; ``kinds``: another type for the tensors whose name contains a
    key (``{"v_proj": "Q6_K"}``: the mix of llama.cpp's Q4_K_M)."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFWriter

    arch = {"llama": "llama", "qwen2": "qwen2"}[text_cfg.model_type]
    weights = _text_weights(state)
    heads, kv_heads = text_cfg.num_attention_heads, text_cfg.num_key_value_heads
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(text_cfg.num_hidden_layers)
    writer.add_context_length(text_cfg.max_position_embeddings)
    writer.add_embedding_length(text_cfg.hidden_size)
    writer.add_feed_forward_length(text_cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(getattr(text_cfg, "rope_theta", None) or text_cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(text_cfg.rms_norm_eps)
    writer.add_vocab_size(text_cfg.vocab_size)
    vocab = tokens or _vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in vocab])
    writer.add_token_merges([])
    writer.add_eos_token_id(2)
    if chat_template:
        writer.add_chat_template(chat_template)
    names = {"embed_tokens.weight": TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight",
             "norm.weight": TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight",
             "lm_head.weight": TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"}
    block = {"input_layernorm": MODEL_TENSOR.ATTN_NORM, "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
             "self_attn.q_proj": MODEL_TENSOR.ATTN_Q, "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
             "self_attn.v_proj": MODEL_TENSOR.ATTN_V, "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
             "mlp.gate_proj": MODEL_TENSOR.FFN_GATE, "mlp.up_proj": MODEL_TENSOR.FFN_UP,
             "mlp.down_proj": MODEL_TENSOR.FFN_DOWN}
    for bid in range(text_cfg.num_hidden_layers):
        for ours, tensor_kind in block.items():
            for part in ("weight", "bias"):
                names[f"layers.{bid}.{ours}.{part}"] = f"{TENSOR_NAMES[tensor_kind].format(bid=bid)}.{part}"
    tied = getattr(text_cfg, "tie_word_embeddings", False)
    rng = np.random.default_rng(seed)
    for key, value in weights.items():
        if key == "lm_head.weight" and tied:
            continue
        if arch == "llama" and ".q_proj." in key:
            value = _permute(value, heads)
        elif arch == "llama" and ".k_proj." in key:
            value = _permute(value, kv_heads)
        chosen = next((other for part, other in (kinds or {}).items() if part in key), kind)
        data, qtype = _encode(value, chosen, rng)
        writer.add_tensor(names[key], data, raw_dtype=qtype)
    return finish(writer, path)


def write_mmproj_gguf(path: Path, llava: Any, legacy_mlp_names: bool = False) -> Path:
    """The mmproj GGUF of a transformers ``LlavaForConditionalGeneration`` (f32, llama.cpp's layout)."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFWriter, Keys

    cfg, vision = llava.config, llava.config.vision_config
    clip = vision.model_type == "clip_vision_model"
    layers = cfg.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    features = [layer if layer >= 0 else vision.num_hidden_layers + 1 + layer for layer in layers]
    kept = max(features)
    writer = GGUFWriter(str(path), "clip")
    writer.add_bool(Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_bool(Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_string(Keys.Clip.PROJECTOR_TYPE, "mlp")
    writer.add_uint32(Keys.ClipVision.IMAGE_SIZE, vision.image_size)
    writer.add_uint32(Keys.ClipVision.PATCH_SIZE, vision.patch_size)
    writer.add_uint32(Keys.ClipVision.EMBEDDING_LENGTH, vision.hidden_size)
    writer.add_uint32(Keys.ClipVision.FEED_FORWARD_LENGTH, vision.intermediate_size)
    writer.add_uint32(Keys.ClipVision.BLOCK_COUNT, kept)
    writer.add_uint32(Keys.ClipVision.Attention.HEAD_COUNT, vision.num_attention_heads)
    writer.add_float32(Keys.ClipVision.Attention.LAYERNORM_EPS, vision.layer_norm_eps)
    writer.add_array(Keys.ClipVision.IMAGE_MEAN, [0.5, 0.5, 0.5])
    writer.add_array(Keys.ClipVision.IMAGE_STD, [0.5, 0.5, 0.5])
    writer.add_bool(Keys.ClipVision.USE_GELU, not clip)
    writer.add_array("clip.vision.feature_layer", features)
    state = {k: v.detach().float().numpy() for k, v in llava.state_dict().items()}
    tower = next(p for p in ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.")
                 if any(k.startswith(p) for k in state))
    projector = next(p for p in ("model.multi_modal_projector.", "multi_modal_projector.")
                     if any(k.startswith(p) for k in state))
    up, down = MODEL_TENSOR.V_ENC_FFN_UP, MODEL_TENSOR.V_ENC_FFN_DOWN
    if legacy_mlp_names:
        up, down = down, up
    block = {"layer_norm1": MODEL_TENSOR.V_ENC_INPUT_NORM, "layer_norm2": MODEL_TENSOR.V_ENC_POST_ATTN_NORM,
             "self_attn.q_proj": MODEL_TENSOR.V_ENC_ATTN_Q, "self_attn.k_proj": MODEL_TENSOR.V_ENC_ATTN_K,
             "self_attn.v_proj": MODEL_TENSOR.V_ENC_ATTN_V, "self_attn.out_proj": MODEL_TENSOR.V_ENC_ATTN_O,
             "mlp.fc1": up, "mlp.fc2": down}
    out: dict[str, np.ndarray] = {
        TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight": state[tower + "embeddings.patch_embedding.weight"],
        TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight": state[tower + "embeddings.position_embedding.weight"],
    }
    if clip:
        out[TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_CLS]] = state[tower + "embeddings.class_embedding"]
        for part in ("weight", "bias"):
            out[f"{TENSOR_NAMES[MODEL_TENSOR.V_PRE_NORM]}.{part}"] = state[f"{tower}pre_layrnorm.{part}"]
    else:
        out[TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".bias"] = state[tower + "embeddings.patch_embedding.bias"]
    for bid in range(kept):
        for ours, tensor_kind in block.items():
            for part in ("weight", "bias"):
                out[f"{TENSOR_NAMES[tensor_kind].format(bid=bid)}.{part}"] = \
                    state[f"{tower}encoder.layers.{bid}.{ours}.{part}"]
    for ours, bid in (("linear_1", 0), ("linear_2", 2)):
        for part in ("weight", "bias"):
            out[f"{TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=bid)}.{part}"] = state[f"{projector}{ours}.{part}"]
    for name, value in out.items():
        writer.add_tensor(name, value.astype(np.float32))
    return finish(writer, path)
