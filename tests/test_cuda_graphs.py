"""The CUDA-graph decode path equals eager execution (needs a GPU; CI has none, the GPU machine runs it)."""
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


def _session(model, tokenizer, graphs: bool) -> StreamingSession:
    config = SessionConfig(capacity=96, max_chunk=16, template="demo", max_new_tokens=6, check_evictions=False)
    return StreamingSession(model, tokenizer, make_policy("inf-mllm"), config, template_for("demo"),
                            backend=TorchBackend(model, cuda_graphs=graphs))


def test_graph_replay_gives_the_eager_logits_through_evictions(tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    model = load_model(tiny_model_dir, device="cuda")
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    eager, graphed = _session(model, tokenizer, False), _session(model, tokenizer, True)
    frames = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        for session in (eager, graphed):
            session.ingest_frame(frame)
        token = torch.tensor([5 + i])
        for _ in range(4):
            a, b = eager.feed(token), graphed.feed(token)
            assert (a - b).abs().max() <= 1e-4
            token = a.argmax().view(1).cpu()
    assert graphed.cache.evictions > 2 and (1, 32) in graphed.backend.graphs
    assert torch.allclose(eager.cache.k, graphed.cache.k, atol=1e-5)


def test_graphed_vision_encoder_equals_eager(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, device="cuda")
    backend = TorchBackend(model)
    pixels = torch.randn(1, 3, 32, 32, device="cuda")
    for _ in range(2):  # the second call replays the captured graph
        assert (backend.encode_images(pixels) - model.encode_images(pixels)).abs().max() <= 1e-5
    assert (1, 3, 32, 32) in backend._vision
