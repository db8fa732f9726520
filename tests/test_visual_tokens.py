"""Per-frame visual token pooling: the grid arithmetic, and a session that pools its frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ros_infmllm.demo import bundled_model_path
from ros_infmllm.session import StreamingSession
from ros_infmllm.session.visual_tokens import pool_tokens, pooled_count


def test_pooling_averages_grid_cells_in_row_major_order() -> None:
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # a 4x4 grid of one channel
    pooled = pool_tokens(grid, 2)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of each 2x2 block
    assert pooled_count(64, 2) == 16 and pooled_count(64, 3) == 9 and pooled_count(729, 3) == 81
    uneven = pool_tokens(torch.randn(2, 64, 5), 3)  # 8x8 by 3: adaptive 3x3 bins
    assert uneven.shape == (2, 9, 5)
    cells = torch.randn(1, 64, 5)
    corner = cells.reshape(8, 8, 5)[:3, :3].mean((0, 1))  # adaptive bin 0 covers rows/cols 0-2
    assert torch.allclose(pool_tokens(cells, 3)[0, 0], corner, atol=1e-6)
    with pytest.raises(ValueError, match="square token grid"):
        pooled_count(15, 2)
    with pytest.raises(ValueError, match="1..4"):
        pooled_count(64, 5)


def test_a_pooling_session_puts_a_quarter_of_the_tokens_per_frame() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    options = dict(policy="inf-mllm", capacity=256, max_chunk=32)
    plain = StreamingSession.from_pretrained(bundled_model_path(), **options)
    pooled = StreamingSession.from_pretrained(bundled_model_path(), visual_pool=2, **options)
    assert pooled.image_tokens_per_frame == plain.image_tokens_per_frame // 4 == 4
    assert len(plain.frame_ids()) - len(pooled.frame_ids()) == 12
    reference = StreamingSession.from_pretrained(bundled_model_path(), **options)
    for frame in frames:
        start = pooled.cache.length
        pooled.ingest_frame(frame)
        assert pooled.cache.length - start == len(pooled.frame_ids())
        # the same as feeding a plain session the frame's pooled tokens by hand
        reference.feed(pooled.frame_ids(), pool_tokens(plain.encode_frame(frame), 2))
    assert torch.equal(pooled.cache.k[:, :, :pooled.cache.length], reference.cache.k[:, :, :reference.cache.length])
    assert pooled.answer("what is in view ?") == reference.answer("what is in view ?")
    with pytest.raises(ValueError, match="visual token pool"):
        StreamingSession.from_pretrained(bundled_model_path(), visual_pool=5, **options)
