"""Freed heap pages handed back while a model loads (model/freed_heap.py)."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from ros_infmllm.model import freed_heap


def _anon_kib() -> int:
    return int(re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


@pytest.mark.skipif(freed_heap._malloc_trim() is None or not Path("/proc/self/status").is_file(),
                    reason="glibc's malloc_trim and /proc: Linux with glibc only")
def test_freed_pages_in_the_middle_of_the_heap_go_back_to_the_system() -> None:
    """Chunks under the mmap threshold come from the heap; freed between small live ones they stay
    resident (glibc can trim only the top by itself) until release_freed_heap hands them back."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    big, pins = [], []
    for _ in range(400):  # 400 x 64 KB, each touched, each followed by a live 8 KB chunk
        chunk = libc.malloc(64 << 10)
        ctypes.memset(chunk, 1, 64 << 10)
        big.append(chunk)
        pins.append(libc.malloc(8 << 10))
    before = _anon_kib()
    for chunk in big:
        libc.free(chunk)
    held = _anon_kib()
    assert freed_heap.release_freed_heap()
    after = _anon_kib()
    for pin in pins:
        libc.free(pin)
    assert held - after > 16 << 10, (before, held, after)  # most of the 25 MB freed is returned


def test_a_gguf_load_hands_back_freed_pages_after_each_tensor(tmp_path: Path, monkeypatch) -> None:
    """The GGUF loader trims after every tensor it packs or copies, and load_model once more at the end."""
    from builders import build_tiny_causal_lm
    from gguf_builders import write_text_gguf
    from ros_infmllm.model import checkpoint, gguf_loader, load_model

    source = build_tiny_causal_lm(tmp_path / "hf", "qwen2", kv_heads=2, seed=4)
    file = write_text_gguf(tmp_path / "m.gguf", source.config, source.state_dict(), "Q4_0", seed=3)
    calls: list[str] = []
    monkeypatch.setattr(gguf_loader, "release_freed_heap", lambda: calls.append("gguf"))
    monkeypatch.setattr(checkpoint, "release_freed_heap", lambda: calls.append("end"))
    load_model(file, weights="auto")
    tensors = len(gguf_loader.open_gguf(file).tensors)
    assert calls.count("gguf") == tensors and calls[-1] == "end"
