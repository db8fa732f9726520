"""Freed heap memory handed back to the system while a model loads (glibc's ``malloc_trim``).

Why: a load makes and frees many large temporaries (a tensor's dequantized pieces, unpacked
codes). glibc keeps freed heap pages resident for reuse, and past its adaptive mmap threshold even
allocations of tens of MB come from the heap, so the process's resident memory grows by what the
load freed, not only by what it holds: a Qwen2-1.5B Q4_0 GGUF under ``weights: auto`` ended its
load holding about 440 MB of freed pages beside its 1.15 GB model (benchmarks/results/
load_memory_trim_cpu.md). On a Jetson that memory is the GPU's. Handing it back after each tensor
keeps a load's peak near what is live. Elsewhere (musl, macOS, Windows) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Callable, Optional


@lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_heap() -> bool:
    """Return the heap's free pages to the system; whether any were (False where unsupported)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
