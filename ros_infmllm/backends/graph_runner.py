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
timer reading the allocator) do not invalidate it. It runs under torch.compile's
``fail_on_recompile`` stance: a compiled block whose guards fail would otherwise compile inside
the capture, and Inductor's benchmarking there (random inputs, host syncs) breaks it; now it
fails at once with the guard that failed, and the key's next calls run eagerly (compiling there)
before a retry.

A failed capture leaves process state behind that would break every later capture, and even
eager random numbers: the thread's current stream stays the capture stream, the allocator keeps
the pool "recording" (so the next capture into it fails with "already recording to mempool_id")
and the CUDA generator stays in capture mode ("Offset increment outside graph capture"). The
runner undoes all three (``_abandon_capture``), moves later captures to a fresh pool, runs that
call eagerly and keeps the reason in ``capture_error`` (and each key's first reason in
``capture_errors``): slower, never broken. Only that key is given up (after one retry, for a
cause that passes); the other keys are still captured, so one odd chunk size does not leave
decode eager. After ``max_failures`` failures in all the runner stops capturing (``CaptureBook``).
"""
from __future__ import annotations

import contextlib
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


class CaptureBook:
    """Which calls to capture: a key after ``warmups`` eager calls, at most ``max_graphs`` graphs,
    a key that failed to capture retried ``retries`` times and then run eagerly, and no capture at
    all after ``max_failures`` failures. Pure bookkeeping, so it is tested without a GPU."""

    def __init__(self, warmups: int = 2, max_graphs: int = 16, retries: int = 1, max_failures: int = 4) -> None:
        self.warmups, self.max_graphs, self.retries, self.max_failures = warmups, max_graphs, retries, max_failures
        self.calls: dict[Hashable, int] = {}
        self.failures: dict[Hashable, int] = {}
        self.error: str | None = None  # the latest failure's reason
        self.capture_after: dict[Hashable, int] = {}  # a failed key: calls it needs before its retry
        self.first_errors: dict[Hashable, str] = {}  # each failed key's first reason (later ones can be echoes)

    def should_capture(self, key: Hashable, captured: int, capture: bool = True) -> bool:
        """Count this call of ``key`` (not yet captured; ``captured`` graphs exist) and say whether
        to capture it now."""
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        return capture and calls > self.capture_after.get(key, self.warmups) and self.may_capture(key, captured)

    def may_capture(self, key: Hashable, captured: int) -> bool:
        """Whether ``key`` can still be captured, now or after more calls (``captured`` graphs exist).
        Graphs are never dropped and failures never forgotten, so once False it stays False."""
        return (captured < self.max_graphs and self.failures.get(key, 0) <= self.retries
                and sum(self.failures.values()) < self.max_failures)

    def failed(self, key: Hashable, exc: Exception, cleanup: str = "") -> None:
        """Book a failed capture of ``key``; its next ``warmups`` calls run eagerly before a retry,
        so what the capture tripped on (a recompilation, a lazy initialisation) happens outside it."""
        self.failures[key] = self.failures.get(key, 0) + 1
        self.capture_after[key] = self.calls.get(key, 0) + self.warmups
        self.first_errors.setdefault(key, f"{type(exc).__name__}: {exc}"[:600] + (f" [{cleanup}]" if cleanup else ""))
        given_up = self.failures[key] > self.retries or sum(self.failures.values()) >= self.max_failures
        self.error = (f"capture of {key!r} failed ({type(exc).__name__}: {exc}); "
                      f"{'it runs eagerly' if given_up else self._retry_when()}"
                      f"{', and so does every step not yet captured' if sum(self.failures.values()) >= self.max_failures else ''}")

    def _retry_when(self) -> str:
        return f"retried after {self.warmups} eager calls" if self.warmups else "retried at its next call"


def _no_recompiles() -> contextlib.AbstractContextManager:
    """torch.compile's ``fail_on_recompile`` stance (torch >= 2.6); older builds, such as some
    JetPack wheels, capture without it (a recompilation then breaks the capture, and the runner
    recovers as from any failed capture)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("fail_on_recompile") if set_stance is not None else contextlib.nullcontext()


