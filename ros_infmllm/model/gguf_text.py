"""A llama.cpp text GGUF (architectures ``llama`` and ``qwen2``) as our decoder: its shape from the
metadata, and the map from llama.cpp tensor names (the `gguf` package's constants) to ours.

llama.cpp's converter permutes the rows of LLaMA's q and k projections (weights and biases) from
the rotate-half layout of Hugging Face checkpoints to the interleaved layout its rotary kernel
reads; ``unpermute_qk`` undoes that, so the decoder stays the one every other checkpoint uses.
Qwen2 files are written unpermuted (llama.cpp runs them with the rotate-half kernel).
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from .config import TextConfig
from .gguf_file import GGUFFile, tensor_names

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Architectures whose q/k rows llama.cpp's converter permutes.
_PERMUTED_QK = {"llama"}


def text_config(gguf: GGUFFile) -> TextConfig:
    """The decoder's shape from the file's ``{arch}.*`` metadata; refuses what we do not implement."""
    arch = gguf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{gguf.path}: architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    MODEL_TENSOR, TENSOR_NAMES = tensor_names()
    rope_scaling = gguf.get(f"{arch}.rope.scaling.type", "none")
    if rope_scaling not in ("none", "") or gguf.has_tensor(TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"):
        raise CheckpointError(f"{gguf.path}: rope scaling ({rope_scaling!r} or a rope_freqs tensor) is not "
                              f"supported (only plain RoPE)")
    hidden = int(gguf.require(f"{arch}.embedding_length"))
    heads = int(gguf.require(f"{arch}.attention.head_count"))
    kv_heads = int(gguf.get(f"{arch}.attention.head_count_kv", heads))
    if heads % kv_heads:
        raise CheckpointError(f"{gguf.path}: head_count={heads} is not a multiple of head_count_kv={kv_heads}")
    embed = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    vocab = gguf.get(f"{arch}.vocab_size") or gguf.tensor_shape(embed)[0]
    attn = TENSOR_NAMES[MODEL_TENSOR.ATTN_Q].format(bid=0)
    out = TENSOR_NAMES[MODEL_TENSOR.ATTN_OUT].format(bid=0)
    return TextConfig(
        model_type=arch, vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(gguf.require(f"{arch}.feed_forward_length")),
        num_layers=int(gguf.require(f"{arch}.block_count")), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(gguf.get(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(gguf.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(gguf.get(f"{arch}.rope.freq_base", 10000.0)),
        qkv_bias=gguf.has_tensor(attn + ".bias"), o_bias=gguf.has_tensor(out + ".bias"), hidden_act="silu",
        tie_word_embeddings=not gguf.has_tensor(TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"),
        max_position_embeddings=int(gguf.get(f"{arch}.context_length", 4096)),
    )


def text_tensor_names(cfg: TextConfig) -> dict[str, str]:
    """``{our parameter name: GGUF tensor name}`` for the decoder (LM head left out when tied)."""
    MODEL_TENSOR, TENSOR_NAMES = tensor_names()
    names = {"decoder.embed_tokens.weight": TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight",
             "decoder.norm.weight": TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight"}
    if not cfg.tie_word_embeddings:
        names["decoder.lm_head.weight"] = TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
    per_block = {
        "input_layernorm.weight": (MODEL_TENSOR.ATTN_NORM, "weight"),
        "post_attention_layernorm.weight": (MODEL_TENSOR.FFN_NORM, "weight"),
        "self_attn.q_proj.weight": (MODEL_TENSOR.ATTN_Q, "weight"),
        "self_attn.k_proj.weight": (MODEL_TENSOR.ATTN_K, "weight"),
        "self_attn.v_proj.weight": (MODEL_TENSOR.ATTN_V, "weight"),
        "self_attn.o_proj.weight": (MODEL_TENSOR.ATTN_OUT, "weight"),
        "mlp.gate_proj.weight": (MODEL_TENSOR.FFN_GATE, "weight"),
        "mlp.up_proj.weight": (MODEL_TENSOR.FFN_UP, "weight"),
        "mlp.down_proj.weight": (MODEL_TENSOR.FFN_DOWN, "weight"),
    }
    if cfg.qkv_bias:
        per_block.update({f"self_attn.{p}_proj.bias": (kind, "bias") for p, kind in
                          (("q", MODEL_TENSOR.ATTN_Q), ("k", MODEL_TENSOR.ATTN_K), ("v", MODEL_TENSOR.ATTN_V))})
    if cfg.o_bias:
        per_block["self_attn.o_proj.bias"] = (MODEL_TENSOR.ATTN_OUT, "bias")
    for bid in range(cfg.num_layers):
        for ours, (kind, suffix) in per_block.items():
            names[f"decoder.layers.{bid}.{ours}"] = f"{TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"
    return names


def unpermute_qk(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection (weight ``[heads * dim, in]`` or bias ``[heads * dim]``) from
    llama.cpp's interleaved rotary layout back to rotate-half: per head, rows (0, 2, 4, ...,
    1, 3, 5, ...) of the stored order."""
    rows = tensor.shape[0]
    return (tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:])
            .transpose(1, 2).reshape(tensor.shape))


def needs_unpermute(cfg: TextConfig, name: str) -> int:
    """The head count to un-permute ``name`` with, or 0 when it is stored as it is used."""
    if cfg.model_type not in _PERMUTED_QK:
        return 0
    if ".self_attn.q_proj." in name:
        return cfg.num_heads
    if ".self_attn.k_proj." in name:
        return cfg.num_kv_heads
    return 0
