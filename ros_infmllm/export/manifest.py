"""``manifest.json``: what an export folder holds and what it was made from.

Backends read it to bind tensors by name with the right shapes and dtypes, and refuse files
made from another model or at another capacity. Shapes are lists of ints and symbols: ``"q"``
(new tokens in a step), ``"n"`` (images in a vision call) or a sum such as ``"256+q"``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .file_digest import file_sha256

MANIFEST = "manifest.json"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "bool": torch.bool}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list  # ints and symbols

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for the symbol values in ``sizes``."""
        return tuple(dim if isinstance(dim, int) else sum(int(t) if t.isdigit() else sizes[t] for t in dim.split("+"))
                     for dim in self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]


@dataclass
class GraphSpec:
    onnx: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic: dict[str, list[int]]  # symbol -> [min, max]
    engine: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        return cls(data["onnx"], [TensorSpec(**t) for t in data["inputs"]], [TensorSpec(**t) for t in data["outputs"]],
                   data["dynamic"], data.get("engine"))


@dataclass
class Manifest:
    model_sha256: str
    model_type: str
    capacity: int
    max_chunk: int
    max_images: int
    precision: str
    graphs: dict[str, GraphSpec]
    tools: dict[str, str] = field(default_factory=dict)
    source: str = ""
    weights: str = "float"  # the step graph's block projections: float, int8 or int4 (packed_weights.py)

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no manifest; make one with infmllm_export --model DIR --out {folder}")
        data = json.loads(path.read_text())
        data["graphs"] = {k: GraphSpec.from_dict(v) for k, v in data["graphs"].items()}
        return cls(**data)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


def model_sha256(model_dir: Path) -> str:
    """Hash of config.json and the weights, so an export can be matched to its checkpoint: the
    SHA-256 of each file's name and SHA-256 in order (file digests come from a cache keyed by
    size and modification time, so an unchanged checkpoint is not read again; file_digest.py)."""
    paths = [model_dir / "config.json"] + sorted(model_dir.glob("*.safetensors"))
    digest = hashlib.sha256()
    for path, file_digest in zip(paths, file_sha256(paths)):
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(file_digest))
    return digest.hexdigest()
