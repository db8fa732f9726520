"""Freed heap pages handed back while a model loads (model/freed_heap.py)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from ros_infmllm.model import freed_heap


GLIBC_LINUX = pytest.mark.skipif(freed_heap._malloc_trim() is None or freed_heap.anonymous_bytes() is None,
                                 reason="glibc's malloc_trim and /proc: Linux with glibc only")


def _fragment(libc, chunks: int = 400) -> list[int]:
    """Touched 64 KB heap chunks, each followed by a live 8 KB one; frees the big ones and returns
    the small ones (to free after): about 25 MB of free pages in the middle of the heap, which glibc
    keeps resident (it trims only the top by itself)."""
    big, pins = [], []
    for _ in range(chunks):
        chunk = libc.malloc(64 << 10)
        ctypes.memset(chunk, 1, 64 << 10)
        big.append(chunk)
        pins.append(libc.malloc(8 << 10))
    for chunk in big:
        libc.free(chunk)
    return pins


def _libc():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


@GLIBC_LINUX
def test_freed_pages_in_the_middle_of_the_heap_go_back_to_the_system() -> None:
    libc = _libc()
    pins = _fragment(libc)
    held = freed_heap.anonymous_bytes()
    assert freed_heap.release_freed_heap()
    after = freed_heap.anonymous_bytes()
    for pin in pins:
        libc.free(pin)
    assert held - after > 16 << 20, (held, after)  # most of the 25 MB freed is returned


@GLIBC_LINUX
def test_a_releaser_hands_pages_back_only_past_its_step_of_growth() -> None:
    """Below the step nothing is trimmed (the next tensors reuse the pages without faults); past
    it the freed pages go back and the mark moves to what is resident then."""
    libc = _libc()
    patient, eager = freed_heap.HeapReleaser(step=1 << 40), freed_heap.HeapReleaser(step=8 << 20)
    pins = _fragment(libc)
    held = freed_heap.anonymous_bytes()
    assert not patient()
    assert freed_heap.anonymous_bytes() - held < 4 << 20  # nothing handed back
    assert eager()  # 25 MB grown since it was made
    assert held - eager.mark > 16 << 20
    assert not eager()  # no growth since
    for pin in pins:
        libc.free(pin)


def test_a_gguf_load_offers_a_release_after_each_tensor(tmp_path: Path, monkeypatch) -> None:
    """The GGUF loader calls its releaser after every tensor it packs or copies, and load_model
    releases once more at the end (a GPU load's CPU copies are freed just before)."""
    from builders import build_tiny_causal_lm
    from gguf_builders import write_text_gguf
    from ros_infmllm.model import checkpoint, gguf_loader, load_model

    source = build_tiny_causal_lm(tmp_path / "hf", "qwen2", kv_heads=2, seed=4)
    file = write_text_gguf(tmp_path / "m.gguf", source.config, source.state_dict(), "Q4_0", seed=3)
    calls: list[str] = []

    class Counting:
        def __call__(self) -> bool:
            calls.append("tensor")
            return False

    monkeypatch.setattr(gguf_loader, "HeapReleaser", Counting)
    monkeypatch.setattr(checkpoint, "release_freed_heap", lambda: calls.append("end"))
    load_model(file, weights="auto")
    tensors = len(gguf_loader.open_gguf(file).tensors)
    assert calls.count("tensor") == tensors and calls[-1] == "end"
