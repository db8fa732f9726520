"""LLaMA / Qwen2 / Mistral decoder with the one step contract of DESIGN.md.

``Decoder.step`` takes the embeddings of q new tokens, their (cache-relative) positions and the
cache's K/V buffers at full capacity with a validity mask, and returns logits, the new tokens'
K/V per layer and, when asked, the attention mass that the last queries paid to every slot.
The cache buffers are read, never written: the caller appends the new K/V, so one step can be
replayed, exported or captured with static shapes (everything is fixed but q).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..rope import Rotary
from .config import TextConfig
from .layers import RMSNorm, activation


@dataclass
class StepOutput:
    """What one decoder step returns.

    logits: ``[q, vocab]`` (all positions) or ``[1, vocab]`` (last position only).
    new_k, new_v: ``[layers, kv_heads, q, head_dim]``; keys already rotated at their positions.
    attn_mass: ``[layers, kv_heads, capacity + q]`` or None: softmax attention of the last
        ``attn_window`` queries, summed over those queries and over the query heads of each KV
        group; columns are the cache slots, then the q new tokens.
    """

    logits: torch.Tensor
    new_k: torch.Tensor
    new_v: torch.Tensor
    attn_mass: torch.Tensor | None = None


class Attention(nn.Module):
    """Grouped-query attention over (cached slots + new tokens)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor, attn_window: int | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q_len = x.shape[0]
        q = self.q_proj(x).view(q_len, self.num_heads, self.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(q_len, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(q_len, self.num_kv_heads, self.head_dim).transpose(0, 1)
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        # Cached slots and new tokens are scored separately and the two blocks of scores joined:
        # the cache is read once in place (no concatenated or head-repeated copy of it), which is
        # what bounds decode speed. Query heads are grouped under their KV head (GQA).
        group = self.num_heads // self.num_kv_heads
        grouped_q = q.reshape(self.num_kv_heads, group * q_len, self.head_dim)
        scale = self.head_dim ** -0.5
        scores = torch.cat((grouped_q @ past_k.transpose(-1, -2), grouped_q @ k.transpose(-1, -2)), dim=-1)
        scores = scores.view(self.num_kv_heads, group, q_len, -1).float() * scale
        # float32 softmax: policies read these probabilities, and bf16 would round small ones away
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        capacity = past_k.shape[1]
        flat = probs.to(x.dtype).view(self.num_kv_heads, group * q_len, -1)
        out = flat[..., :capacity] @ past_v + flat[..., capacity:] @ v
        out = out.view(self.num_heads, q_len, self.head_dim)
        mass = None
        if isinstance(attn_window, torch.Tensor) or attn_window > 0:
            # A tensor window (exported graphs) always reports, so one graph serves every policy.
            in_window = torch.arange(q_len, device=x.device) >= q_len - attn_window  # the last queries
            mass = (probs * in_window.view(1, 1, -1, 1).to(probs.dtype)).sum(dim=(1, 2))
        out = self.o_proj(out.transpose(0, 1).reshape(q_len, self.num_heads * self.head_dim))
        return out, k, v, mass


class FeedForward(nn.Module):
    """SwiGLU MLP."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor, attn_window: int | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        attn_out, k, v, mass = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, mask, attn_window)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), k, v, mass


def run_block(block: TransformerBlock, *args):
    """One block's forward as a plain function: what a backend compiles once for every layer."""
    return block(*args)


class Decoder(nn.Module):
    """Token embeddings, blocks, final norm and LM head."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def empty_cache(self, capacity: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V buffers ``[layers, kv_heads, capacity, head_dim]`` on the model's device and dtype."""
        weight = self.embed_tokens.weight
        shape = (self.cfg.num_layers, self.cfg.num_kv_heads, capacity, self.cfg.head_dim)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def step(self, embeds: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
             positions: torch.Tensor, attn_window: int | torch.Tensor = 0, all_logits: bool = False,
             block_fn=run_block) -> StepOutput:
        """One forward step over q new tokens (see the module docstring).

        embeds ``[q, hidden]``; cache_k/v ``[layers, kv_heads, C, head_dim]``; valid ``[C]`` bool
        (slots holding a token); positions ``[q]`` (cache-relative); attn_window: how many of the
        last queries to report attention mass for (0: none; a 0-d tensor: always report, for export);
        block_fn: how each block runs (a backend may pass a compiled ``run_block``).
        """
        q_len = embeds.shape[0]
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=embeds.device).tril()
        mask = torch.cat((valid.view(1, -1).expand(q_len, -1), causal), dim=1)
        cos, sin = self.rotary.cos_sin(positions, embeds.dtype)
        x = embeds
        new_k, new_v, masses = [], [], []
        for i, block in enumerate(self.layers):
            x, k, v, mass = block_fn(block, x, cos, sin, cache_k[i], cache_v[i], mask, attn_window)
            new_k.append(k)
            new_v.append(v)
            masses.append(mass)
        x = self.norm(x if all_logits else x[-1:])
        return StepOutput(
            logits=self.lm_head(x).float(), new_k=torch.stack(new_k), new_v=torch.stack(new_v),
            attn_mass=torch.stack(masses) if masses[0] is not None else None,
        )
