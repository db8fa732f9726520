"""The LM head and the token table packed as they are read, on the meta-device model, before any
storage is given.

Why: packing them after the load (``quantize_head``, ``quantize_embeddings``) first gives the
float head and table their storage: a 7B model's head and table are 0.26 GB each in bf16 (0.52
in float32), Qwen2-1.5B's tied table 0.47 GB, all on top of the packed model while it loads, and
on a Jetson that memory is the GPU's. Read this way a GGUF head or table of the asked width
(Q8_0 / Q6_K as int8, Q4_0 / Q4_1 / Q4_K as int4) also keeps its own blocks instead of being
rounded a second time from their dequantized values; other tensors are rounded from their values
as their rows are read (``checkpoint.TensorRows``, ``gguf_loader.RowsAsRead``). (``pack_parts``
packs a model built in memory, as the benchmarks' are.)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .freed_heap import release_freed_heap
from .quantized import QuantizedLinear
from .quantized_embedding import QuantizedEmbedding, tied_float_head_error

HEAD = "decoder.lm_head"
TABLE = "decoder.embed_tokens"
# ``packed(tensor, mode)``: the checkpoint's tensor (our name, e.g. "decoder.embed_tokens.weight") packed in
# ``mode`` ("int8" / "int4"), read by the loader that calls ``place_head_and_table``
PackedReader = Callable[[str, str], QuantizedLinear]


def place_head_and_table(model: nn.Module, head_mode: str, table_mode: str, packed: PackedReader,
                         dtype: torch.dtype) -> set[str]:
    """Replace the meta-device LM head and token table by packed layers where their modes are not
    ``float``: a tied head is read from the table's tensor, and a tied table packed as its head reads
    the head's codes (one packed table, as ``quantize_embeddings`` makes). A tied table cannot be
    packed beside a float head (the float table stays alive as that head): refused before anything
    is read. Returns the modules placed (with the shared table's own name), whose tensors the
    loader must not look for. ``dtype``: what the table's lookups return (the model's)."""
    decoder = model.decoder
    tied = decoder.cfg.tie_word_embeddings
    if tied and table_mode != "float" and head_mode == "float":
        raise tied_float_head_error(table_mode)
    placed: set[str] = set()
    if head_mode != "float":
        decoder.lm_head = packed(f"{TABLE if tied else HEAD}.weight", head_mode)
        placed.add(HEAD)
        release_freed_heap()
    if table_mode != "float":
        table = decoder.lm_head if tied and head_mode == table_mode else packed(f"{TABLE}.weight", table_mode)
        decoder.embed_tokens = QuantizedEmbedding(table, dtype)
        placed.update((TABLE, f"{TABLE}.table"))
        release_freed_heap()
    return placed
