"""TensorRT backend: deserialised engines, I/O bound to torch CUDA tensors by address and run
with ``execute_async_v3`` on torch's current stream (no host copies, no syncs in the loop).

Works with ``tensorrt`` (JetPack, desktop) and ``tensorrt_rtx``. Not executed in this project's
CI or on its lent GPU (see engines/README.md); the binding logic is shared with the onnxruntime
backend, which is tested.
"""
from __future__ import annotations

import torch

from ..export.manifest import GraphSpec
from ..export.trt_build import module_label, tensorrt_module
from .exported import ExportedBackend


class TrtRunner:
    def __init__(self, trt, path: str, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError("the tensorrt backend needs device cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with open(path, "rb") as stream:
            self.engine = self.runtime.deserialize_cuda_engine(stream.read())
        if self.engine is None:
            raise ValueError(f"{path}: {module_label(trt)} cannot load this engine (built for another GPU or "
                               "TensorRT version? rebuild it with infmllm_export on this machine)")
        self.context = self.engine.create_execution_context()
        self.device = device

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")


class TensorRTBackend(ExportedBackend):
    name = "tensorrt"

    def make_runner(self, name: str, spec: GraphSpec) -> TrtRunner:
        trt = tensorrt_module()
        if trt is None:
            raise ValueError("backend tensorrt: neither tensorrt nor tensorrt_rtx is importable here")
        built_with = self.manifest.tools.get("engine_builder")
        if built_with and built_with != module_label(trt):
            raise ValueError(f"{self.folder}: engines built with {built_with}, this machine has {module_label(trt)}; "
                               f"plans only load in the TensorRT version that built them: rebuild with infmllm_export")
        if spec.engine is None or not (self.folder / spec.engine).is_file():
            raise FileNotFoundError(f"{self.folder}: no engine for graph {name}; build one with "
                                    f"infmllm_export --model MODEL --out {self.folder}")
        return TrtRunner(trt, str(self.folder / spec.engine), self.device)
