"""Token embeddings held packed, in ``QuantizedLinear``'s layout (one row per token).

Why: a 7B model's embedding table is 0.24 GiB in bf16 and is read only a row per token, so it
costs memory, not speed. Packed as int8 (groups of 32, as GGUF Q8_0) it takes half of that;
llama.cpp's Q4_0 files pack it too. A lookup dequantizes only the rows it gathers. Where the table
is tied to an LM head already packed the same way, the embedding reads the head's codes, so a
tied model holds the table once.
"""
from __future__ import annotations

import torch
from torch import nn

from .quantized import HEAD_MODES, QuantizedLinear, WeightMode

EMBEDDING_MODES = HEAD_MODES  # the token table, as the head: in the model's dtype, or packed


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` over a packed table. Lookups return the dtype of ``out_dtype``, an empty
    float buffer, so a model-wide ``.to(dtype)`` changes it with the other float tensors."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.register_buffer("out_dtype", torch.empty(0, dtype=dtype, device=table.qweight.device), persistent=False)

    @property
    def mode(self) -> str:
        return self.table.mode

    @property
    def num_embeddings(self) -> int:
        return self.table.out_features

    @property
    def embedding_dim(self) -> int:
        return self.table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantized(self.out_dtype.dtype, ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.mode}, group={self.table.group}"


def tied_float_head_error(mode: WeightMode) -> ValueError:
    """Why a table tied to a float head is not packed (here and in ``packed_head``)."""
    return ValueError(f"embeddings {mode}: the table is tied to a float LM head; pack the head "
                      f"(lm_head_weights={mode}) so both read one packed table")


def quantize_embeddings(decoder: nn.Module, mode: WeightMode) -> bool:
    """Pack the token table (round to nearest, groups of 32) unless it is packed already. A table
    tied to an LM head packed in ``mode`` shares the head's codes; tied to a float head, the float
    table stays alive as the head, so packing it would add memory: that is refused. Returns
    whether the table was replaced."""
    embed = decoder.embed_tokens
    if isinstance(embed, QuantizedEmbedding):
        return False
    head = decoder.lm_head
    if isinstance(head, nn.Linear) and head.weight is embed.weight:
        raise tied_float_head_error(mode)
    if isinstance(head, QuantizedLinear) and decoder.cfg.tie_word_embeddings and head.mode == mode:
        table = head
    else:
        table = QuantizedLinear.from_float(embed.weight, None, mode)
    decoder.embed_tokens = QuantizedEmbedding(table, embed.weight.dtype)
    return True
