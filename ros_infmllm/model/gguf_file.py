"""One GGUF file (llama.cpp's checkpoint format), read through the `gguf` package.

The reader maps the file; metadata values and tensors are taken from it on demand. Tensors are
dequantized by the package's own dequantizers (never by code of ours) and returned in PyTorch's
layout: GGML lists dimensions fastest-first, so a ``[out, in]`` weight is stored as ``[in, out]``.
Every problem with the file (unreadable, a missing key or tensor, a tensor type we do not take)
is one ``CheckpointError`` naming the file and what it found.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

# Tensor types we dequantize (the `gguf` package has a dequantizer for each).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# Metadata arrays with one entry per token or merge, held as plain lists once the file is opened: the
# reader keeps two numpy views per string (SmolLM2's 49,152 tokens and merges: about 160 MB of
# objects), and an opened file stays cached (open_gguf) for the life of the process.
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.scores")


def tensor_names():
    """The `gguf` package's tensor kinds and their llama.cpp names (``blk.{bid}.attn_q``, ...),
    imported where a GGUF is read."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    return MODEL_TENSOR, TENSOR_NAMES


class GGUFFile:
    """Typed access to one GGUF file's metadata and tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        try:
            from gguf import GGUFReader
        except ImportError as exc:  # a declared dependency; say how to get it if it is missing
            raise CheckpointError(f"{self.path}: reading GGUF files needs the 'gguf' package "
                                  f"(pip install gguf)") from exc
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as exc:  # the reader raises ValueError, struct errors, ... on bad files
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arrays = {key: self.reader.fields.pop(key).contents() for key in TOKENIZER_ARRAYS
                       if key in self.reader.fields}

    # ---- metadata -----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (int, float, str, bool or a list of them), or ``default`` if absent."""
        if key in self.arrays:
            return self.arrays[key]
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.reader.fields and key not in self.arrays:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return self.get(key)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", ""))

    @property
    def tokens(self) -> list[str]:
        """The vocabulary (``tokenizer.ggml.tokens``; empty if the file has none)."""
        return self.arrays.get("tokenizer.ggml.tokens", [])

    def token_text(self, key: str) -> str | None:
        """The text of a special token the metadata names by id (``tokenizer.ggml.eos_token_id``, ...)."""
        index = self.get(key)
        return self.tokens[int(index)] if index is not None and 0 <= int(index) < len(self.tokens) else None

    # ---- tensors ------------------------------------------------------------------------------
    def has_tensor(self, name: str) -> bool:
        return name in self.tensors

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in PyTorch order (slowest dimension first)."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to ``dtype``, in PyTorch's dimension order."""
        from gguf import quants

        info = self._tensor(name)
        kind = info.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has type {kind}, which is not supported "
                                  f"(supported: {', '.join(SUPPORTED_TYPES)})")
        values = quants.dequantize(info.data, info.tensor_type)
        shape = self.tensor_shape(name)
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        return torch.from_numpy(values if values.flags.writeable else values.copy()).to(dtype)

    def copy_into(self, name: str, target: torch.Tensor) -> None:
        """``target.copy_(self.tensor(name))`` for a matrix of ``target``'s shape, dequantized
        ``PIECE_ELEMENTS`` values (whole rows) at a time: a large table (Qwen2's 151,936 x 1,536)
        never exists whole in float32 beside its copy in the model's dtype."""
        shape = self.tensor_shape(name)
        if not self.reads_rows(name) or tuple(target.shape) != tuple(shape):
            target.copy_(self.tensor(name))  # the whole path, with its errors
            return
        rows = max(1, PIECE_ELEMENTS // shape[1])
        for start in range(0, shape[0], rows):
            target[start:start + rows].copy_(self.dequantized_rows(name, start, start + rows))

    def reads_rows(self, name: str) -> bool:
        """Whether ``dequantized_rows`` can read the tensor a piece of rows at a time (a 2-D tensor
        of a supported type, stored a row of blocks per row)."""
        info = self._tensor(name)
        data = info.data
        return (info.tensor_type.name in SUPPORTED_TYPES and data.ndim == 2
                and data.shape[0] == self.tensor_shape(name)[0])

    def dequantized_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a matrix (``reads_rows``) dequantized to float32: only those rows'
        blocks are read."""
        from gguf import quants

        info = self._tensor(name)
        columns = self.tensor_shape(name)[1]
        values = np.asarray(quants.dequantize(info.data[start:stop], info.tensor_type), dtype=np.float32)
        return torch.from_numpy(values.reshape(-1, columns))

    def tensor_type(self, name: str) -> str:
        """The tensor's GGUF type name (F16, Q4_0, ...)."""
        return self._tensor(name).tensor_type.name

    def raw_blocks(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as they are (quantized blocks), for loaders that keep them packed."""
        return np.asarray(self._tensor(name).data).view(np.uint8)

    def unsupported_types(self, names: list[str]) -> dict[str, str]:
        """``{tensor: type}`` for the tensors among ``names`` whose type we cannot dequantize."""
        return {n: self.tensors[n].tensor_type.name for n in names
                if n in self.tensors and self.tensors[n].tensor_type.name not in SUPPORTED_TYPES}

    def _tensor(self, name: str):
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return info


PIECE_ELEMENTS = 1 << 22  # values dequantized at once by copy_into (16 MiB of float32)


def open_gguf(path: str | Path) -> GGUFFile:
    """The file, opened once per (path, size, modification time): a session reads the weights, the
    tokenizer and the chat template from one file, and parsing its metadata takes seconds."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    stat = resolved.stat()
    return _open_cached(resolved, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)
