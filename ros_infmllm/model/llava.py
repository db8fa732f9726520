"""The LLaVA-layout vision-language model: vision tower + projector + decoder."""
from __future__ import annotations

import torch
from torch import nn

from .config import LlavaConfig
from .decoder import Decoder
from .vision import Projector, VisionTower, select_features


class LlavaModel(nn.Module):
    """Plain-PyTorch LLaVA. ``forward_full`` is the no-cache reference; streaming goes through
    ``encode_images`` / ``embed_tokens`` and ``decoder.step``."""

    def __init__(self, cfg: LlavaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.projector = Projector(cfg)
        self.decoder = Decoder(cfg.text)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` normalised pixels -> ``[N, num_image_tokens, hidden]`` visual tokens."""
        states = self.vision_tower.hidden_states(pixel_values.to(self.device, self.dtype),
                                                 self.cfg.vision_feature_layers)
        return self.projector(select_features(states, self.cfg.vision_feature_select_strategy))

    def embed_tokens(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """``[T]`` ids -> ``[T, hidden]``; image placeholder ids take the image features in order.

        Placeholders are counted where the ids are (the CPU, in a session), so a GPU decode step
        does not wait for this check."""
        placeholders = int((input_ids == self.cfg.image_token_index).sum())
        input_ids = input_ids.to(self.device, non_blocking=True)
        is_image = input_ids == self.cfg.image_token_index
        embeds = self.decoder.embed_tokens(input_ids.masked_fill(is_image, 0))
        supplied = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if placeholders != supplied:
            raise ValueError(f"{placeholders} image placeholder tokens but {supplied} image features")
        if placeholders:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_features.reshape(-1, embeds.shape[-1]))
        return embeds

    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Plain causal forward, no cache: ``input_ids[1, T]`` -> ``logits[1, T, vocab]``."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
        ids = input_ids[0].to(self.device)
        features = self.encode_images(pixel_values) if pixel_values is not None else None
        embeds = self.embed_tokens(ids, features)
        cache_k, cache_v = self.decoder.empty_cache(0)
        valid = torch.zeros(0, dtype=torch.bool, device=self.device)
        positions = torch.arange(ids.shape[0], device=self.device)
        return self.decoder.step(embeds, cache_k, cache_v, valid, positions, all_logits=True).logits.unsqueeze(0)
