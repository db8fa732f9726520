"""Packed token embeddings (model/quantized_embedding.py): lookups dequantize the gathered rows of
QuantizedLinear's layout, a tied table reads the packed head's codes, and the load-time parameter
is checked; the session streams with it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builders import build_tiny_causal_lm
from ros_infmllm.model import load_model
from ros_infmllm.model.quantized import QuantizedLinear
from ros_infmllm.model.quantized_embedding import QuantizedEmbedding, quantize_embeddings
from ros_infmllm.session import StreamingSession


@pytest.mark.parametrize("mode,bits", [("int8", 8), ("int4", 4)])
def test_an_untied_table_is_rounded_per_group_and_lookups_gather_its_rows(tmp_path: Path, mode: str, bits: int) -> None:
    build_tiny_causal_lm(tmp_path, "llama", seed=3, tie=False)
    floats = load_model(tmp_path)
    model = load_model(tmp_path, embedding_weights=mode)
    embed = model.decoder.embed_tokens
    assert isinstance(embed, QuantizedEmbedding) and embed.mode == mode and embed.table is not model.decoder.lm_head
    table = floats.decoder.embed_tokens.weight
    ids = torch.tensor([[3, 0, 7], [7, 1, table.shape[0] - 1]])
    rows = embed(ids)
    assert rows.shape == (2, 3, table.shape[1]) and rows.dtype == table.dtype
    assert torch.equal(rows[0, 2], rows[1, 0])  # one token, one row
    # round to nearest: each value within half a step of its group's grid (int8: scale; int4: (max - min) / 15)
    grouped = table[ids.reshape(-1)].reshape(ids.numel(), -1, 32)
    step = grouped.abs().amax(-1) / 127 if bits == 8 else (grouped.amax(-1) - grouped.amin(-1)) / 15
    error = (rows.reshape(ids.numel(), -1, 32) - grouped).abs()
    assert (error <= step[..., None] / 2 * (1 + 1e-2) + 1e-6).all() and error.max() > 0
    assert model.dtype == floats.dtype and model.device == floats.device
    assert torch.equal(model.decoder.lm_head.weight, floats.decoder.lm_head.weight)  # the head is untouched


def test_a_tied_table_reads_the_packed_heads_codes_and_needs_the_head_packed(tmp_path: Path) -> None:
    build_tiny_causal_lm(tmp_path, "qwen2", seed=9, tie=True)
    floats = load_model(tmp_path)
    model = load_model(tmp_path, weights="int4", lm_head_weights="int8", embedding_weights="int8")
    head, embed = model.decoder.lm_head, model.decoder.embed_tokens
    assert isinstance(head, QuantizedLinear) and embed.table is head  # one packed table for both
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(embed(ids)[0], head.dequantized(model.dtype)[ids[0]])
    kl = torch.nn.functional.kl_div(model.forward_full(ids).log_softmax(-1), floats.forward_full(ids).log_softmax(-1),
                                    log_target=True, reduction="batchmean").item()
    assert kl < 2e-2
    other = load_model(tmp_path, lm_head_weights="int4", embedding_weights="int8")  # modes differ: a table of its own
    assert other.decoder.embed_tokens.table is not other.decoder.lm_head
    with pytest.raises(ValueError, match="tied to a float LM head"):
        load_model(tmp_path, embedding_weights="int8")
    with pytest.raises(ValueError, match="embedding_weights must be one of"):
        load_model(tmp_path, embedding_weights="int2")
    assert not quantize_embeddings(model.decoder, "int8")  # packed already


def test_lookups_follow_the_models_dtype(tmp_path: Path) -> None:
    build_tiny_causal_lm(tmp_path, "llama", seed=4, tie=False)
    model = load_model(tmp_path, embedding_weights="int8").to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.decoder.embed_tokens(torch.tensor([1, 2])).dtype == torch.bfloat16


def test_a_session_streams_with_packed_embeddings_and_exported_backends_refuse_them(tmp_path: Path) -> None:
    build_tiny_causal_lm(tmp_path, "qwen2", seed=7)
    session = StreamingSession.from_pretrained(tmp_path, policy="h2o", capacity=96, max_chunk=16, template="qwen2",
                                               max_new_tokens=4, weights="int4", lm_head_weights="int8",
                                               embedding_weights="int8")
    assert isinstance(session.model.decoder.embed_tokens, QuantizedEmbedding)
    session.feed_text("the red circle is left of the blue square " * 12)
    assert session.cache.evictions > 0 and session.cache.length <= 96
    assert isinstance(session.answer("what is left ?"), str)
    with pytest.raises(ValueError, match="embedding_weights 'int8'"):
        StreamingSession.from_pretrained(tmp_path, backend="onnxruntime", embedding_weights="int8")
