"""The PyTorch backend: runs the step contract with the model's own modules (CPU or CUDA)."""
from __future__ import annotations

import torch

from ..model.decoder import StepOutput
from ..model.llava import LlavaModel


class TorchBackend:
    """Eager PyTorch execution of the vision encoder and the decoder step."""

    name = "torch"

    def __init__(self, model: LlavaModel) -> None:
        self.model = model

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, tokens, hidden]``."""
        return self.model.encode_images(pixel_values)

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
             positions: torch.Tensor, attn_window: int = 0, all_logits: bool = False) -> StepOutput:
        return self.model.decoder.step(embeds, cache_k, cache_v, valid, positions, attn_window, all_logits)
