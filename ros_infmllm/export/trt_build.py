"""Build TensorRT plans (``.engine``) from the exported ONNX graphs.

Works with full TensorRT (``tensorrt``: JetPack, desktop) and TensorRT-RTX (``tensorrt_rtx``)
through the API they share. Networks are strongly typed where the module supports it, so the
engine runs in the precision the ONNX graph was exported in; older TensorRT without strong
typing gets the FP16/BF16 builder flags instead. One optimization profile per graph covers
q in [1, max_chunk] (n in [1, max_images]), tuned for q = 1, the decode step.
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

from .manifest import GraphSpec, Manifest

MODULES = ("tensorrt", "tensorrt_rtx")


class EngineBuildError(RuntimeError):
    """Parsing or building failed; the message lists what TensorRT rejected."""


def tensorrt_module(prefer: str | None = None) -> ModuleType | None:
    """The importable TensorRT module (full TensorRT first), or None."""
    for name in ((prefer,) if prefer else MODULES):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def module_label(trt: ModuleType) -> str:
    return f"{trt.__name__} {trt.__version__}"


def _progress_monitor(trt: ModuleType, max_depth: int = 1):
    """A progress display: one line per build phase (the top two levels) with its steps and time."""

    class PhaseLog(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}
            self.depth: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.depth[phase_name] = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self.started[phase_name] = time.monotonic()
            if self.depth[phase_name] <= max_depth:
                print(f"{'  ' * self.depth[phase_name]}{phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            seconds = time.monotonic() - self.started.pop(phase_name, time.monotonic())
            depth = self.depth.pop(phase_name, 0)
            if depth <= max_depth:
                print(f"{'  ' * depth}{phase_name} done in {seconds:.1f} s", file=sys.stderr, flush=True)

    return PhaseLog()


def parser_errors(parser) -> list[str]:
    """Each parser error with the ONNX node and operator it concerns."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = error.node_name() if hasattr(error, "node_name") else error.node()
        operator = error.node_operator() if hasattr(error, "node_operator") else "?"
        lines.append(f"node {node!r} (op {operator}): {error.desc()}")
    return lines


def build_engine(trt: ModuleType, onnx_path: Path, engine_path: Path, spec: GraphSpec, precision: str,
                 compute_capabilities: list[str] | None = None, progress: bool = True) -> Path:
    """Parse ``onnx_path``, build a plan with one optimization profile and write it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"{onnx_path}: TensorRT ({module_label(trt)}) cannot parse these nodes:\n  "
                               + "\n  ".join(parser_errors(parser)))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for tensor in spec.inputs:
        if any(isinstance(d, str) for d in tensor.shape):
            low = {s: bounds[0] for s, bounds in spec.dynamic.items()}
            high = {s: bounds[1] for s, bounds in spec.dynamic.items()}
            profile.set_shape(tensor.name, tensor.resolve(low), tensor.resolve(low), tensor.resolve(high))
    config.add_optimization_profile(profile)
    if not strongly_typed and precision in ("fp16", "bf16"):
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
    if compute_capabilities:
        if not hasattr(config, "set_compute_capability"):
            raise EngineBuildError(f"{module_label(trt)} builds for the GPU it runs on; --compute-capability "
                                   "is a TensorRT-RTX option")
        config.num_compute_capabilities = len(compute_capabilities)
        for i, name in enumerate(compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, name.upper()), i)
    if progress and hasattr(config, "progress_monitor"):
        config.progress_monitor = _progress_monitor(trt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_path}: {module_label(trt)} could not build an engine (see its log above)")
    engine_path.write_bytes(bytes(plan))
    return engine_path


def build_engines(folder: str | Path, module: str | None = None, compute_capabilities: list[str] | None = None,
                  progress: bool = True) -> Manifest:
    """Build an engine for every graph in an export folder and record them in its manifest."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    trt = tensorrt_module(module)
    if trt is None:
        raise EngineBuildError(f"no TensorRT Python module importable (tried {', '.join((module,) if module else MODULES)})")
    for name, spec in manifest.graphs.items():
        engine = folder / spec.onnx.replace(".onnx", ".engine")
        started = time.monotonic()
        build_engine(trt, folder / spec.onnx, engine, spec, manifest.precision, compute_capabilities, progress)
        print(f"{engine.name}: {engine.stat().st_size / 1e6:.1f} MB in {time.monotonic() - started:.0f} s "
              f"({module_label(trt)})", file=sys.stderr, flush=True)
        spec.engine = engine.name
    manifest.tools["engine_builder"] = module_label(trt)
    manifest.tools["engine_compute_capabilities"] = ",".join(compute_capabilities or ["builder default"])
    manifest.save(folder)
    return manifest
