"""What the onnxruntime and TensorRT backends share: the step contract over an export folder.

Tensors are bound by name from the manifest: inputs are handed over as they are when their dtype
and layout already fit (the cache buffers always do, so nothing is copied), outputs are
preallocated once per size and reused, so a decode loop allocates nothing and never copies to the
host. A runner only has to execute one graph on those bound tensors, which is all that differs
between onnxruntime (IO binding) and TensorRT (``set_tensor_address`` + ``execute_async_v3``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..errors import CheckpointError
from ..export.manifest import GraphSpec, Manifest, model_sha256
from ..model.decoder import StepOutput
from .graph_runner import EagerRunner


class GraphRunner(Protocol):
    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Execute the graph reading ``inputs`` and writing into ``outputs`` (same device)."""


class GraphBinding:
    """Inputs checked and converted to the manifest's dtypes; outputs allocated per size, reused."""

    def __init__(self, name: str, spec: GraphSpec, device: torch.device) -> None:
        self.name, self.spec, self.device = name, spec, device
        self._outputs: dict[tuple, dict[str, torch.Tensor]] = {}

    def sizes(self, values: dict[str, torch.Tensor]) -> dict[str, int]:
        """Symbol values read off the inputs, checked against the exported range."""
        sizes: dict[str, int] = {}
        for tensor in self.spec.inputs:
            for axis, dim in enumerate(tensor.shape):
                if isinstance(dim, str) and dim in self.spec.dynamic:
                    sizes[dim] = values[tensor.name].shape[axis]
        for symbol, (low, high) in self.spec.dynamic.items():
            if not low <= sizes[symbol] <= high:
                raise ValueError(f"{self.name}: {symbol}={sizes[symbol]} outside the exported range [{low}, {high}]")
        return sizes

    def inputs(self, values: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        bound = {}
        for tensor in self.spec.inputs:
            value = values[tensor.name]
            if tuple(value.shape) != tensor.resolve(sizes):
                raise ValueError(f"{self.name}: input {tensor.name} has shape {tuple(value.shape)}, the export "
                                 f"expects {tensor.resolve(sizes)}")
            bound[tensor.name] = value.to(self.device, tensor.torch_dtype).contiguous()
        return bound

    def outputs(self, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        key = tuple(sorted(sizes.items()))
        if key not in self._outputs:
            self._outputs[key] = {t.name: torch.empty(t.resolve(sizes), dtype=t.torch_dtype, device=self.device)
                                  for t in self.spec.outputs}
        return self._outputs[key]


class ExportedBackend:
    """The step contract run by exported graphs; subclasses supply ``make_runner``."""

    name = "exported"

    def __init__(self, folder: str | Path, model_dir: str | Path, device: str | torch.device = "cpu",
                 manifest: Manifest | None = None) -> None:
        """``manifest``: the folder's manifest where the caller has already read it."""
        self.folder, self.device = Path(folder), torch.device(device)
        self.manifest = manifest or Manifest.load(self.folder)
        expected = model_sha256(Path(model_dir))
        if self.manifest.model_sha256 != expected:
            raise CheckpointError(f"{self.folder}: exported from another checkpoint than {model_dir} "
                                  f"(manifest {self.manifest.model_sha256[:12]}, model {expected[:12]}); export again")
        self.bindings = {name: GraphBinding(name, spec, self.device) for name, spec in self.manifest.graphs.items()}
        self.runners = {name: self.make_runner(name, spec) for name, spec in self.manifest.graphs.items()}
        self._windows: dict[int, torch.Tensor] = {}
        positions = next(t for t in self.manifest.graphs["decoder_step"].inputs if t.name == "positions")
        self._mrope = len(positions.shape) == 2  # [3, q]: the graph takes M-RoPE positions

    def make_runner(self, name: str, spec: GraphSpec) -> GraphRunner:
        """The object that executes graph ``name``; configuration problems raise ValueError or
        FileNotFoundError, which the node reports and exits on."""
        raise NotImplementedError

    def graph_runner(self) -> EagerRunner:
        """Session step functions run as they are: the engines are the compiled part here."""
        return EagerRunner()

    def check_session(self, capacity: int, max_chunk: int, dtype: torch.dtype) -> None:
        """Refuse a session the export cannot serve (the capacity is baked into every shape)."""
        m = self.manifest
        problems = []
        if capacity != m.capacity:
            problems.append(f"capacity {capacity} != exported {m.capacity}")
        if max_chunk > m.max_chunk:
            problems.append(f"max_chunk {max_chunk} > exported {m.max_chunk}")
        if dtype != m.dtype:
            problems.append(f"dtype {dtype} != exported precision {m.precision}")
        if problems:
            raise ValueError(f"{self.folder}: " + "; ".join(problems)
                             + f" (re-export with infmllm_export --capacity {capacity} --max-chunk {max_chunk})")

    def _run(self, name: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.bindings[name]
        sizes = binding.sizes(values)
        outputs = binding.outputs(sizes)
        self.runners[name].run(binding.inputs(values, sizes), outputs)
        return outputs

    def _window(self, attn_window: int) -> torch.Tensor:
        if attn_window not in self._windows:  # made once per value: no host-to-device copy per step
            self._windows[attn_window] = torch.tensor(attn_window, dtype=torch.int64, device=self.device)
        return self._windows[attn_window]

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, tokens, hidden]``, in slices of at most max_images (one for a
        graph exported for one frame at a time)."""
        spec = self.bindings["vision"].spec
        step = self.manifest.max_images if "n" in spec.dynamic else spec.inputs[0].shape[0]
        pieces = [self._run("vision", {"pixel_values": pixel_values[i:i + step]})["image_features"].clone()
                  for i in range(0, pixel_values.shape[0], step)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # one copy out of the reused buffer

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
             positions: torch.Tensor, attn_window: int = 0, all_logits: bool = False) -> StepOutput:
        if all_logits:
            raise ValueError(f"the {self.name} backend returns the last position's logits only")
        if positions.dim() == 1 and self._mrope:
            positions = positions.expand(3, -1)  # text on an M-RoPE graph: three equal components
        out = self._run("decoder_step", {"embeds": embeds, "positions": positions, "cache_k": cache_k,
                                         "cache_v": cache_v, "valid": valid, "attn_window": self._window(attn_window)})
        # new_k/new_v/attn_mass are reused buffers: the session folds and appends them before the next step
        return StepOutput(logits=out["logits"].clone(), new_k=out["new_k"], new_v=out["new_v"],
                          attn_mass=out["attn_mass"] if attn_window > 0 else None)
