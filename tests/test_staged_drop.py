"""Staged visual-token drop (after PyramidDrop): the stage arithmetic, masking equals removing the
dropped tokens, a per-layer count of live tokens in the cache, eviction exactness per layer, and
the refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from builders import TinySpec, build_tiny_llava, build_tiny_qwen2_vl
from ros_infmllm.backends.graph_runner import EagerRunner
from ros_infmllm.cache import BoundedKVCache, make_policy
from ros_infmllm.cache.policies import keep_top
from ros_infmllm.rope import Rotary
from ros_infmllm.model.staged_drop import StagedDrop, check_boundaries, even_boundaries, rank_and_keep, stage_counts
from ros_infmllm.ros.params import drop_layers
from ros_infmllm.session import SessionConfig, StreamingSession
from test_session import _frames, _fresh_cache_from_raw, _session


@pytest.fixture(scope="module")
def four_layer_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("four_layer_llava")
    build_tiny_llava(path, TinySpec(layers=4, seed=5))
    return path


def test_stage_arithmetic_and_bad_plans() -> None:
    assert stage_counts(64, 3, 0.5) == (32, 16, 8)
    assert stage_counts(15, 2, 0.5) == (8, 4)  # rounded up
    assert stage_counts(3, 4, 0.25) == (1, 1, 1, 1)  # never below one
    assert even_boundaries(32) == (8, 16, 24) and even_boundaries(30) == (7, 15, 22) and even_boundaries(2) == (1,)
    assert check_boundaries((1, 3), 4) == (1, 3)
    for bad in ((0, 2), (2, 2), (3, 1), (4,)):
        with pytest.raises(ValueError, match="strictly ascending in 1..3"):
            check_boundaries(bad, 4)
    with pytest.raises(ValueError, match=r"keep ratio must be in \(0, 1\)"):
        stage_counts(10, 2, 1.0)
    assert drop_layers("") == () and drop_layers("auto") == "auto" and drop_layers(" 8,16,24 ") == (8, 16, 24)
    for bad in ("8;16", "16,8", "0,4"):
        with pytest.raises(ValueError, match="visual_tokens.drop_layers"):
            drop_layers(bad)


def _removed_reference(decoder, embeds, cache_k, cache_v, valid, positions, plan: StagedDrop):
    """PyramidDrop as written: at each boundary the dropped tokens leave the hidden states (and
    their positions go with them). Returns each layer's kept token indices and their K/V, and the
    last token's logits."""
    index = torch.arange(embeds.shape[0])
    x, pos = embeds, positions
    layers_kept, keys, values = [], [], []
    for i, block in enumerate(decoder.layers):
        if i in plan.boundaries:
            cos, sin = decoder.rotary.cos_sin(pos, x.dtype)
            live = rank_and_keep(block, x, cos, sin, torch.ones(x.shape[0], dtype=torch.bool),
                                 plan.droppable[index], plan.kept[plan.boundaries.index(i)])
            x, pos, index = x[live], pos[live], index[live]
        q = x.shape[0]
        cos, sin = decoder.rotary.cos_sin(pos, x.dtype)
        causal = torch.ones(q, q, dtype=torch.bool).tril()
        mask = torch.cat((valid.view(1, -1).expand(q, -1), causal), dim=1)
        x, k, v, _, _ = block(x, cos, sin, cache_k[i], cache_v[i], mask, 0)
        layers_kept.append(index)
        keys.append(k)
        values.append(v)
    logits = decoder.lm_head(decoder.norm(x[-1:]))
    return layers_kept, keys, values, logits


