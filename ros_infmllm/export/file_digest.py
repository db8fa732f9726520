"""SHA-256 of checkpoint files, computed once per file version.

An exported backend checks at every start that its graphs were made from the checkpoint it is
given; hashing a 7B checkpoint reads about 14 GB. A file's digest is therefore remembered in a
small JSON cache keyed by its absolute path, size and modification time (nanoseconds), and read
again only when one of those changes. The cache lives in ``$ROS_INFMLLM_CACHE`` or
``$XDG_CACHE_HOME/ros_infmllm`` (``~/.cache/ros_infmllm``); a cache that cannot be read or
written is ignored (the digest is then computed each time, never trusted without a match).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_FILE = "file_sha256.json"
BLOCK = 1 << 24


def cache_dir() -> Path:
    if os.environ.get("ROS_INFMLLM_CACHE"):
        return Path(os.environ["ROS_INFMLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ros_infmllm"


def _key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict[str, str]) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
            json.dump(entries, handle)
        os.replace(handle.name, folder / CACHE_FILE)
    except OSError:
        pass  # a read-only home: digests are simply computed again next time


def file_sha256(paths: list[Path]) -> list[str]:
    """Hex digests of ``paths``, from the cache where a file is unchanged since it was hashed."""
    cache = _read_cache()
    digests, changed = [], False
    for path in paths:
        key = _key(path)
        digest = cache.get(key)
        if digest is None:
            hasher = hashlib.sha256()
            with path.open("rb") as stream:
                for block in iter(lambda: stream.read(BLOCK), b""):
                    hasher.update(block)
            digest = cache[key] = hasher.hexdigest()
            changed = True
        digests.append(digest)
    if changed:
        _write_cache(cache)
    return digests
