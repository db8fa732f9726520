"""Running a step function eagerly, or captured once into a CUDA graph and replayed.

A session's per-chunk work (embedding, decoder step, folding the attention mass, the policy's
update, the cache write) reads all of its varying state from device tensors: the cache length,
the stream index, the policy's ring position. So once captured, replaying the graph does the
whole step with one launch, and the host only keeps its own counters. The first ``warmups``
calls of a key run eagerly on a side stream and do the real work (they also trigger compilation
and lazy initialisation, which must not happen during capture); the next call captures the
function and replays it. A captured function must not change host state (the capture runs its
Python once; replays run none of it) and its inputs must keep their shapes.

Graphs of one runner share a memory pool: safe because every caller consumes a graph's outputs
(logits, visual tokens) before the next replay of any graph of that pool.

Capture is thread-local: CUDA calls other threads make meanwhile (a ROS callback, a diagnostics
timer reading the allocator) do not invalidate it. If a capture fails all the same, the runner
ends the pool's capture allocation (which a failed ``cudaStreamEndCapture`` leaves open, so that
every later capture into the pool would fail too), stops capturing, runs that call and every
later uncaptured key eagerly, and keeps the reason in ``capture_error``: slower, never broken.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

StepFunction = Callable[..., Any]


class EagerRunner:
    """Calls the function: the CPU, the exported backends, or CUDA with graphs turned off."""

    def __init__(self) -> None:
        self.graphs: dict = {}
        self.capture_error: str | None = None  # never captures, so never fails to

    def __call__(self, key: Hashable, fn: StepFunction, inputs: tuple[torch.Tensor, ...],
                 capture: bool = True) -> Any:
        return fn(*inputs)


@dataclass
class CapturedFunction:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: Any


class CudaGraphRunner:
    """Captures a function per key at its ``warmups + 1``-th call and replays it after that."""

    def __init__(self, device: torch.device, pool: Any = None, warmups: int = 2, max_graphs: int = 16) -> None:
        self.device, self.warmups, self.max_graphs = device, warmups, max_graphs
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: dict[Hashable, CapturedFunction] = {}
        self.calls: dict[Hashable, int] = {}
        self.capture_error: str | None = None  # why capture stopped, if it did
        self._side = torch.cuda.Stream(device=device)

    def __call__(self, key: Hashable, fn: StepFunction, inputs: tuple[torch.Tensor, ...],
                 capture: bool = True) -> Any:
        """``fn(*inputs)``; ``capture=False`` always runs it eagerly (sizes that seldom recur)."""
        captured = self.graphs.get(key)
        if captured is None:
            calls = self.calls[key] = self.calls.get(key, 0) + 1
            if (not capture or calls <= self.warmups or len(self.graphs) >= self.max_graphs
                    or self.capture_error is not None):
                return self._eager(fn, inputs)
            try:
                captured = self._capture(fn, inputs)
            except Exception as exc:  # noqa: BLE001 - any failed capture: run eagerly from now on
                self._abandon_capture(key, exc)
                return self._eager(fn, inputs)
            self.graphs[key] = captured
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value, non_blocking=True)
        captured.graph.replay()
        return captured.outputs

    def _eager(self, fn: StepFunction, inputs: tuple[torch.Tensor, ...]) -> Any:
        """On a side stream, as capture will be: cuBLAS workspaces and the like are per stream."""
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            result = fn(*inputs)
        current.wait_stream(self._side)
        return result

    def _capture(self, fn: StepFunction, inputs: tuple[torch.Tensor, ...]) -> CapturedFunction:
        static = tuple(value.to(self.device).clone() for value in inputs)
        torch.cuda.current_stream(self.device).synchronize()  # capture starts from a quiet device
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = fn(*static)
        return CapturedFunction(graph, static, outputs)

    def _abandon_capture(self, key: Hashable, exc: Exception) -> None:
        """After a failed capture: close the pool's capture allocation and stop capturing."""
        self.capture_error = f"capture of {key!r} failed ({type(exc).__name__}: {exc}); running eagerly"
        try:
            index = torch.device(self.device).index
            torch._C._cuda_endAllocateToPool(torch.cuda.current_device() if index is None else index, self.pool)
        except Exception:  # noqa: BLE001 - already closed (capture_end got that far), or no such hook
            pass
        torch.cuda.synchronize(self.device)
