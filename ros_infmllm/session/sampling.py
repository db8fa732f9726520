"""Choosing the next token: greedy, or temperature + nucleus (top-p) sampling with a seeded generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_p in (0, 1] keeps the smallest set of tokens whose
    probability reaches top_p; seed makes sampled answers repeatable."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> int:
    """One token id from ``logits[vocab]``."""
    if config.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / config.temperature, dim=-1).cpu()
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(0) - sorted_probs >= config.top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])
