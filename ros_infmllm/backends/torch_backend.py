"""The PyTorch backend: runs the step contract with the model's own modules (CPU or CUDA).

On CUDA the session's whole per-chunk work is captured into CUDA graphs by the runner this
backend hands out (``graph_runner``; see graph_runner.py), the vision encoder too, per batch
shape. The cache buffers never move and every shape but q is fixed by the capacity, so one graph
per chunk kind serves the whole stream. The decode step's blocks are compiled by torch.compile
first: decode reads every weight once per token, so it is bound by memory and, once the weights
stream fast enough, by kernel count; compiling fuses each block's element-wise work (norms,
rotary, mask) into a few kernels, compiled once and used by every layer; its attention runs as
two Triton launches (``Decoder.use_decode_kernel``, model/decode_attention.py); the q/k/v and
gate/up projections are fused into one matrix each (``Decoder.fuse_projections``). Prefill blocks
(frame and question chunks) and the vision encoder are compiled too: a frame's chunk is otherwise
dozens of uncompiled element-wise kernels per layer (norms, rotary, masks).
"""
from __future__ import annotations

import torch

from ..cache.kv_codes import Int8Rows
from ..model.decoder import StepOutput, run_block
from ..model.llava import LlavaModel
from ..model.staged_drop import StagedDrop
from .graph_runner import CudaGraphRunner, EagerRunner


class TorchBackend:
    """PyTorch execution of the vision encoder and the decoder step (CUDA graphs on CUDA)."""

    name = "torch"

    def __init__(self, model: LlavaModel, cuda_graphs: bool = True, compile_decode: bool = True,
                 compile_prefill: bool = True, compile_vision: bool = True, decode_kernel: bool = True,
                 max_graphs: int = 16) -> None:
        self.model = model
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.decode_kernel = False
        if model.device.type == "cuda":  # float or packed (int8 / int4) projections alike
            model.decoder.fuse_projections()  # fewer, larger weight reads per decode token
            self.decode_kernel = model.decoder.use_decode_kernel(decode_kernel)
        self.max_graphs = max_graphs
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # split_reductions off: a decode row (one query's scores over the capacity) is reduced by one
        # program, so the softmax is one or two kernels rather than five small ones
        self._decode_block = (torch.compile(run_block, dynamic=False, options={"split_reductions": False})
                              if compile_decode and self.cuda_graphs else run_block)
        # chunk lengths vary (frames, questions, prompts): one compile with the length symbolic
        self._prefill_block = (torch.compile(run_prefill_block, dynamic=True)
                               if compile_prefill and self.cuda_graphs else run_prefill_block)
        self._encode_images = (torch.compile(model.encode_images, dynamic=False)
                               if compile_vision and self.cuda_graphs else model.encode_images)
        self.vision_runner = self.graph_runner()

    def graph_runner(self) -> CudaGraphRunner | EagerRunner:
        """What runs a session's step functions: captured and replayed on CUDA, called elsewhere.
        Each session takes its own (its graphs hold its cache); all share one memory pool."""
        if not self.cuda_graphs:
            return EagerRunner()
        return CudaGraphRunner(self.model.device, self._pool, max_graphs=self.max_graphs)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, tokens, hidden]`` (a CUDA graph per batch shape on CUDA)."""
        pixel_values = pixel_values.to(self.model.device, self.model.dtype)
        features = self.vision_runner(("vision", tuple(pixel_values.shape)), self._encode_images, (pixel_values,))
        return features.clone() if self.cuda_graphs else features  # a graph's output is overwritten by its next replay

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
             positions: torch.Tensor, attn_window: int = 0, all_logits: bool = False,
             drop: StagedDrop | None = None, int8_cache: Int8Rows | None = None
             ) -> StepOutput:
        block_fn = self._decode_block if embeds.shape[0] == 1 and not all_logits else self._prefill_block
        return self.model.decoder.step(embeds, cache_k, cache_v, valid, positions, attn_window, all_logits,
                                       block_fn=block_fn, drop=drop, int8_cache=int8_cache)


def run_prefill_block(block, *args):
    """``run_block`` under its own code object: torch.compile caches compiled code per code object,
    so the prefill compile (symbolic length) and the decode compile (one token) stay apart."""
    return block(*args)