class CudaGraphRunner:
    """Captures a function per key at its ``warmups + 1``-th call and replays it after that."""

    def __init__(self, device: torch.device, pool: Any = None, warmups: int = 2, max_graphs: int = 16) -> None:
        self.device = device
        self.book = CaptureBook(warmups, max_graphs)
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: dict[Hashable, CapturedFunction] = {}
        self._side = torch.cuda.Stream(device=device)

    @property
    def capture_error(self) -> str | None:
        """Why the latest failed capture failed, and what runs eagerly since; None if none did."""
        return self.book.error

    @property
    def capture_errors(self) -> dict[Hashable, str]:
        """Each key that failed to capture, with its first reason and what the clean-up found."""
        return self.book.first_errors

    def __call__(self, key: Hashable, fn: StepFunction, inputs: tuple[torch.Tensor, ...],
                 capture: bool = True) -> Any:
        """``fn(*inputs)``; ``capture=False`` always runs it eagerly (sizes that seldom recur)."""
        captured = self.graphs.get(key)
        if captured is None:
            if not self.book.should_capture(key, len(self.graphs), capture):
                # warm-up calls of a key still to be captured take copies like the capture's (see
                # _as_captured); a key given up takes its inputs as they are
                warming = capture and self.book.may_capture(key, len(self.graphs))
                return self._eager(fn, self._as_captured(inputs) if warming else inputs)
            stream = torch.cuda.current_stream(self.device)
            try:
                captured = self._capture(fn, inputs)
            except Exception as exc:  # noqa: BLE001 - any failed capture: run eagerly from now on
                self._abandon_capture(key, exc, stream)
                return self._eager(fn, inputs)
            self.graphs[key] = captured
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value, non_blocking=True)
        captured.graph.replay()
        return captured.outputs

    def _as_captured(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Fresh device copies, as capture makes its static inputs: the warm-up calls then compile
        for what the capture will pass (storage offset 0, not a chunk's offset into its frame; an
        inference tensor inside inference mode), so no guard fails, and nothing recompiles, in it."""
        return tuple(value.to(self.device).clone() for value in inputs)

    def _eager(self, fn: StepFunction, inputs: tuple[torch.Tensor, ...]) -> Any:
        """On a side stream, as capture will be: cuBLAS workspaces and the like are per stream."""
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            result = fn(*inputs)
        current.wait_stream(self._side)
        return result

    def _capture(self, fn: StepFunction, inputs: tuple[torch.Tensor, ...]) -> CapturedFunction:
        static = self._as_captured(inputs)
        torch.cuda.current_stream(self.device).synchronize()  # capture starts from a quiet device
        graph = torch.cuda.CUDAGraph()
        with _no_recompiles():
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = fn(*static)
        return CapturedFunction(graph, static, outputs)

    def _abandon_capture(self, key: Hashable, exc: Exception, stream: torch.cuda.Stream) -> None:
        """After a failed capture: undo what it left behind (module docstring), book the failure."""
        index = torch.device(self.device).index
        index = torch.cuda.current_device() if index is None else index
        notes = []
        torch.cuda.set_stream(stream)  # a raising capture_end skips torch.cuda.graph's stream restore
        try:  # private, and the only way to end a pool's recording that capture_end did not end
            torch._C._cuda_endAllocateToPool(index, self.pool)
            notes.append("pool recording ended here")
        except Exception as end_exc:  # noqa: BLE001 - capture_end got that far, or no such hook
            notes.append(f"pool: {str(end_exc).splitlines()[0][:80]}")
        self.pool = torch.cuda.graph_pool_handle()  # later captures never meet a half-closed pool
        generator = torch.cuda.default_generators[index]
        try:
            torch.empty(1, device=self.device).normal_()
        except RuntimeError:  # still in capture mode: a fresh copy of its state (seed, offset) is not
            if hasattr(generator, "clone_state"):  # torch >= 2.4
                generator.graphsafe_set_state(generator.clone_state())
                notes.append("CUDA generator taken out of capture mode")
            else:
                notes.append("CUDA generator left in capture mode (this torch cannot reset it)")
        torch.cuda.synchronize(self.device)
        self.book.failed(key, exc, "; ".join(notes))
