"""Shared fixtures: small random checkpoints saved once per test session."""
from __future__ import annotations

import os
import sys
import tempfile
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


@pytest.fixture(scope="session")
def head16_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA with 16-wide attention heads: the smallest the Triton decode attention takes."""
    path = tmp_path_factory.mktemp("head16_llava")
    build_tiny_llava(path, TinySpec(extra_text={"hidden_size": 64, "intermediate_size": 128}))
    return path


def _isolate_dds() -> None:
    """Keep DDS traffic of this test run on this machine and off other runs' domains."""
    os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")


_isolate_dds()
# checkpoint digests (export/file_digest.py) cached in a folder of this run, not the user's cache
os.environ.setdefault("ROS_INFMLLM_CACHE", tempfile.mkdtemp(prefix="infmllm-cache-"))


@pytest.fixture(scope="module")
def ros_context():
    """rclpy initialised for the module's tests, shut down after."""
    import rclpy

    rclpy.init()
    yield
    rclpy.try_shutdown()
