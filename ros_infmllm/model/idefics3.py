"""The Idefics3 layout (SmolVLM, SmolVLM2): SigLIP tower + pixel-shuffle connector + LLaMA decoder.

For streaming, every frame is one global image at the tower's full size (no image splitting):
``image_size / patch_size`` squared patches, shuffled into ``num_image_tokens`` visual tokens.
``forward_full`` also takes transformers' batched form (``[1, images, 3, H, W]``, all-zero padding
images dropped) and a ``pixel_attention_mask`` for padded images, so parity checks feed both
implementations the same tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import Idefics3Config, VisionConfig
from .image_tokens import ImageTokensModel
from .vision import VisionEncoder


def grid_position_ids(rows: torch.Tensor | int, cols: torch.Tensor | int, max_rows: int, max_cols: int, side: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids ``[max_rows * max_cols]`` of an image whose real patches fill ``rows`` x ``cols``
    of a padded grid: each real patch takes the learned position at the same fraction of the
    ``side`` x ``side`` table (NaViT-style, as Idefics3 resizes images of any shape); padding
    patches take position 0."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    fraction_h = (torch.arange(max_rows, device=device, dtype=torch.float32) * (1.0 / rows)).clamp(max=1.0 - 1e-6)
    fraction_w = (torch.arange(max_cols, device=device, dtype=torch.float32) * (1.0 / cols)).clamp(max=1.0 - 1e-6)
    ids = (torch.bucketize(fraction_h, boundaries, right=True)[:, None] * side
           + torch.bucketize(fraction_w, boundaries, right=True)[None, :])
    real = (torch.arange(max_rows, device=device)[:, None] < rows) & (torch.arange(max_cols, device=device)[None, :] < cols)
    return torch.where(real, ids, torch.zeros_like(ids)).flatten()


class Idefics3Embeddings(nn.Module):
    """Patchify (conv with bias) + learned positions looked up by ``grid_position_ids``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.side = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(self.side ** 2, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``patch_mask``: ``[N, rows, cols]`` real patches of padded images; None: every patch is real."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        tokens = patches.flatten(2).transpose(1, 2)
        rows, cols = patches.shape[2:]
        device = tokens.device
        if patch_mask is None:  # no host sync here: a frame's encoding is captured in a CUDA graph
            if (rows, cols) == (self.side, self.side):
                return tokens + self.position_embedding.weight.unsqueeze(0)  # a full frame: positions in order
            return tokens + self.position_embedding(grid_position_ids(rows, cols, rows, cols, self.side, device))
        ids = torch.stack([grid_position_ids(m[:, 0].sum(), m[0, :].sum(), rows, cols, self.side, device)
                           for m in patch_mask])
        return tokens + self.position_embedding(ids)


class Idefics3VisionTower(nn.Module):
    """SigLIP trunk with Idefics3's embeddings and the final layernorm (which LLaVA skips)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Idefics3Embeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(pixel_values, patch_mask)
        mask = None if patch_mask is None else patch_mask.flatten(1)[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


class ModalityProjection(nn.Module):
    """One bias-free linear layer (named as in the checkpoint: ``modality_projection.proj``)."""

    def __init__(self, cfg: Idefics3Config) -> None:
        super().__init__()
        width = cfg.vision.hidden_size * cfg.scale_factor ** 2
        self.proj = nn.Linear(width, cfg.text.hidden_size, bias=False)


class PixelShuffleConnector(nn.Module):
    """Each ``s`` x ``s`` block of patch states becomes one token (their states side by side,
    row by row), then one linear layer maps it to the decoder's width."""

    def __init__(self, cfg: Idefics3Config) -> None:
        super().__init__()
        self.scale = cfg.scale_factor
        self.modality_projection = ModalityProjection(cfg)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        images, tokens, width = states.shape
        side, s = int(round(tokens ** 0.5)), self.scale
        if side * side != tokens or side % s:
            raise ValueError(f"pixel shuffle needs a square patch grid divisible by {s}, got {tokens} patches")
        blocks = states.view(images, side // s, s, side // s, s, width).permute(0, 1, 3, 2, 4, 5)
        # within a block: rows of s patches, each row's states side by side (transformers' order)
        shuffled = blocks.reshape(images, (side // s) ** 2, s * s * width)
        return self.modality_projection.proj(shuffled)


class Idefics3Model(ImageTokensModel):
    """Plain-PyTorch SmolVLM: a ``CausalLM`` whose image placeholders take pixel-shuffled SigLIP states."""

    def __init__(self, cfg: Idefics3Config) -> None:
        super().__init__(cfg)
        self.vision_tower = Idefics3VisionTower(cfg.vision)
        self.connector = PixelShuffleConnector(cfg)

    def encode_images(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, 3, H, W]`` normalised pixels -> ``[N, tokens, hidden]`` (a session's frames: no host
        sync, so CUDA graphs can hold it). transformers' form ``[B, N, 3, H, W]``, with or without
        ``pixel_attention_mask``, is taken too: all-zero (padding) images are dropped and padded
        regions masked, as transformers does."""
        pixels = pixel_values.to(self.device, self.dtype)
        if pixels.dim() == 4 and pixel_attention_mask is None:
            return self.connector(self.vision_tower(pixels))
        if pixels.dim() == 5:
            pixels = pixels.flatten(0, 1)
            if pixel_attention_mask is not None:
                pixel_attention_mask = pixel_attention_mask.flatten(0, 1)
        real = (pixels != 0).flatten(1).any(-1)
        pixels = pixels[real]
        patch = self.cfg.vision.patch_size
        if pixel_attention_mask is None:
            grid = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool, device=self.device)
        else:
            grid = pixel_attention_mask.to(self.device).bool()[real]
        patch_mask = grid.unfold(1, patch, patch).unfold(2, patch, patch).flatten(-2).any(-1)  # any pixel real
        return self.connector(self.vision_tower(pixels, patch_mask))
