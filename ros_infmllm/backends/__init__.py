"""How one forward step runs: torch, or exported graphs through onnxruntime or TensorRT, all
behind the same step contract (``encode_images`` and ``step``)."""
from __future__ import annotations

from pathlib import Path

from .torch_backend import TorchBackend

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def make_backend(name: str, model, model_dir: str | Path, engine_dir: str | Path | None = None, manifest=None):
    """The backend ``name`` for a loaded model; exported backends read ``engine_dir`` (and its
    manifest, unless the caller passes the one it has read)."""
    if name == "torch":
        return TorchBackend(model)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if not engine_dir:
        raise ValueError(f"backend {name} needs engine_dir: a folder written by infmllm_export")
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engine_dir, model_dir, model.device, manifest)
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(engine_dir, model_dir, model.device, manifest)


__all__ = ["BACKENDS", "TorchBackend", "make_backend"]
