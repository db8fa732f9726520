"""The LLaVA-layout vision-language model: vision tower + projector + decoder."""
from __future__ import annotations

import torch

from .causal_lm import CausalLM
from .config import LlavaConfig
from .vision import Projector, VisionTower, select_features


class LlavaModel(CausalLM):
    """Plain-PyTorch LLaVA: a ``CausalLM`` whose image placeholder ids take visual tokens."""

    def __init__(self, cfg: LlavaConfig) -> None:
        super().__init__(cfg)
        self.vision_tower = VisionTower(cfg.vision)
        self.projector = Projector(cfg)

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