def test_masking_dropped_tokens_equals_removing_them(four_layer_model_dir: Path) -> None:
    session = StreamingSession.from_pretrained(four_layer_model_dir, policy="full", capacity=64, max_chunk=32,
                                               template="demo", system_prompt="hello robot")
    decoder, cache = session.model.decoder, session.cache
    torch.manual_seed(0)
    q = 20
    embeds = torch.randn(q, session.model.cfg.text.hidden_size)
    droppable = torch.zeros(q, dtype=torch.bool)
    droppable[3:18] = True  # 15 "visual" tokens between template tokens
    plan = StagedDrop((1, 3), stage_counts(15, 2, 0.5), droppable)
    positions = cache.positions(q)
    with torch.inference_mode():
        out = decoder.step(embeds, cache.k, cache.v, cache.valid(), positions, drop=plan)
        kept, keys, values, logits = _removed_reference(decoder, embeds, cache.k, cache.v, cache.valid(), positions,
                                                        plan)
    assert out.kept.shape == (4, q)
    assert out.kept.sum(-1).tolist() == [20, 13, 13, 9]  # 5 template tokens + 15, 8, 8, 4 visual
    for layer in range(4):
        assert torch.equal(out.kept[layer].nonzero().flatten(), kept[layer])
        assert (out.new_k[layer][:, kept[layer]] - keys[layer]).abs().max() <= 1e-5
        assert (out.new_v[layer][:, kept[layer]] - values[layer]).abs().max() <= 1e-5
    assert (out.logits - logits).abs().max() <= 1e-4
    assert not torch.equal(out.kept[1], out.kept[3])  # the second stage ranked again


def test_each_layer_keeps_its_own_fill_and_deep_layers_reach_further_back(four_layer_model_dir: Path) -> None:
    plain = _session(four_layer_model_dir, "streamingllm", capacity=160, max_chunk=32)
    dropping = _session(four_layer_model_dir, "streamingllm", capacity=160, max_chunk=32, drop_layers=(2,),
                        drop_keep=0.25)
    ids = dropping.frame_ids()
    assert len(ids) <= 32  # one chunk per frame
    image = ids == dropping.model.cfg.image_token_index
    visual = int(image.sum()) - int(image[-1])  # the chunk's last token ranks, so it stays
    dropped_per_frame = visual - stage_counts(visual, 1, 0.25)[0]
    for frame in _frames(3):
        plain.ingest_frame(frame)
        dropping.ingest_frame(frame)
    fill = dropping.cache.live_counts()
    assert fill[0] == fill[1] == dropping.cache.length == plain.cache.length  # shallow layers: every token
    assert fill[2] == fill[3] == fill[0] - 3 * dropped_per_frame
    for frame in _frames(14, seed=1):
        plain.ingest_frame(frame)
        dropping.ingest_frame(frame)
    cache = dropping.cache
    assert cache.evictions >= 2 and cache.k.shape == plain.cache.k.shape  # same preallocated memory
    window = cache.live()[:, 0] & (cache.origin[:, 0] >= 4)  # outside streamingllm's four sinks
    oldest = [int(cache.origin[layer, 0][window[layer]].min()) for layer in range(4)]
    assert oldest[0] == oldest[1] and oldest[2] == oldest[3] < oldest[0]  # deep layers hold older frames
    seen = cache.total_seen
    assert isinstance(dropping.answer("what is in view ?"), str) and cache.total_seen > seen  # text steps go on


