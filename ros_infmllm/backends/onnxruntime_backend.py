"""onnxruntime backend: the exported graphs through IO binding on torch tensors (CPU or CUDA)."""
from __future__ import annotations

import numpy as np
import torch

from ..export.manifest import GraphSpec
from .exported import ExportedBackend

NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}


class OrtRunner:
    """One InferenceSession; binds torch tensors by pointer, so nothing is copied in or out."""

    def __init__(self, path: str, device: torch.device) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("device is cuda but this onnxruntime has no CUDAExecutionProvider "
                                   "(install onnxruntime-gpu, or use device cpu)")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.device = device

    def _bind(self, bind, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in NUMPY_TYPES:
            raise TypeError(f"onnxruntime cannot bind {tensor.dtype} ({name}); export in fp32 or fp16")
        bind(name, self.device.type, self.device.index or 0, NUMPY_TYPES[tensor.dtype], list(tensor.shape),
             tensor.data_ptr())

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        binding = self.session.io_binding()
        for name, tensor in inputs.items():
            self._bind(binding.bind_input, name, tensor)
        for name, tensor in outputs.items():
            self._bind(binding.bind_output, name, tensor)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written on torch's stream
        self.session.run_with_iobinding(binding)


class OnnxRuntimeBackend(ExportedBackend):
    name = "onnxruntime"

    def make_runner(self, name: str, spec: GraphSpec) -> OrtRunner:
        path = self.folder / spec.onnx
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX file listed in the manifest is missing")
        return OrtRunner(str(path), self.device)
