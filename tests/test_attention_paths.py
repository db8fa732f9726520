"""The decoder's attention paths compute the same step: the explicit one (exports: a tensor window),
its one-token form (decode) and the fused one (prefill chunks: scaled_dot_product_attention, mass
from the last queries only); fused projection matrices change nothing either."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ros_infmllm.model import load_model
from ros_infmllm.model.decoder import FUSED_MIN_QUERIES, fused_attention


@pytest.mark.parametrize("window, q", [(0, 24), (5, 24), (0, 1), (3, 1)])
def test_torch_paths_equal_the_exported_path(tiny_model_dir: Path, window: int, q: int) -> None:
    decoder = load_model(tiny_model_dir).decoder
    capacity, filled = 48, 30
    generator = torch.Generator().manual_seed(window)
    cache_k, cache_v = (torch.randn(decoder.cfg.num_layers, decoder.cfg.num_kv_heads, capacity, decoder.cfg.head_dim,
                                    generator=generator) for _ in range(2))
    valid = torch.arange(capacity) < filled
    embeds = torch.randn(q, decoder.cfg.hidden_size, generator=generator)
    positions = torch.arange(filled, filled + q)
    assert fused_attention(q, window) == (q > 1) and not fused_attention(q, torch.tensor(window))
    fused = decoder.step(embeds, cache_k, cache_v, valid, positions, window, all_logits=True)
    explicit = decoder.step(embeds, cache_k, cache_v, valid, positions, torch.tensor(window), all_logits=True)
    assert (fused.logits - explicit.logits).abs().max() <= 1e-4
    assert torch.allclose(fused.new_k, explicit.new_k, atol=1e-5) and torch.allclose(fused.new_v, explicit.new_v, atol=1e-5)
    if window:
        assert (fused.attn_mass - explicit.attn_mass).abs().max() <= 1e-5
        group = decoder.cfg.num_heads // decoder.cfg.num_kv_heads
        queries = min(window, q)
        assert torch.allclose(fused.attn_mass.sum(-1), torch.full_like(fused.attn_mass[..., 0], queries * group))
        assert fused.attn_mass[..., filled:capacity].abs().max() == 0  # empty slots get nothing
    else:
        assert fused.attn_mass is None


def test_decode_and_whole_window_chunks_stay_explicit() -> None:
    assert not fused_attention(1, 32) and not fused_attention(FUSED_MIN_QUERIES - 1, 0)
    assert not fused_attention(64, 64) and fused_attention(64, 32)
    assert fused_attention(64, 64, mass_kernel=True)  # every query read: the Triton mass op


def test_fused_projections_give_the_same_step_and_state_dict(tiny_model_dir: Path) -> None:
    reference, fused = load_model(tiny_model_dir).decoder, load_model(tiny_model_dir).decoder
    fused.fuse_projections()
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), reference.state_dict().values()))
    attention = fused.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == attention.qkv_weight.data_ptr()  # views, not copies
    cache_k, cache_v = reference.empty_cache(32)
    cache_k.normal_(generator=torch.Generator().manual_seed(1))
    valid = torch.arange(32) < 20
    for q in (1, 20):
        embeds = torch.randn(q, reference.cfg.hidden_size, generator=torch.Generator().manual_seed(q))
        positions = torch.arange(20, 20 + q)
        a = reference.step(embeds, cache_k, cache_v, valid, positions, 4, all_logits=True)
        b = fused.step(embeds, cache_k, cache_v, valid, positions, 4, all_logits=True)
        assert (a.logits - b.logits).abs().max() <= 1e-4 and (a.attn_mass - b.attn_mass).abs().max() <= 1e-5
        assert torch.allclose(a.new_k, b.new_k, atol=1e-5) and torch.allclose(a.new_v, b.new_v, atol=1e-5)
