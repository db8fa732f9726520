"""Freed heap memory handed back to the system while a model loads (glibc's ``malloc_trim``).

Why: a load makes and frees many large temporaries (a tensor's dequantized pieces, unpacked
codes). glibc keeps freed heap pages resident for reuse, and past its adaptive mmap threshold even
allocations of tens of MB come from the heap, so the process's resident memory grows by what the
load freed, not only by what it holds: a Qwen2-1.5B Q4_0 GGUF under ``weights: auto`` ended its
load holding about 440 MB of freed pages beside its 1.15 GB model
(benchmarks/results/load_memory_1.5b_trim_cpu.md). On a Jetson that memory is the GPU's.
Handing pages back costs page faults when the next tensors reuse them (after every tensor, a
Qwen2-1.5B load rounded to int8 took 1.5x the time on this CPU), so a load releases them each
time its anonymous memory has grown by a step (``HeapReleaser``) and once at its end. Elsewhere
(musl, macOS, Windows) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

RELEASE_STEP = 256 << 20  # anonymous-memory growth (bytes) between two releases during a load


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


def anonymous_bytes() -> Optional[int]:
    """The process's resident anonymous memory (Linux ``/proc/self/status`` RssAnon), or None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"RssAnon:\s+(\d+) kB", text)
    return None if found is None else int(found.group(1)) * 1024


class HeapReleaser:
    """Called after each tensor a load reads: releases freed heap pages once the process's
    anonymous memory has grown by ``step`` bytes since the last release. Growth that is the model
    itself triggers a release too, which then finds little to hand back; freed temporaries that
    glibc reuses do not grow it, so the steady case costs a status read per tensor."""

    def __init__(self, step: int = RELEASE_STEP) -> None:
        self.step = step
        self.mark = anonymous_bytes() if _malloc_trim() is not None else None

    def __call__(self) -> bool:
        """Whether pages were handed back now."""
        if self.mark is None:
            return False
        now = anonymous_bytes()
        if now is None or now - self.mark < self.step:
            return False
        released = release_freed_heap()
        self.mark = anonymous_bytes() or now
        return released
