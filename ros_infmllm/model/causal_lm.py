"""A text-only language model (LLaMA / Qwen2 / Mistral decoder): the base every model here shares.

A vision-language model is this plus a vision tower and projector (``LlavaModel``); the session,
the backends and the cache see the same ``decoder``, ``embed_tokens`` and ``forward_full`` either way.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import CausalLMConfig, LlavaConfig
from .decoder import Decoder


class CausalLM(nn.Module):
    """Plain-PyTorch decoder-only model. ``forward_full`` is the no-cache reference; streaming goes
    through ``embed_tokens`` and ``decoder.step``."""

    def __init__(self, cfg: CausalLMConfig | LlavaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg.text)

    @property
    def device(self) -> torch.device:
        return self.decoder.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.norm.weight.dtype

    @property
    def has_vision(self) -> bool:
        return self.cfg.vision is not None

    # A tower whose token count follows the image's size (Qwen2-VL); fixed-size towers say False.
    dynamic_resolution = False

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError("this model is text-only (no vision tower): it cannot encode images")

    def frame_grid(self, pixels: torch.Tensor) -> tuple[int, int] | None:
        """(rows, columns) of visual tokens of a preprocessed frame, for a tower whose positions
        need it (M-RoPE); None: the frame's tokens take plain positions."""
        return None

    def stream_position_offsets(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no M-RoPE: its frames take plain positions")

    def embed_tokens(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """``[T]`` ids -> ``[T, hidden]``."""
        if image_features is not None:
            raise ValueError("this model is text-only (no vision tower): image features cannot be embedded")
        return self.decoder.embed_tokens(input_ids.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     **vision_inputs: torch.Tensor) -> torch.Tensor:
        """Plain causal forward, no cache: ``input_ids[1, T]`` -> ``logits[1, T, vocab]``.
        ``vision_inputs``: the layout's extra image inputs, by transformers' names
        (``pixel_attention_mask`` for Idefics3)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
        ids = input_ids[0].to(self.device)
        features = self.encode_images(pixel_values, **vision_inputs) if pixel_values is not None else None
        return self.forward_embeds(self.embed_tokens(ids, features), torch.arange(ids.shape[0], device=self.device))

    def forward_embeds(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``embeds[T, hidden]`` at ``positions`` (``[T]``, or ``[3, T]`` for M-RoPE), no cache ->
        ``logits[1, T, vocab]``."""
        cache_k, cache_v = self.decoder.empty_cache(0)
        valid = torch.zeros(0, dtype=torch.bool, device=self.device)
        return self.decoder.step(embeds, cache_k, cache_v, valid, positions, all_logits=True).logits.unsqueeze(0)
