"""How one forward step runs (torch now; onnxruntime and TensorRT behind the same step contract)."""
from .torch_backend import TorchBackend

__all__ = ["TorchBackend"]
