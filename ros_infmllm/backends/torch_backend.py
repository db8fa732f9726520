"""The PyTorch backend: runs the step contract with the model's own modules (CPU or CUDA).

On CUDA the decoder step (and the vision encoder, per batch shape) is captured into CUDA
graphs and replayed, the decode step's blocks compiled by torch.compile first: the cache buffers never
move and every shape but q is fixed by the capacity, so one graph per (q, attention window)
serves the whole stream. q = 1 (decode) is captured at first use; a prefill chunk size once it
recurs (frames are tokenised the same way every time, so their chunk sizes do), up to
``max_graphs``; other sizes run eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.decoder import StepOutput, run_block
from ..model.llava import LlavaModel


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    embeds: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    cache_ptrs: tuple[int, int]
    output: StepOutput


class TorchBackend:
    """Eager PyTorch execution of the vision encoder and the decoder step (CUDA graphs on CUDA)."""

    name = "torch"

    def __init__(self, model: LlavaModel, cuda_graphs: bool = True, compile_decode: bool = True,
                 max_graphs: int = 16) -> None:
        self.model = model
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, int], CapturedStep] = {}
        self._seen: dict[tuple[int, int], int] = {}
        self._pool = None
        # Decode (q = 1) reads every weight once per token: it is bound by memory, and by kernel
        # count once the weights are fast enough. torch.compile fuses each block's element-wise
        # work (norms, rotary, mask, softmax) into a few kernels; compiled once, used by every layer.
        self._decode_block = torch.compile(run_block, dynamic=False) if compile_decode and self.cuda_graphs else run_block
        self._vision: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, tokens, hidden]`` (a CUDA graph per batch shape on CUDA)."""
        if not self.cuda_graphs:
            return self.model.encode_images(pixel_values)
        pixel_values = pixel_values.to(self.model.device, self.model.dtype)
        key = tuple(pixel_values.shape)
        if key not in self._vision:
            static = pixel_values.clone()
            self._warm_up(lambda: self.model.encode_images(static))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool()):
                output = self.model.encode_images(static)
            self._vision[key] = (graph, static, output)
        graph, static, output = self._vision[key]
        static.copy_(pixel_values)
        graph.replay()
        return output.clone()

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
             positions: torch.Tensor, attn_window: int = 0, all_logits: bool = False) -> StepOutput:
        if not self.cuda_graphs or all_logits:
            return self.model.decoder.step(embeds, cache_k, cache_v, valid, positions, attn_window, all_logits)
        key = (embeds.shape[0], attn_window)
        captured = self.graphs.get(key)
        if captured is not None and captured.cache_ptrs != (cache_k.data_ptr(), cache_v.data_ptr()):
            captured = None  # another cache (a new session on this backend): capture again
        if captured is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if (key[0] > 1 and self._seen[key] < 2) or len(self.graphs) >= self.max_graphs:
                return self.model.decoder.step(embeds, cache_k, cache_v, valid, positions, attn_window)
            captured = self.graphs[key] = self._capture(embeds, cache_k, cache_v, valid, positions, attn_window)
        captured.embeds.copy_(embeds)
        captured.positions.copy_(positions)
        captured.valid.copy_(valid)
        captured.graph.replay()
        out = captured.output  # static buffers: the session folds and appends them before the next step
        return StepOutput(out.logits.clone(), out.new_k, out.new_v, out.attn_mass)

    def _capture(self, embeds: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
                 positions: torch.Tensor, attn_window: int) -> CapturedStep:
        static = (embeds.clone(), positions.clone(), valid.clone())
        block_fn = self._decode_block if embeds.shape[0] == 1 else run_block

        def run() -> StepOutput:
            return self.model.decoder.step(static[0], cache_k, cache_v, static[2], static[1], attn_window,
                                           block_fn=block_fn)

        self._warm_up(run)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool()):
            output = run()
        return CapturedStep(graph, *static, (cache_k.data_ptr(), cache_v.data_ptr()), output)

    def _graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _warm_up(self, run) -> None:
        """Run twice on a side stream before capture (allocator, kernel selection, compilation)."""
        device = self.model.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
