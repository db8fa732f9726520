"""ONNX export and TensorRT engine builds for the vision encoder and the decoder step."""
from .manifest import MANIFEST, Manifest, model_sha256
from .onnx_export import export_onnx

__all__ = ["MANIFEST", "Manifest", "export_onnx", "model_sha256"]