def test_per_layer_eviction_equals_a_cache_rebuilt_from_scratch(four_layer_model_dir: Path) -> None:
    """After evictions, each layer's live slots equal the kept stream tokens' K/V rotated afresh
    at their new slots, and the next step over a rebuilt cache (with the same per-layer drop
    marks) gives the session's logits."""
    session = _session(four_layer_model_dir, "h2o", recording=True, drop_layers=(1, 3))
    for frame in _frames(12):
        session.ingest_frame(frame)
    cache = session.cache
    assert cache.evictions >= 2 and len(set(cache.live_counts())) > 1
    fresh = _fresh_cache_from_raw(session, torch.cat(session.backend.raw_k, 2), torch.cat(session.backend.raw_v, 2))
    n = cache.length
    fresh.dropped[..., :n] = cache.dropped[..., :n]
    live = cache.live()[..., :n]
    assert (fresh.k[:, :, :n] - cache.k[:, :, :n])[live].abs().max() <= 1e-4
    with torch.inference_mode():
        embed = session.model.embed_tokens(torch.tensor([20]))
        reference = session.model.decoder.step(embed, fresh.k, fresh.v, fresh.layer_valid(),
                                               cache.positions(1)).logits[-1]
    assert (session.feed(torch.tensor([20])) - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("policy", ["inf-mllm", "inf-mllm-lt", "look-m"])
def test_every_policy_evicts_dropped_slots_first_and_stays_bounded(four_layer_model_dir: Path, policy: str) -> None:
    session = _session(four_layer_model_dir, policy, capacity=96, max_chunk=16, drop_layers="auto")
    assert session.drop_layers == (1, 2, 3)
    for i, frame in enumerate(_frames(16)):
        session.ingest_frame(frame)
        if i % 5 == 4:
            session.feed_text(" what is in view ?")
    cache = session.cache
    assert cache.evictions >= 3 and cache.length <= cache.capacity
    fill = cache.live_counts()
    assert fill == sorted(fill, reverse=True) and fill[-1] < fill[0]
    seen = cache.total_seen
    assert isinstance(session.answer("what is in view ?"), str) and cache.total_seen > seen


def test_keep_top_prefers_live_slots_then_dropped_ones_then_never_empty_ones() -> None:
    cache = BoundedKVCache(2, 1, 8, 4, Rotary(4, 10000.0))
    cache.append(torch.randn(2, 1, 6, 4), torch.randn(2, 1, 6, 4))
    cache.dropped[1, 0, :3] = True  # layer 1 dropped slots 0-2
    scores = torch.tensor([9.0, 8, 7, 1, 2, 3, 0, 0]).expand(2, 1, 8)  # the dropped slots score highest
    none = torch.zeros(2, 1, 8, dtype=torch.bool)
    assert keep_top(cache, scores, none, 3).tolist() == [[[0, 1, 2]], [[3, 4, 5]]]
    assert keep_top(cache, scores, none, 5)[1, 0].tolist() == [0, 1, 3, 4, 5]  # then dropped, not empty 6-7
    forced = none.clone()
    forced[:, :, 2] = True  # a forced slot that layer 1 dropped is not forced there
    assert keep_top(cache, scores, forced, 3).tolist() == [[[0, 1, 2]], [[3, 4, 5]]]


def test_staged_drop_is_refused_where_it_cannot_run(four_layer_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="strictly ascending in 1..3"):
        _session(four_layer_model_dir, "h2o", drop_layers=(2, 4))
    with pytest.raises(ValueError, match="keep ratio"):
        _session(four_layer_model_dir, "h2o", drop_layers=(2,), drop_keep=0.0)
    assert SessionConfig(drop_layers="1, 3").drop_layers == (1, 3)
    assert SessionConfig(drop_layers=" auto").drop_layers == "auto"
    with pytest.raises(ValueError, match="drop_layers must be layer numbers"):
        SessionConfig(drop_layers="8;16")
    base = _session(four_layer_model_dir, "h2o")

    class ExportedStandIn:
        """A stand-in (mock) for an exported backend: the check reads only its type and name."""

        name = "onnxruntime"

        def graph_runner(self) -> EagerRunner:
            return EagerRunner()

    config = SessionConfig(capacity=96, max_chunk=8, template="demo", drop_layers=(2,))
    with pytest.raises(ValueError, match="torch backend only, not onnxruntime"):
        StreamingSession(base.model, base.tokenizer, make_policy("h2o"), config, base.template, base.preprocessor,
                         ExportedStandIn())


def test_a_qwen2_vl_stream_drops_per_layer_at_mrope_positions(tmp_path: Path) -> None:
    """M-RoPE frames (a dynamic-resolution tower, positions [3, q]) through a staged drop: the
    deeper layer holds fewer live tokens, evictions keep it bounded, and questions still run."""
    build_tiny_qwen2_vl(tmp_path, "qwen2_vl")
    session = StreamingSession.from_pretrained(tmp_path, policy="h2o", capacity=128, max_chunk=32, max_new_tokens=4,
                                               system_prompt="hello robot", drop_layers=(1,))
    rng = np.random.default_rng(0)
    for i in range(10):
        session.ingest_frame(rng.integers(0, 256, (30 + 3 * (i % 2), 44, 3), dtype=np.uint8))
    fill = session.cache.live_counts()
    assert session.cache.evictions >= 1 and fill[1] < fill[0] <= session.cache.capacity
    seen = session.cache.total_seen
    assert isinstance(session.answer("what is in view ?"), str) and session.cache.total_seen > seen
