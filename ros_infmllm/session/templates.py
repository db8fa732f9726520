"""Prompt templates: how a system prompt, a camera frame, a question and an answer's end are
written as text for a given model family. ``<image>`` in a template stands for the frame's
visual tokens; ``{query}`` and ``{system}`` for the user's text."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str           # written once at the start of the stream and pinned; "{system}" = the prompt
    frame: str            # one camera frame; must contain <image>
    query: str            # one question, ending where the answer starts; must contain {query}
    turn_end: str         # appended after an answer that stopped without a stop token
    stop: tuple[str, ...]  # token strings that end an answer
    default_system: str = ""

    def __post_init__(self) -> None:
        if IMAGE_PLACEHOLDER not in self.frame:
            raise ValueError(f"template {self.name!r}: frame text must contain {IMAGE_PLACEHOLDER}")
        if "{query}" not in self.query:
            raise ValueError(f"template {self.name!r}: query text must contain {{query}}")


PRESETS: dict[str, PromptTemplate] = {
    "qwen2": PromptTemplate(
        name="qwen2", system="<|im_start|>system\n{system}<|im_end|>\n",
        frame="<|im_start|>user\n<image>\n<|im_end|>\n",
        query="<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
        turn_end="<|im_end|>\n", stop=("<|im_end|>", "<|endoftext|>"),
        default_system="You are a helpful assistant watching a robot's camera."),
    "vicuna": PromptTemplate(
        name="vicuna", system="{system} ", frame="USER: <image>\n", query="USER: {query} ASSISTANT:",
        turn_end="</s>", stop=("</s>",),
        default_system="A chat between a curious human and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    # Our demo model's word-level vocabulary: one marker token per frame, question and answer.
    "demo": PromptTemplate(
        name="demo", system="{system}", frame="<frame> <image>", query=" <q> {query} <a>",
        turn_end=" <eos>", stop=("<eos>",)),
}

TEMPLATE_FILE = "infmllm_template.json"


def template_ids(tokenizer, text: str, image_token: int = -1, image_tokens: int = 0,
                 image_wrap: tuple[list[int], list[int]] = ([], []), image_ids: list[int] | None = None) -> list[int]:
    """Token ids of a template text as a session writes it: the pieces between ``<image>``
    placeholders tokenised alone (no special tokens added), each placeholder ``image_tokens``
    copies of ``image_token`` between the layout's ``image_wrap`` (prefix, suffix) ids, or
    ``image_ids`` as given (a split frame's tiles). Training data is laid out by this same function."""
    ids: list[int] = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.extend(image_ids if image_ids is not None else
                       image_wrap[0] + [image_token] * image_tokens + image_wrap[1])
        if part:
            ids.extend(tokenizer.encode(part, add_special_tokens=False).ids)
    return ids


def image_wrap_ids(tokenizer, cfg) -> tuple[list[int], list[int]]:
    """The ids a layout writes around each image's visual tokens (Idefics3:
    ``<fake_token_around_image><global-img>`` ... ``<fake_token_around_image>``; LLaVA: none)."""
    def ids(tokens: tuple[str, ...]) -> list[int]:
        found = [tokenizer.token_to_id(t) for t in tokens]
        missing = [t for t, i in zip(tokens, found) if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)} token, which this model's image prompt needs")
        return found
    return ids(getattr(cfg, "image_prefix", ())), ids(getattr(cfg, "image_suffix", ()))


def split_image_ids(tokenizer, image_token: int, tokens: int, rows: int, cols: int) -> list[int]:
    """SmolVLM's prompt for a frame split into ``rows`` x ``cols`` tiles plus its global image
    (transformers' Idefics3 processor): ``<fake_token_around_image><row_r_col_c>`` + the tile's
    ``tokens`` placeholders for each tile, a newline after each row, then a newline and the global
    image between ``<fake_token_around_image><global-img>`` and ``<fake_token_around_image>``."""
    names = ["<fake_token_around_image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, rows + 1)
                                                               for c in range(1, cols + 1)]
    found = {name: tokenizer.token_to_id(name) for name in names}
    missing = [name for name, i in found.items() if i is None]
    if missing:
        raise ValueError(f"image splitting: the tokenizer has no {', '.join(missing[:3])} token")
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    fake, ids = found["<fake_token_around_image>"], []
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            ids += [fake, found[f"<row_{r}_col_{c}>"]] + [image_token] * tokens
        ids += newline
    return ids + newline + [fake, found["<global-img>"]] + [image_token] * tokens + [fake]


def template_for(name: str, model_dir: str | Path | None = None, model_type: str = "",
                 chat: PromptTemplate | None = None) -> PromptTemplate:
    """A preset by name; ``chat``: the template derived from the checkpoint's own chat template
    (``chat``, see chat_template.py); ``auto``: the preset named in the checkpoint's
    ``infmllm_template.json``, else the checkpoint's chat template, else qwen2 for Qwen2 decoders
    and vicuna for LLaMA/Mistral."""
    if name == "chat":
        if chat is None:
            raise ValueError("template 'chat': the checkpoint has no chat template we can use")
        return chat
    if name == "auto":
        marker = Path(model_dir) / TEMPLATE_FILE if model_dir is not None else None
        if marker is not None and marker.is_file():
            name = json.loads(marker.read_text()).get("template", "")
        elif chat is not None:
            return chat
        else:
            name = "qwen2" if model_type == "qwen2" else "vicuna"
    if name not in PRESETS:
        raise ValueError(f"unknown prompt template {name!r} (choose from auto, chat, {', '.join(PRESETS)})")
    return PRESETS[name]
