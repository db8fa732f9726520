"""Checkpoint digests are computed once per file version (size, modification time)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ros_infmllm.export import file_digest


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("ROS_INFMLLM_CACHE", str(folder))
    return folder


def test_an_unchanged_file_is_not_read_again(tmp_path: Path, cache: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    (first,) = file_digest.file_sha256([weights])
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and (cache / file_digest.CACHE_FILE).is_file()
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size; put the old modification time back
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest.file_sha256([weights]) == [first]  # from the cache: the file was not read


def test_a_changed_file_is_hashed_again(tmp_path: Path, cache: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    (first,) = file_digest.file_sha256([weights])
    weights.write_bytes(b"a" * 999 + b"c")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert file_digest.file_sha256([weights]) == [hashlib.sha256(b"a" * 999 + b"c").hexdigest()] != [first]


def test_an_unusable_cache_still_gives_true_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("ROS_INFMLLM_CACHE", str(blocker))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"xyz")
    assert file_digest.file_sha256([weights]) == [hashlib.sha256(b"xyz").hexdigest()]
    (blocker.parent / "corrupt").mkdir()
    (blocker.parent / "corrupt" / file_digest.CACHE_FILE).write_text("{not json")
    monkeypatch.setenv("ROS_INFMLLM_CACHE", str(blocker.parent / "corrupt"))
    assert file_digest.file_sha256([weights]) == [hashlib.sha256(b"xyz").hexdigest()]
