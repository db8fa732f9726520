"""Captured session steps (decode, frame chunks, evictions) equal eager execution (needs a GPU; CI
has none, the GPU machine runs it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ros_infmllm.backends import TorchBackend
from ros_infmllm.cache import make_policy
from ros_infmllm.model import load_model
from ros_infmllm.session import SessionConfig, StreamingSession, template_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _session(model, tokenizer, graphs: bool, policy: str, **options) -> StreamingSession:
    config = SessionConfig(capacity=96, max_chunk=16, template="demo", max_new_tokens=6, check_evictions=False,
                           **options)
    return StreamingSession(model, tokenizer, make_policy(policy), config, template_for("demo"),
                            backend=TorchBackend(model, cuda_graphs=graphs))


def _stream_side_by_side(eager: StreamingSession, graphed: StreamingSession, frames: np.ndarray, tokens: int) -> None:
    """Each frame into both sessions, then ``tokens`` greedy steps each: the logits agree at every step."""
    for i, frame in enumerate(frames):
        for session in (eager, graphed):
            session.ingest_frame(frame)
        token = torch.tensor([5 + i])
        for _ in range(tokens):
            a, b = eager.feed(token), graphed.feed(token)
            assert (a - b).abs().max() <= 1e-4
            token = a.argmax().view(1).cpu()


@pytest.mark.parametrize("policy", ["inf-mllm", "h2o", "streamingllm", "inf-mllm-paper", "inf-mllm-lt", "look-m",
                                    "h2o-kinds"])
def test_graph_replay_gives_the_eager_logits_through_evictions(head16_model_dir: Path, policy: str) -> None:
    """Compiled blocks, the Triton decode attention and captured steps against plain eager calls."""
    from tokenizers import Tokenizer

    model = load_model(head16_model_dir, device="cuda")
    tokenizer = Tokenizer.from_file(str(head16_model_dir / "tokenizer.json"))
    eager, graphed = _session(model, tokenizer, False, policy), _session(model, tokenizer, True, policy)
    assert graphed.backend.decode_kernel
    _stream_side_by_side(eager, graphed, np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), 4)
    kinds = {key[0] for key in graphed.runner.graphs}
    assert graphed.cache.evictions > 3 and kinds == {"text", "frame", "evict"}, graphed.runner.graphs.keys()
    assert (graphed.cache.length, graphed.cache.total_seen) == (eager.cache.length, eager.cache.total_seen)
    assert int(graphed.cache.length_t) == graphed.cache.length and int(graphed.cache.seen_t) == graphed.cache.total_seen
    assert torch.equal(eager.cache.origin, graphed.cache.origin)
    assert torch.allclose(eager.cache.k, graphed.cache.k, atol=1e-5)
    graphed.reset()  # captured steps keep working on the reset cache and policy state
    eager.reset()
    token = torch.tensor([7])
    assert (eager.feed(token) - graphed.feed(token)).abs().max() <= 1e-4


@pytest.mark.parametrize("kv_cache_dtype", ["model", "int8"])
def test_o_projs_codes_from_the_attention_replay_with_the_eager_logits(head16_model_dir: Path,
                                                                         kv_cache_dtype: str) -> None:
    """int4 projections with o_proj in groups of 16 (a head's width here), so the captured decode
    step takes o_proj's x codes from the attention's combine launch (``decode_attention_codes``)
    instead of a rounding launch: replays give the eager logits through evictions."""
    from tokenizers import Tokenizer

    from ros_infmllm.model import decode_linear
    from ros_infmllm.model.quantized import QuantizedLinear, linear_operands

    model = load_model(head16_model_dir, device="cuda", weights="int4")
    for block in model.decoder.layers:
        o_proj = block.self_attn.o_proj
        block.self_attn.o_proj = QuantizedLinear.from_float(o_proj.dequantized(), o_proj.bias, "int4", group=16)
    tokenizer = Tokenizer.from_file(str(head16_model_dir / "tokenizer.json"))
    eager, graphed = (_session(model, tokenizer, graphs, "h2o-kinds", kv_cache_dtype=kv_cache_dtype)
                      for graphs in (False, True))
    block = model.decoder.layers[0]
    o_weight, _, o_packing = linear_operands(block.self_attn.o_proj)
    assert decode_linear.TUNING.fused_x_codes and block._o_codes_group(o_weight, o_packing, 4) == 16
    _stream_side_by_side(eager, graphed, np.random.default_rng(3).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), 4)
    assert graphed.cache.evictions > 3 and "text" in {key[0] for key in graphed.runner.graphs}


@pytest.mark.parametrize("policy", ["h2o", "streamingllm"])
def test_a_staged_drop_stream_replays_with_the_eager_logits(head16_model_dir: Path, policy: str) -> None:
    """Frame chunks with a staged visual-token drop (per-layer masks and drop marks) captured and
    replayed: the same logits, the same per-layer live counts and drop marks as eager steps."""
    from tokenizers import Tokenizer

    model = load_model(head16_model_dir, device="cuda")
    tokenizer = Tokenizer.from_file(str(head16_model_dir / "tokenizer.json"))
    layers = model.cfg.text.num_layers
    eager, graphed = (_session(model, tokenizer, graphs, policy, drop_layers=(layers // 2,)) for graphs in (False, True))
    frames = np.random.default_rng(1).integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    _stream_side_by_side(eager, graphed, frames[:12], 3)
    assert graphed.cache.evictions > 3 and any(key[0] == "frame" and "drop" in key for key in graphed.runner.graphs)
    for session in (eager, graphed):  # a last frame: its drop marks are not yet evicted, so layers differ
        session.ingest_frame(frames[12])
    assert graphed.cache.live_counts() == eager.cache.live_counts() and len(set(eager.cache.live_counts())) > 1
    assert torch.equal(eager.cache.dropped, graphed.cache.dropped)


@pytest.mark.parametrize("policy", ["h2o-kinds", "look-m"])
def test_an_int8_cache_stream_replays_with_the_eager_logits(head16_model_dir: Path, policy: str) -> None:
    """An int8 K/V cache under captured steps: the scales and read tables are buffers the graphs
    read in place, evictions (and LOOK-M's merge) rewrite them in place, so replays give the
    eager logits and the same codes within one rounding step."""
    from tokenizers import Tokenizer

    model = load_model(head16_model_dir, device="cuda")
    tokenizer = Tokenizer.from_file(str(head16_model_dir / "tokenizer.json"))
    eager, graphed = (_session(model, tokenizer, graphs, policy, kv_cache_dtype="int8") for graphs in (False, True))
    assert graphed.cache.quantized and graphed.backend.decode_kernel
    _stream_side_by_side(eager, graphed, np.random.default_rng(2).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), 4)
    assert graphed.cache.evictions > 3 and {key[0] for key in graphed.runner.graphs} == {"text", "frame", "evict"}
    assert (graphed.cache.length, graphed.cache.total_seen) == (eager.cache.length, eager.cache.total_seen)
    assert torch.equal(eager.cache.origin, graphed.cache.origin)
    length = eager.cache.length
    codes = (eager.cache.k[:, :, :length].int() - graphed.cache.k[:, :, :length].int()).abs()
    assert int(codes.max()) <= 1, int(codes.max())
    assert torch.allclose(eager.cache.k_scale, graphed.cache.k_scale, rtol=1e-3, atol=1e-6)


def test_graphed_vision_encoder_equals_eager(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, device="cuda")
    backend = TorchBackend(model)
    for _ in range(4):  # two eager warm-up calls, then capture and replay
        pixels = torch.randn(1, 3, 32, 32, device="cuda")
        assert (backend.encode_images(pixels) - model.encode_images(pixels)).abs().max() <= 1e-5
    assert ("vision", (1, 3, 32, 32)) in backend.vision_runner.graphs, backend.vision_runner.capture_errors


def test_device_fed_greedy_decode_is_captured_and_equals_eager(head16_model_dir: Path) -> None:
    """``tokens``' device-fed greedy step, captured, gives the tokens of the eager host-fed loop."""
    from tokenizers import Tokenizer

    model = load_model(head16_model_dir, device="cuda")
    tokenizer = Tokenizer.from_file(str(head16_model_dir / "tokenizer.json"))
    eager, graphed = _session(model, tokenizer, False, "inf-mllm"), _session(model, tokenizer, True, "inf-mllm")
    assert all(block.decode_matvec for block in model.decoder.layers)
    frames = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for frame in frames:
        for session in (eager, graphed):
            session.ingest_frame(frame)
    ids = graphed._query_ids("what is in view ?")
    produced = list(graphed.tokens(ids, 60))
    logits, expected = eager.feed(ids), []
    for _ in range(60):
        expected.append(int(logits.argmax()))
        logits = eager.feed(torch.tensor([expected[-1]]))
    assert produced == expected
    assert ("next", 1, False, False) in graphed.runner.graphs and graphed.cache.evictions > 0
    assert torch.allclose(eager.cache.k, graphed.cache.k, atol=1e-4)


def test_after_warm_up_a_stream_compiles_and_captures_nothing(head16_model_dir: Path) -> None:
    """The node's warm-up promise: once warm_up() returns, frames, questions and evictions replay
    what it captured: no new CUDA graph, no new torch.compile frame."""
    from tokenizers import Tokenizer
    from torch._dynamo.utils import counters

    model = load_model(head16_model_dir, device="cuda")
    tokenizer = Tokenizer.from_file(str(head16_model_dir / "tokenizer.json"))
    session = _session(model, tokenizer, True, "inf-mllm")
    session.warm_up()
    graphs = (set(session.runner.graphs), set(session.backend.vision_runner.graphs))
    compiled = counters["stats"]["unique_graphs"]
    frames = np.random.default_rng(1).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        session.ingest_frame(frame)
        if i % 5 == 4:
            session.answer("a question of a length not seen in warm-up" if i % 10 else "short", max_new_tokens=5)
    assert session.cache.evictions >= 2
    assert (set(session.runner.graphs), set(session.backend.vision_runner.graphs)) == graphs
    assert counters["stats"]["unique_graphs"] == compiled


def test_a_failed_capture_falls_back_to_eager_and_leaves_the_pool_usable() -> None:
    """A function that cannot be captured (it syncs the host) runs eagerly with its right result
    (after one retry); the runner says why and still captures other keys into the same pool (the
    failed capture left no pool recording); a capture survives another thread's CUDA work meanwhile."""
    import threading

    from ros_infmllm.backends.graph_runner import CudaGraphRunner

    device = torch.device("cuda")
    runner = CudaGraphRunner(device, warmups=1)
    x = torch.arange(6.0, device=device)

    def host_sync(t: torch.Tensor) -> torch.Tensor:
        return t * float(t.sum().item())  # .item() is illegal inside a capture

    results = [runner("bad", host_sync, (x,)) for _ in range(4)]  # eager, capture, eager again, retry
    assert all(torch.equal(r, x * 15.0) for r in results)
    assert runner.capture_error and "'bad'" in runner.capture_error and "it runs eagerly" in runner.capture_error
    assert not runner.graphs and runner.book.failures == {"bad": 2}  # captured twice (one retry), then eager
    assert set(runner.capture_errors) == {"bad"}  # each failed key keeps its first reason
    assert all(torch.equal(runner("other", lambda t: t + 1, (x,)), x + 1) for _ in range(3))
    assert "other" in runner.graphs and "bad" not in runner.graphs  # other keys are still captured
    assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)  # the stream put back
    assert torch.randn(4, device=device).isfinite().all()  # the CUDA generator is out of capture mode

    fresh = CudaGraphRunner(device, warmups=1)
    stop = threading.Event()

    def other_thread() -> None:  # allocations and copies from another thread while capturing
        while not stop.is_set():
            torch.randn(1 << 16, device=device).sum().item()

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        for _ in range(4):
            out = fresh("double", lambda t: t * 2, (x,))
    finally:
        stop.set()
        worker.join()
    assert fresh.capture_error is None and "double" in fresh.graphs
    assert torch.equal(out, x * 2)


@pytest.mark.parametrize("kv_cache_dtype", ["model", "int8"])
def test_a_qwen2_5_vl_stream_replays_with_the_eager_logits(tmp_path: Path, kv_cache_dtype: str) -> None:
    """Qwen2.5-VL on the GPU: the windowed tower captured per frame size, frame chunks with their
    M-RoPE offsets as a captured input, decode through the Triton kernels, evictions: all equal
    eager calls, over a float cache and over an int8 one (M-RoPE keys stored turned by their offsets)."""
    from builders import build_tiny_qwen2_vl
    from tokenizers import Tokenizer

    build_tiny_qwen2_vl(tmp_path, "qwen2_5_vl")
    model = load_model(tmp_path, device="cuda")
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    eager, graphed = (_session(model, tokenizer, graphs, "h2o", kv_cache_dtype=kv_cache_dtype)
                      for graphs in (False, True))
    _stream_side_by_side(eager, graphed, np.random.default_rng(0).integers(0, 256, (10, 30, 44, 3), dtype=np.uint8), 3)
    assert graphed.cache.evictions > 2 and any(key[-1] == "mrope" for key in graphed.runner.graphs)
    assert torch.allclose(eager.cache.k, graphed.cache.k, atol=1e-5)


def _fill_gpu_memory() -> list[torch.Tensor]:
    """Tensors holding every byte the caching allocator can still get, so the next allocation
    raises a real ``torch.cuda.OutOfMemoryError`` (the caller drops them)."""
    torch.cuda.empty_cache()
    ballast, size = [], 1 << 30
    while size >= 512:
        try:
            ballast.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            size //= 2
    return ballast


def test_a_real_out_of_memory_in_a_frame_leaves_the_cache_as_before(tiny_model_dir: Path) -> None:
    """Issue 16's fault case on the GPU: a frame runs out of device memory (every byte taken by
    ballast), the error reaches the caller, the cache is as before the frame, and once memory
    is back the stream goes on exactly as a session that never saw the failed frame."""
    from tokenizers import Tokenizer

    model = load_model(tiny_model_dir, device="cuda")
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    failing, clean = _session(model, tokenizer, False, "h2o"), _session(model, tokenizer, False, "h2o")
    frames = np.random.default_rng(8).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for frame in frames[:2]:
        failing.ingest_frame(frame)
        clean.ingest_frame(frame)
    cache = failing.cache
    before = (cache.length, cache.total_seen)
    kept = [t[..., :cache.length, :].clone() for t in (cache.k, cache.v)]
    ballast = _fill_gpu_memory()
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            failing.ingest_frame(frames[2])
    finally:
        del ballast
        torch.cuda.empty_cache()
    assert (cache.length, cache.total_seen) == before == (int(cache.length_t), int(cache.seen_t))
    assert all(torch.equal(t[..., :cache.length, :], k) for t, k in zip((cache.k, cache.v), kept))
    failing.ingest_frame(frames[3])
    clean.ingest_frame(frames[3])
    assert torch.equal(cache.k[..., :cache.length, :], clean.cache.k[..., :clean.cache.length, :])
    assert failing.answer("what is in view ?") == clean.answer("what is in view ?")
