"""Vision tower (CLIP or SigLIP ViT) and the LLaVA projector: pixels -> visual tokens.

Module and parameter names follow the Hugging Face checkpoints so that loading is a prefix map.
Only the hidden states LLaVA selects are computed: layers after the deepest selected one are
skipped (their output is never used), which saves time on every frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlavaConfig, VisionConfig
from .layers import activation


class VisionEmbeddings(nn.Module):
    """Patchify + position embedding (+ CLS token for CLIP)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.has_class_token = cfg.has_class_token
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=not cfg.has_class_token)
        positions = cfg.num_patches + (1 if cfg.has_class_token else 0)
        if cfg.has_class_token:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        tokens = patches.flatten(2).transpose(1, 2)
        if self.has_class_token:
            cls = self.class_embedding.expand(tokens.shape[0], 1, -1)
            tokens = torch.cat((cls, tokens), dim=1)
        return tokens + self.position_embedding.weight.unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: optional ``[batch, 1, 1, tokens]`` bool, False for padding patches no query attends."""
        batch, tokens, width = x.shape
        shape = (batch, tokens, self.num_heads, width // self.num_heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class VisionMLP(nn.Module):
    """fc1, activation, fc2 (CLIP, SigLIP, Qwen2-VL's tower)."""

    def __init__(self, width: int, hidden_width: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width)
        self.fc2 = nn.Linear(hidden_width, width)
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    """The ViT trunk. ``hidden_states(pixels, wanted)`` returns the states LLaVA selects, where
    state 0 is the embedding output (after CLIP's pre-layernorm) and state i the output of layer i."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.has_class_token:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg)

    def hidden_states(self, pixel_values: torch.Tensor, wanted: tuple[int, ...]) -> list[torch.Tensor]:
        count = self.cfg.num_layers + 1
        indices = [w % count for w in wanted]
        x = self.embeddings(pixel_values)
        if self.cfg.has_class_token:
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[: max(indices)], start=1):
            x = layer(x)
            states[i] = x
        return [states[i] for i in indices]


class Projector(nn.Module):
    """LLaVA's two-layer MLP from vision width (times selected layers) to decoder width."""

    def __init__(self, cfg: LlavaConfig) -> None:
        super().__init__()
        in_width = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
        self.linear_1 = nn.Linear(in_width, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.act = activation(cfg.projector_hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def select_features(states: list[torch.Tensor], strategy: str) -> torch.Tensor:
    """LLaVA feature selection: 'default' drops the first token of every selected state."""
    if strategy == "default":
        states = [s[:, 1:] for s in states]
    return torch.cat(states, dim=-1)
