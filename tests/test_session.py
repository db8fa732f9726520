"""StreamingSession: exactness against a full forward, eviction correctness, bounds, bad input."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ros_infmllm.backends import TorchBackend
from ros_infmllm.cache import BoundedKVCache, make_policy
from ros_infmllm.errors import CacheFullError
from ros_infmllm.session import SamplingConfig, StreamingSession

POLICIES = ["full", "streamingllm", "h2o", "inf-mllm", "inf-mllm-paper", "inf-mllm-lt", "look-m", "h2o-kinds"]


class RecordingBackend(TorchBackend):
    """The torch backend, also keeping every embedding it was given (the stream in token order)
    and every new K/V it returned, keys un-rotated back to position 0."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.embeds: list[torch.Tensor] = []
        self.raw_k: list[torch.Tensor] = []
        self.raw_v: list[torch.Tensor] = []

    def step(self, embeds, cache_k, cache_v, valid, positions, *args, **kwargs):
        out = super().step(embeds, cache_k, cache_v, valid, positions, *args, **kwargs)
        self.embeds.append(embeds.clone())
        self.raw_k.append(self.model.decoder.rotary.rotate(out.new_k, -positions))
        self.raw_v.append(out.new_v.clone())
        return out

    def stream(self) -> torch.Tensor:
        return torch.cat(self.embeds)


def _frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (24 + i % 3, 30, 3), dtype=np.uint8) for i in range(count)]


def _session(model_dir: Path, policy: str, recording: bool = False, **config) -> StreamingSession:
    """``policy`` is a name, or ``name:option=value`` for one boolean option (``look-m:merge=false``)."""
    name, _, option = policy.partition(":")
    policy_options = {option.split("=")[0]: option.split("=")[1] == "true"} if option else {}
    options = dict(capacity=96, max_chunk=8, template="demo", max_new_tokens=6, system_prompt="hello robot")
    options.update(config)
    session = StreamingSession.from_pretrained(model_dir, policy=name, policy_options=policy_options, **options)
    if recording:  # a second session on the same model, recording from its first token (the system prompt)
        session = StreamingSession(session.model, session.tokenizer, make_policy(name, **policy_options),
                                   session.config, session.template, session.preprocessor,
                                   RecordingBackend(session.model))
    return session


def _snapshot(session: StreamingSession) -> tuple:
    cache = session.cache
    return cache.length, cache.total_seen, cache.k.clone(), cache.v.clone(), cache.origin.clone()


def _assert_unchanged(session: StreamingSession, snapshot: tuple) -> None:
    length, seen, k, v, origin = snapshot
    assert session.cache.length == length and session.cache.total_seen == seen
    assert torch.equal(session.cache.k, k) and torch.equal(session.cache.v, v)
    assert torch.equal(session.cache.origin, origin)


@pytest.mark.parametrize("policy", POLICIES)
def test_logits_equal_full_forward_while_stream_fits(tiny_model_dir: Path, policy: str) -> None:
    session = _session(tiny_model_dir, policy, capacity=256)
    system_ids = session.cache.length
    all_ids: list[int] = []
    pixels: list[torch.Tensor] = []
    got: list[torch.Tensor] = []
    question = torch.tensor(session._template_ids(" <q> what is in view ? <a>"))
    for frame in _frames(2):
        pixels.append(session.preprocessor(frame))
        ids = session.frame_ids()
        got.append(session.feed(ids, session.encode_frame(frame), all_logits=True))
        all_ids += ids.tolist()
        got.append(session.feed(question, all_logits=True))
        all_ids += question.tolist()
    assert session.cache.evictions == 0
    prefix = session._encode("hello robot")
    assert len(prefix) == system_ids
    expected = session.model.forward_full(torch.tensor([prefix + all_ids]), torch.cat(pixels))[0, system_ids:]
    assert (torch.cat(got) - expected).abs().max().item() <= 1e-4


