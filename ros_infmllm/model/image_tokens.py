"""What every vision-language layout shares: image placeholder ids in the prompt take the visual
tokens its ``encode_images`` makes, in order (LLaVA, Idefics3)."""
from __future__ import annotations

import torch

from .causal_lm import CausalLM


class ImageTokensModel(CausalLM):
    """A ``CausalLM`` whose ``cfg.image_token_index`` ids are replaced by visual tokens."""

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
