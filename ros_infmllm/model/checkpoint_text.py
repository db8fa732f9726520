"""What a checkpoint says about text: its tokenizer, and its chat template (Jinja source with the
token strings it refers to), from a Hugging Face folder or a GGUF file's metadata."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import CheckpointError
from .checkpoint import CheckpointFiles
from .gguf_file import open_gguf

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class ChatTemplateSource:
    """A Jinja chat template as the checkpoint ships it, with the special tokens it may use."""

    source: str
    bos_token: str = ""
    eos_token: str = ""


def load_tokenizer(files: CheckpointFiles) -> Tokenizer:
    """``tokenizer.json`` in the checkpoint folder; for a GGUF model without one, the tokenizer
    rebuilt from the file's metadata."""
    path = files.folder / TOKENIZER_FILE
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type
            raise CheckpointError(f"{path}: not a readable tokenizer file ({exc})") from exc
    if files.gguf is None:
        raise CheckpointError(f"{path}: not found")
    from .gguf_tokenizer import gguf_tokenizer

    return gguf_tokenizer(open_gguf(files.gguf))


def chat_template(files: CheckpointFiles) -> ChatTemplateSource | None:
    """The checkpoint's chat template, or None if it ships none."""
    if files.gguf is not None:
        gguf = open_gguf(files.gguf)
        source = gguf.get("tokenizer.chat_template")
        if not source:
            return None
        return ChatTemplateSource(str(source), gguf.token_text("tokenizer.ggml.bos_token_id") or "",
                                  gguf.token_text("tokenizer.ggml.eos_token_id") or "")
    return _folder_chat_template(files.folder)


def _folder_chat_template(folder: Path) -> ChatTemplateSource | None:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    source = config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if not source and jinja.is_file():
        source = jinja.read_text()
    if not isinstance(source, str) or not source:
        return None  # absent, or a list of named templates: none we pick for the user

    def token(key: str) -> str:
        value = config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else str(value)

    return ChatTemplateSource(source, token("bos_token"), token("eos_token"))
