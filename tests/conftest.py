"""Shared fixtures: small random checkpoints saved once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builders import TinySpec, build_tiny_llava  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SigLIP + Qwen2 (GQA) tiny LLaVA, 15 visual tokens per frame."""
    path = tmp_path_factory.mktemp("tiny_llava")
    build_tiny_llava(path, TinySpec())
    return path


@pytest.fixture(scope="session")
def one_layer_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoder layer: its K/V depend only on each token and its position, so a forward over
    the kept tokens alone is the exact reference after an eviction."""
    path = tmp_path_factory.mktemp("one_layer_llava")
    build_tiny_llava(path, TinySpec(layers=1, seed=3))
    return path