def _fresh_cache_from_raw(session: StreamingSession, raw_k: torch.Tensor, raw_v: torch.Tensor) -> BoundedKVCache:
    """A new cache holding, per (layer, head), exactly the kept stream tokens' K/V, keys rotated
    from scratch at their renumbered positions 0..n-1."""
    cache = session.cache
    n = cache.length
    origin = cache.origin[..., :n]
    index = origin.unsqueeze(-1).expand(-1, -1, -1, raw_k.shape[-1])
    fresh = BoundedKVCache(*cache.k.shape[:2], cache.capacity, cache.k.shape[-1], cache.rotary)
    keys = torch.gather(raw_k, 2, index)
    fresh.append(cache.rotary.rotate(keys, torch.arange(n)), torch.gather(raw_v, 2, index))
    return fresh


def _one_layer_raw_kv(session: StreamingSession, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-0 K/V of every stream token computed from its embedding alone (unrotated)."""
    block = session.model.decoder.layers[0]
    attn = block.self_attn
    hidden = block.input_layernorm(stream)
    shape = (stream.shape[0], attn.num_kv_heads, attn.head_dim)
    raw_k = attn.k_proj(hidden).view(shape).permute(1, 0, 2).unsqueeze(0)
    raw_v = attn.v_proj(hidden).view(shape).permute(1, 0, 2).unsqueeze(0)
    return raw_k, raw_v


@pytest.mark.parametrize("policy", ["streamingllm", "h2o", "inf-mllm", "inf-mllm-paper", "inf-mllm-lt",
                                    "look-m:merge=false", "h2o-kinds"])
def test_after_evictions_next_logits_equal_forward_over_kept_tokens(one_layer_model_dir: Path, policy: str) -> None:
    session = _session(one_layer_model_dir, policy, recording=True)
    for frame in _frames(12):
        session.ingest_frame(frame)
    assert session.cache.evictions >= 2
    with torch.inference_mode():
        raw_k, raw_v = _one_layer_raw_kv(session, session.backend.stream())
        fresh = _fresh_cache_from_raw(session, raw_k, raw_v)
        token = torch.tensor([session.tokenizer.token_to_id("what")])
        embed = session.model.embed_tokens(token)
        positions = session.cache.positions(1)
        reference = session.model.decoder.step(embed, fresh.k, fresh.v, fresh.valid(), positions).logits
    got = session.feed(token)
    assert (got - reference[-1]).abs().max().item() <= 1e-4


def test_look_m_keeps_text_before_frames_and_merges_what_it_evicts(tiny_model_dir: Path) -> None:
    """look-m: after evictions every text token of the stream is still in the cache (text-prior),
    which h2o does not promise; and merging changes the kept entries (against look-m without it)."""
    names = ("look-m", "look-m:merge=false", "h2o")
    sessions = {name: _session(tiny_model_dir, name, capacity=160, max_chunk=16) for name in names}
    for session in sessions.values():
        for i, frame in enumerate(_frames(10)):
            session.ingest_frame(frame)
            if i % 3 == 2:
                session.feed_text(" what is in view ?")
        assert session.cache.evictions >= 2 and session.cache.length <= 160

    def text_kept(cache) -> int:
        return int((~cache.visual[..., :cache.length]).sum(-1).min())

    look_m = sessions["look-m"]
    text_fed = look_m.cache.total_seen - 10 * len(look_m.frame_ids())
    assert text_kept(look_m.cache) == text_fed == text_kept(sessions["look-m:merge=false"].cache)
    assert text_kept(sessions["h2o"].cache) <= text_fed
    plain = sessions["look-m:merge=false"].cache
    assert not torch.equal(look_m.cache.v[..., :plain.length, :], plain.v[..., :plain.length, :])
    assert isinstance(look_m.answer("what is in view ?"), str)


def test_streamingllm_after_eviction_equals_plain_forward_over_kept_tokens(one_layer_model_dir: Path) -> None:
    """With one layer and one kept set for all heads, the reference is literally forward_full's
    path: the kept tokens' embeddings, then the new token, at positions 0..n."""
    session = _session(one_layer_model_dir, "streamingllm", recording=True)
    for frame in _frames(10):
        session.ingest_frame(frame)
    assert session.cache.evictions >= 1
    kept = session.cache.origin[0, 0, : session.cache.length]
    assert bool((session.cache.origin[..., : kept.numel()] == kept).all())  # one kept set in every head
    with torch.inference_mode():
        token = torch.tensor([session.tokenizer.token_to_id("what")])
        embeds = torch.cat((session.backend.stream()[kept], session.model.embed_tokens(token)))
        empty_k, empty_v = session.model.decoder.empty_cache(0)
        reference = session.model.decoder.step(embeds, empty_k, empty_v, torch.zeros(0, dtype=torch.bool),
                                               torch.arange(embeds.shape[0])).logits[-1]
    assert (session.feed(token) - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("policy", ["streamingllm", "h2o", "inf-mllm", "inf-mllm-paper", "inf-mllm-lt",
                                    "look-m:merge=false", "h2o-kinds"])
def test_multi_layer_compaction_equals_fresh_rotation(tiny_model_dir: Path, policy: str) -> None:
    """Every layer: the compacted cache equals one rebuilt from the recorded, unrotated K/V of the
    kept tokens rotated at their new slots, so the next step's logits agree."""
    session = _session(tiny_model_dir, policy, recording=True)
    for frame in _frames(12):
        session.ingest_frame(frame)
    assert session.cache.evictions >= 2
    fresh = _fresh_cache_from_raw(session, torch.cat(session.backend.raw_k, 2), torch.cat(session.backend.raw_v, 2))
    assert (fresh.k[:, :, : fresh.length] - session.cache.k[:, :, : fresh.length]).abs().max() <= 1e-4
    with torch.inference_mode():
        embed = session.model.embed_tokens(torch.tensor([20]))
        reference = session.model.decoder.step(embed, fresh.k, fresh.v, fresh.valid(),
                                               session.cache.positions(1)).logits[-1]
    assert (session.feed(torch.tensor([20])) - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("policy", ["streamingllm", "h2o-kinds", "look-m"])
def test_an_int8_cache_holds_the_kept_tokens_rounded_once(tiny_model_dir: Path, policy: str) -> None:
    """``kv_cache_dtype="int8"``: after evictions the codes hold, per (layer, head), the kept stream
    tokens' unrotated keys and values rounded once (the codes of rounding them afresh: no move
    rounds again), and read back turned to their slots they are a float cache's keys to within
    that rounding; the next step's logits stay near a float cache's over the same tokens. look-m
    merges from the dequantized rows."""
    from ros_infmllm.cache.kv_codes import dequantize_rows, quantize_rows, read_keys

    session = _session(tiny_model_dir, policy, recording=policy != "look-m", kv_cache_dtype="int8")
    cache = session.cache
    assert cache.quantized and cache.k.dtype == torch.int8 and cache.int8_cache[0].dtype == torch.float32
    for frame in _frames(12):
        session.ingest_frame(frame)
    assert cache.evictions >= 2
    n = cache.length
    k_rows = read_keys(cache.k, cache.k_scale, cache.read_cos, cache.read_sin, torch.float32)[:, :, :n]
    v_rows = dequantize_rows(cache.v, cache.v_scale, torch.float32)[:, :, :n]
    if policy == "look-m":  # merged rows are averages: finite, and answers still come
        assert torch.isfinite(k_rows).all() and torch.isfinite(v_rows).all()
        assert session.answer("what is in view ?", max_new_tokens=3)
        return
    raw_k, raw_v = torch.cat(session.backend.raw_k, 2), torch.cat(session.backend.raw_v, 2)
    index = cache.origin[..., :n].unsqueeze(-1).expand(-1, -1, -1, raw_k.shape[-1])
    assert torch.equal(cache.k[:, :, :n], quantize_rows(torch.gather(raw_k, 2, index))[0])
    assert torch.equal(cache.v[:, :, :n], quantize_rows(torch.gather(raw_v, 2, index))[0])
    fresh = _fresh_cache_from_raw(session, raw_k, raw_v)
    want_k = fresh.k[:, :, :n]
    key_error = float((k_rows - want_k).norm() / want_k.norm())
    assert 0 < key_error < 0.01
    with torch.inference_mode():
        embed = session.model.embed_tokens(torch.tensor([20]))
        reference = session.model.decoder.step(embed, fresh.k, fresh.v, fresh.valid(),
                                               session.cache.positions(1)).logits[-1]
    got = session.feed(torch.tensor([20]))
    assert 0 < (got - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


def test_an_int8_cache_is_refused_off_the_torch_backend(tiny_model_dir: Path) -> None:
    base = _session(tiny_model_dir, "h2o")

    class ExportedStandIn:
        """A stand-in (mock) for an exported backend: the check reads only its type and name."""

        name = "tensorrt"

        def graph_runner(self):
            return base.backend.graph_runner()

    config = dataclasses.replace(base.config, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="int8 runs on the torch backend only, not tensorrt"):
        StreamingSession(base.model, base.tokenizer, make_policy("h2o"), config, base.template, base.preprocessor,
                         ExportedStandIn())
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4': choose from model, int8"):
        dataclasses.replace(base.config, kv_cache_dtype="int4")


@pytest.mark.parametrize("policy", ["streamingllm", "h2o", "inf-mllm", "inf-mllm-paper", "inf-mllm-lt", "look-m",
                                    "h2o-kinds"])
def test_cache_stays_bounded_over_a_stream_20x_its_capacity(tiny_model_dir: Path, policy: str) -> None:
    session = _session(tiny_model_dir, policy, capacity=64, max_chunk=8)
    pinned = session.cache.length
    assert pinned > 0
    capacity_bytes = session.cache.k.numel()
    frames = _frames(4)
    while session.cache.total_seen < 20 * 64:
        session.ingest_frame(frames[session.cache.total_seen % 4])
        assert session.cache.length <= 64
        if session.stats.frames_ingested % 20 == 0:
            session.answer("what is in view ?", max_new_tokens=3)
        # The system prompt is pinned: still in every (layer, head), at the front.
        assert torch.equal(session.cache.origin[..., :pinned],
                           torch.arange(pinned).expand_as(session.cache.origin[..., :pinned]))
    assert session.cache.k.numel() == capacity_bytes
    assert session.cache.evictions > 10


def test_streamingllm_session_keeps_sinks_plus_contiguous_window(tiny_model_dir: Path) -> None:
    session = _session(tiny_model_dir, "streamingllm", capacity=64, system_prompt="")
    for frame in _frames(9):
        session.ingest_frame(frame)
    assert session.cache.evictions >= 1
    kept = session.cache.origin[0, 0, : session.cache.length].tolist()
    window = session.cache.length - 4
    assert kept == list(range(4)) + list(range(session.cache.total_seen - window, session.cache.total_seen))


def test_full_policy_refuses_when_full_and_keeps_cache(tiny_model_dir: Path) -> None:
    session = _session(tiny_model_dir, "full", capacity=48)
    session.ingest_frame(_frames(1)[0])
    session.ingest_frame(_frames(1)[0])
    snapshot = _snapshot(session)
    with pytest.raises(CacheFullError, match="does not evict"):
        session.ingest_frame(_frames(1)[0])
    _assert_unchanged(session, snapshot)


@pytest.mark.parametrize("frame, message", [
    (np.zeros((20, 20, 3), np.float32), "dtype must be uint8"),
    (np.zeros((20, 20), np.uint8), "HxWx3"),
    (np.zeros((20, 20, 4), np.uint8), "HxWx3"),
    (np.zeros((0, 20, 3), np.uint8), "zero size"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_frames_raise_and_leave_cache_unchanged(tiny_model_dir: Path, frame, message: str) -> None:
    session = _session(tiny_model_dir, "inf-mllm")
    session.ingest_frame(_frames(1)[0])
    snapshot = _snapshot(session)
    with pytest.raises(ValueError, match=message):
        session.ingest_frame(frame)
    _assert_unchanged(session, snapshot)
    session.ingest_frame(_frames(1)[0])  # still usable
    assert session.stats.frames_ingested == 2


@pytest.mark.parametrize("query, message", [
    ("", "empty"), ("   ", "empty"), ("x" * 501, "max_query_chars=500"), ("what " * 40, "max_query_tokens=30"),
])
def test_bad_queries_raise_and_leave_cache_unchanged(tiny_model_dir: Path, query: str, message: str) -> None:
    session = _session(tiny_model_dir, "inf-mllm", max_query_chars=500, max_query_tokens=30)
    session.ingest_frame(_frames(1)[0])
    snapshot = _snapshot(session)
    with pytest.raises(ValueError, match=message):
        session.ask(query)
    _assert_unchanged(session, snapshot)
    assert isinstance(session.answer("what is in view ?"), str)


def test_unknown_policy_and_bad_config_are_value_errors(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        _session(tiny_model_dir, "fifo")
    with pytest.raises(ValueError, match="slack_fraction"):
        _session(tiny_model_dir, "inf-mllm", slack_fraction=1.5)
    with pytest.raises(ValueError, match="capacity 32 is too small"):
        _session(tiny_model_dir, "inf-mllm", capacity=32, max_chunk=28)
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        _session(tiny_model_dir, "inf-mllm", template="chatml")


def test_answers_stay_in_the_cache(tiny_model_dir: Path) -> None:
    session = _session(tiny_model_dir, "full", capacity=256, max_new_tokens=5)
    session.ingest_frame(_frames(1)[0])
    before = session.cache.total_seen
    pieces = list(session.ask("what is in view ?"))
    query_tokens = len(session._query_ids("what is in view ?"))
    # Every generated token went through the cache, then the turn was closed (stop token or <eos>).
    assert session.cache.total_seen >= before + query_tokens + len(pieces) + 1
    assert session.stats.queries_answered == 1


def test_sampling_is_repeatable_with_a_seed(tiny_model_dir: Path) -> None:
    sampling = SamplingConfig(temperature=1.5, top_p=0.9, seed=7)
    answers = []
    for _ in range(2):
        session = _session(tiny_model_dir, "inf-mllm", sampling=sampling, max_new_tokens=12)
        session.ingest_frame(_frames(1)[0])
        answers.append(session.answer("what is in view ?"))
    assert answers[0] == answers[1]
    greedy = _session(tiny_model_dir, "inf-mllm", max_new_tokens=12)
    greedy.ingest_frame(_frames(1)[0])
    assert greedy.answer("what is in view ?") != answers[0]


def _host_greedy(session: StreamingSession, ids: torch.Tensor, count: int) -> list[int]:
    """Greedy decoding the plain way: the host reads each token and feeds it back."""
    logits, tokens = session.feed(ids), []
    for _ in range(count):
        tokens.append(int(logits.argmax()))
        logits = session.feed(torch.tensor([tokens[-1]]))
    return tokens


@pytest.mark.parametrize("policy", ["inf-mllm", "streamingllm"])
def test_device_fed_greedy_tokens_equal_host_fed_greedy(tiny_model_dir: Path, policy: str) -> None:
    """``tokens`` chooses and feeds each greedy token on the device: same tokens and same cache
    (through evictions) as reading every token on the host and feeding it back."""
    pipelined, plain = (_session(tiny_model_dir, policy, capacity=64) for _ in range(2))
    for session in (pipelined, plain):
        session.ingest_frame(_frames(1)[0])
    ids = pipelined._query_ids("what is in view ?")
    produced = list(pipelined.tokens(ids, 40))
    assert produced == _host_greedy(plain, ids, 40)
    assert pipelined.cache.evictions > 0
    assert (pipelined.cache.length, pipelined.cache.total_seen) == (plain.cache.length, plain.cache.total_seen)
    assert torch.allclose(pipelined.cache.k, plain.cache.k, atol=1e-6)
    assert torch.equal(pipelined.cache.origin, plain.cache.origin)


def test_tokens_feed_nothing_past_where_the_caller_stops(tiny_model_dir: Path) -> None:
    """A caller that stops at a token (a stop token) leaves exactly that token as the last one fed:
    the next step is launched only when the caller asks for the next token."""
    probe, session = (_session(tiny_model_dir, "full", capacity=256) for _ in range(2))
    ids = probe._query_ids("where is the robot ?")
    produced = list(probe.tokens(ids, 8))
    stop_at = produced[3]
    before = session.cache.total_seen
    for token in session.tokens(ids, 8):
        if token == stop_at:
            break
    assert session.cache.total_seen - before == len(ids) + produced.index(stop_at) + 1
    assert probe.cache.total_seen - before == len(ids) + 8


@pytest.mark.parametrize("policy", ["inf-mllm", "h2o", "inf-mllm-paper", "inf-mllm-lt", "h2o-kinds"])
def test_a_step_failing_mid_frame_leaves_the_cache_as_before_the_frame(tiny_model_dir: Path, policy: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame takes two chunks here; the second one's step fails (as an out-of-memory error
    would). The first chunk is taken out again, and the stream goes on exactly as if the failed
    frame had never come: same cache, same answer as a session that never saw it."""
    frames = _frames(4, seed=7)
    failing, clean = _session(tiny_model_dir, policy), _session(tiny_model_dir, policy)
    for frame in frames[:2]:
        failing.ingest_frame(frame)
        clean.ingest_frame(frame)
    cache = failing.cache
    before = (cache.length, cache.total_seen, int(cache.length_t), int(cache.seen_t))
    valid = [t[..., :cache.length, :].clone() for t in (cache.k, cache.v)]
    real_step, calls = failing.backend.step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(failing.backend, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        failing.ingest_frame(frames[2])
    monkeypatch.setattr(failing.backend, "step", real_step)
    assert len(calls) == 2  # the first chunk went in before the failure
    assert (cache.length, cache.total_seen, int(cache.length_t), int(cache.seen_t)) == before
    assert all(torch.equal(t[..., :cache.length, :], kept) for t, kept in zip((cache.k, cache.v), valid))
    # the forgotten slots start from nothing (what the policy observed of the failed chunk's
    # attention to earlier slots stays: statistics, not cache contents)
    assert all(not stat[..., cache.length:].any() for stat in cache.stats.values())
    failing.ingest_frame(frames[3])
    clean.ingest_frame(frames[3])
    assert torch.equal(cache.k[..., :cache.length, :], clean.cache.k[..., :clean.cache.length, :])
    assert failing.answer("what is in view ?") == clean.answer("what is in view ?")


@pytest.mark.parametrize("policy", ["inf-mllm", "h2o"])
def test_warm_up_leaves_no_trace_in_the_stream(tiny_model_dir: Path, policy: str) -> None:
    """After warm_up (here with the GPU's eviction rounds forced on the CPU) a session streams and
    answers exactly as one that never warmed up, sampled answers included."""
    sampling = SamplingConfig(temperature=1.2, top_p=0.9, seed=3)
    cold = _session(tiny_model_dir, policy, capacity=96, max_chunk=16, sampling=sampling, max_new_tokens=8)
    warm = _session(tiny_model_dir, policy, capacity=96, max_chunk=16, sampling=sampling, max_new_tokens=8)
    empty = warm.cache.length
    seconds = warm.warm_up(evictions=2)
    assert seconds > 0 and warm.cache.length == empty and warm.cache.evictions == 0
    assert warm.stats.frames_ingested == 0 and warm.stats.queries_answered == 0
    for session in (cold, warm):
        for frame in _frames(12):
            session.ingest_frame(frame)
    assert warm.cache.evictions == cold.cache.evictions > 0
    assert torch.equal(warm.cache.k[:, :, :warm.cache.length], cold.cache.k[:, :, :cold.cache.length])
    assert warm.answer("what is in view ?") == cold.answer("what is in view ?")


def test_a_failed_warm_up_leaves_no_trace_either(tiny_model_dir: Path, monkeypatch) -> None:
    """A warm-up that fails midway (on a GPU: an out-of-memory, a failed capture) still resets the
    stream: the frames it had fed do not stay in the cache as if the camera had sent them."""
    session = _session(tiny_model_dir, "h2o", capacity=96, max_chunk=16)
    empty = session.cache.length

    def broken(*args, **kwargs):
        raise RuntimeError("injected warm-up failure")

    monkeypatch.setattr(session, "answer", broken)  # fails after the warm-up's frames went in
    with pytest.raises(RuntimeError, match="injected"):
        session.warm_up()
    assert session.cache.length == empty and session.cache.total_seen == empty
    assert session.frames_in_stream == 0 and session.stats.frames_ingested == 0


class CaptureLedger:
    """Test double of CudaGraphRunner on the CPU (no CUDA here): the real runner's bookkeeping
    (``CaptureBook``) decides which calls it would capture, and those keys are recorded as
    captured; every step runs eagerly."""

    def __init__(self, warmups: int = 2) -> None:
        from ros_infmllm.backends.graph_runner import CaptureBook

        self.book, self.graphs = CaptureBook(warmups), {}

    def __call__(self, key, fn, inputs, capture: bool = True):
        if key not in self.graphs and self.book.should_capture(key, len(self.graphs), capture):
            self.graphs[key] = True
        return fn(*inputs)


@pytest.mark.parametrize("policy", ["inf-mllm", "inf-mllm-lt"])
def test_after_warm_up_a_stream_would_capture_no_new_step(tiny_model_dir: Path, policy: str) -> None:
    """The warm-up promise checked on the CPU through the capture ledger: questions whose last chunk
    is one token or whose chunks force evictions of unusual sizes capture nothing after warm_up
    with the GPU's settings (the CUDA test in test_cuda_graphs checks the real runner)."""
    session = _session(tiny_model_dir, policy, capacity=96, max_chunk=16, max_new_tokens=5, check_evictions=False)
    session.runner = CaptureLedger()
    session.warm_up(evictions=4, repeats=4)
    captured = set(session.runner.graphs)
    assert any(key[0] == "evict" for key in captured) and ("text", 1, False, False) in captured
    lengths = set()
    for i, frame in enumerate(_frames(30, seed=1)):
        session.ingest_frame(frame)
        if i % 3 == 2:
            question = "what is in view ?" + " and then ?" * (i // 3)
            lengths.add(len(session._template_ids(question)) % 16)
            session.answer(question)
    assert 1 in lengths and session.cache.evictions >= 4  # the cases that used to capture
    assert set(session.runner.graphs) == captured


def test_a_reset_begins_a_new_stream_that_awaits_its_first_frame(tiny_model_dir: Path) -> None:
    """After reset() a question is answered from no picture unless a frame comes first; the
    diagnostic counters keep counting across streams."""
    session = _session(tiny_model_dir, "inf-mllm", capacity=256)
    assert session.awaiting_first_frame
    session.ingest_frame(_frames(1)[0], stamp=12.5)
    assert not session.awaiting_first_frame and session.last_frame_stamp == 12.5
    session.reset()
    assert session.awaiting_first_frame and session.last_frame_stamp is None
    assert session.stats.frames_ingested == 1 and session.cache.total_seen == session.cache.length


def test_a_session_without_a_dtype_runs_float32_on_the_cpu_and_half_precision_on_a_gpu(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dtype=None`` (the node's ``dtype: auto``): float32 on the CPU, bfloat16 on a GPU that has
    it, else float16 (on a GPU the node once ran float32 by default, 4.6x slower per token)."""
    from ros_infmllm.session.session import default_dtype

    session = StreamingSession.from_pretrained(tiny_model_dir, capacity=64, max_chunk=16)
    assert default_dtype("cpu") == torch.float32 and session.cache.k.dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype("cuda") == default_dtype("cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype("cuda") == torch.float16
