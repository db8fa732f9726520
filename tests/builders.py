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


def build_tokenizer(path: Path, extra_specials: tuple[str, ...] = (), extra_words: tuple[str, ...] = ()) -> None:
    """A word-level tokenizer covering the test vocabulary, saved as tokenizer.json;
    ``extra_specials`` take the last ids of the vocabulary (a layout's own markers),
    ``extra_words`` the ids right after the test words (filler ids otherwise)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {w: i for i, w in enumerate(VOCAB_WORDS + WORDS + list(extra_words))}
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


# SmolVLM's tile markers for image splitting, up to 3 x 3 tiles (the test vocabulary has room for nine).
ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in (1, 2, 3) for c in (1, 2, 3))


def build_tiny_idefics3(path: Path, image_size: int = 32, patch: int = 4, scale: int = 2, seed: int = 0,
                        chat_template: bool = True, longest_edge: int | None = None) -> "torch.nn.Module":
    """Save a random ``Idefics3ForConditionalGeneration`` (SmolVLM layout: SigLIP tower, pixel
    shuffle by ``scale``, LLaMA decoder) with its marker tokens (tile markers up to 3 x 3), chat
    template and processor config (``size.longest_edge``, default 4 tiles); return it (eval, fp32)."""
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
    build_tokenizer(path, IDEFICS3_SPECIALS, ROW_COL_TOKENS)
    if chat_template:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOLVLM_CHAT_TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_image_splitting": True, "max_image_size": {"longest_edge": image_size}, "resample": 1,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"longest_edge": longest_edge or 4 * image_size}}))
    return model


def image_tokens_per_frame(spec: TinySpec) -> int:
    patches = (spec.image_size // spec.patch) ** 2 + (1 if spec.tower == "clip" else 0)
    return patches - 1 if spec.strategy == "default" else patches


def frame_and_question_logits(session: Any, frame: Any, question: str = "what is in view ?") -> torch.Tensor:
    """``[2, vocab]``: a session's logits after one frame (``frame_inputs``: its ids, visual tokens
    and any M-RoPE offsets) and then after a question in its template: what the backend parity
    tests compare between torch and an exported backend."""
    ids, features, offsets = session.frame_inputs(frame)
    frame_logits = session.feed(ids, features, position_offsets=offsets)
    query = torch.tensor(session._template_ids(session.template.query.replace("{query}", question)))
    return torch.stack([frame_logits, session.feed(query)])


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


QWEN2_VL_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
# Qwen2-VL-Instruct's chat template (Qwen/Qwen2-VL-2B-Instruct; Qwen2.5-VL's is the same).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen2_vl(path: Path, variant: str = "qwen2_vl", patch: int = 4, window: int = 16, seed: int = 0,
                        flat_config: bool = False, min_pixels: int = 64, max_pixels: int = 4096) -> "torch.nn.Module":
    """Save a random ``Qwen2VLForConditionalGeneration`` (``variant`` qwen2_vl) or
    ``Qwen2_5_VLForConditionalGeneration`` (qwen2_5_vl: RMSNorm, gated MLP, attention in windows
    of ``window`` pixels except in block 1) with its markers, chat template and processor config;
    return it (eval, fp32). Merge 2, temporal patch 2, M-RoPE sections (2, 3, 3) of a 16-wide
    head. ``flat_config``: rewrite config.json as the Qwen team's files have it (decoder fields
    at the top level, ``in_chans``, ``rope_scaling`` type mrope)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(seed)
    specials = {name: VOCAB_SIZE - len(QWEN2_VL_SPECIALS) + i for i, name in enumerate(QWEN2_VL_SPECIALS)}
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=VOCAB_SIZE, max_position_embeddings=4096, eos_token_id=2, bos_token_id=1, rope_theta=10000.0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    if variant == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=window, fullatt_block_indexes=[1])
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                     video_token_id=specials["<|video_pad|>"], vision_start_token_id=specials["<|vision_start|>"],
                     vision_end_token_id=specials["<|vision_end|>"], tie_word_embeddings=False)
    model = _save_perturbed(model_cls(cfg), path)
    build_tokenizer(path, QWEN2_VL_SPECIALS)
    if flat_config:
        raw = json.loads((path / "config.json").read_text())
        flat = {k: v for k, v in raw.pop("text_config").items() if k not in ("model_type", "rope_parameters")}
        flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        flat["rope_theta"] = 10000.0
        raw["vision_config"]["in_chans"] = raw["vision_config"].pop("in_channels", 3)
        (path / "config.json").write_text(json.dumps({**raw, **flat}))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": patch, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
        "image_processor_type": "Qwen2VLImageProcessor"}))
    return model
