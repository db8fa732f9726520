"""Small random checkpoints built with `transformers` itself, saved in the Hugging Face layout.

The tests load these with our code and compare against the `transformers` model object, so
parity is checked against the reference implementation, not against numbers we wrote down.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

VOCAB_WORDS = ["<unk>", "<pad>", "<eos>", "<image>", "<frame>", "<q>", "<a>", "USER:", "ASSISTANT:", "</s>",
               "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
WORDS = ["what", "is", "in", "view", "the", "a", "red", "green", "blue", "yellow", "circle", "square",
         "star", "left", "right", "one", "two", "three", "?", "yes", "no", "colour", "of", "see", "did", "you",
         "first", "object", "count", "system", "user", "assistant", "\n", "hello", "camera", "robot"]
VOCAB_SIZE = 64
IMAGE_TOKEN = 3


@dataclass
class TinySpec:
    """One small random LLaVA: which tower, decoder family and options."""

    tower: str = "siglip"               # "siglip" | "clip"
    decoder: str = "qwen2"              # "qwen2" | "llama" | "mistral"
    kv_heads: int = 2                   # 4 = MHA (4 query heads), 2 or 1 = GQA
    layers: int = 2
    tie: bool = False
    qkv_bias: bool | None = None        # llama only: attention_bias
    feature_layer: int | list[int] = -2
    strategy: str = "default"
    image_size: int = 32
    patch: int = 8
    seed: int = 0
    extra_text: dict[str, Any] = field(default_factory=dict)


def build_tokenizer(path: Path, extra_specials: tuple[str, ...] = ()) -> None:
    """A word-level tokenizer covering the test vocabulary, saved as tokenizer.json;
    ``extra_specials`` take the last ids of the vocabulary (a layout's own markers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {w: i for i, w in enumerate(VOCAB_WORDS + WORDS)}
    for i in range(len(vocab), VOCAB_SIZE - len(extra_specials)):
        vocab[f"w{i}"] = i
    for i, token in enumerate(extra_specials, start=VOCAB_SIZE - len(extra_specials)):
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(VOCAB_WORDS + list(extra_specials))
    tok.save(str(path / "tokenizer.json"))


def build_tiny_llava(path: Path, spec: TinySpec = TinySpec()) -> "torch.nn.Module":
    """Save a random LlavaForConditionalGeneration (+ tokenizer) to ``path`` and return it (eval, fp32)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              MistralConfig, Qwen2Config, SiglipVisionConfig)

    torch.manual_seed(spec.seed)
    vision_cls = {"siglip": SiglipVisionConfig, "clip": CLIPVisionConfig}[spec.tower]
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=spec.image_size, patch_size=spec.patch)
    text_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[spec.decoder]
    text_kwargs: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=spec.layers,
                                       num_attention_heads=4, num_key_value_heads=spec.kv_heads,
                                       vocab_size=VOCAB_SIZE, tie_word_embeddings=spec.tie,
                                       max_position_embeddings=4096, eos_token_id=2)
    if spec.decoder == "llama" and spec.qkv_bias is not None:
        text_kwargs["attention_bias"] = spec.qkv_bias
    text_kwargs.update(spec.extra_text)
    text = text_cls(**text_kwargs)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=spec.strategy,
                      tie_word_embeddings=spec.tie)
    model = _save_perturbed(LlavaForConditionalGeneration(cfg), path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": spec.image_size, "width": spec.image_size}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return model


IDEFICS3_SPECIALS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
# SmolVLM's chat template (HuggingFaceTB/SmolVLM-Instruct): message contents are lists of parts.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_tiny_idefics3(path: Path, image_size: int = 32, patch: int = 4, scale: int = 2, seed: int = 0,
                        chat_template: bool = True) -> "torch.nn.Module":
    """Save a random ``Idefics3ForConditionalGeneration`` (SmolVLM layout: SigLIP tower, pixel
    shuffle by ``scale``, LLaMA decoder) with its marker tokens and chat template; return it (eval, fp32)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                         max_position_embeddings=4096, eos_token_id=2, pad_token_id=1),
        scale_factor=scale, image_token_id=IMAGE_TOKEN)
    model = _save_perturbed(Idefics3ForConditionalGeneration(cfg), path)
    build_tokenizer(path, IDEFICS3_SPECIALS)
    if chat_template:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOLVLM_CHAT_TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_image_splitting": True, "max_image_size": {"longest_edge": image_size}, "resample": 1,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"longest_edge": 4 * image_size}}))
    return model


def image_tokens_per_frame(spec: TinySpec) -> int:
    patches = (spec.image_size // spec.patch) ** 2 + (1 if spec.tower == "clip" else 0)
    return patches - 1 if spec.strategy == "default" else patches


def one_token_step_inputs(cfg: Any, capacity: int, filled: int, seed: int, device: torch.device
                          ) -> dict[str, torch.Tensor]:
    """Keyword arguments of ``Decoder.step`` for one token after ``filled`` random cached slots of
    ``capacity`` (the rest invalid): what the decode-path parity tests feed both paths."""
    generator = torch.Generator().manual_seed(seed)
    cache_k, cache_v = (torch.randn(cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim,
                                    generator=generator).to(device) for _ in range(2))
    return {"embeds": torch.randn(1, cfg.hidden_size, generator=generator).to(device),
            "cache_k": cache_k, "cache_v": cache_v, "valid": torch.arange(capacity, device=device) < filled,
            "positions": torch.tensor([filled], device=device)}


def build_tiny_causal_lm(path: Path, decoder: str = "llama", kv_heads: int = 2, tie: bool = False, seed: int = 0,
                         **text: Any) -> "torch.nn.Module":
    """Save a random text-only ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (+ tokenizer) to ``path``
    and return it (eval, fp32). ``text`` overrides config fields (hidden_size, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[decoder]
    kwargs: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=kv_heads, vocab_size=VOCAB_SIZE, tie_word_embeddings=tie,
                                  max_position_embeddings=4096, eos_token_id=2)
    kwargs.update(text)
    return _save_perturbed(model_cls(config_cls(**kwargs)), path)


def _save_perturbed(model: "torch.nn.Module", path: Path) -> "torch.nn.Module":
    """Random init leaves biases at zero and norms at one: perturb them so they matter, then save
    the model (eval) with the test tokenizer."""
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    build_tokenizer(path)
    return model
