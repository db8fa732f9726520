"""The LLaVA-layout vision-language model: vision tower + projector + decoder."""
from __future__ import annotations

import torch

from .config import LlavaConfig
from .image_tokens import ImageTokensModel
from .vision import Projector, VisionTower, select_features


class LlavaModel(ImageTokensModel):
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
