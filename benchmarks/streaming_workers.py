"""What the quality benchmarks share: a model loaded once per (worker) process, sessions over it
for one policy and capacity, and configurations spread over spawned worker processes (a small
model leaves the GPU idle between its launches, so several streams at once use it better)."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable

import torch

import weight_settings
from session_variants import session_variant
from ros_infmllm.backends import TorchBackend
from ros_infmllm.cache import make_policy
from ros_infmllm.model import locate
from ros_infmllm.model.checkpoint_text import load_tokenizer
from ros_infmllm.session import SessionConfig, StreamingSession, template_for

WORKER: dict[str, Any] = {}


def start_worker(model_path: str, device: str, compile_prefill: bool = False) -> None:
    """Load the model (bf16 on CUDA, fp32 on the CPU) and its tokenizer into this process."""
    files = locate(model_path)
    WORKER.update(files=files, device=device, compile_prefill=compile_prefill, tokenizer=load_tokenizer(files),
                  by_weights={})
    WORKER["model"], WORKER["backend"] = model_and_backend("float")


def model_and_backend(weights: str) -> tuple:
    """This process's model with its projections as ``weights`` (a weight_settings.py name;
    ``float``: the one loaded at start) and its backend, loaded on first use and then kept."""
    if weights not in WORKER["by_weights"]:
        device = WORKER["device"]
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, _ = weight_settings.load(WORKER["files"], weights, device, dtype)
        # no CUDA graphs: a worker makes a session per configuration, and graphs of
        # earlier sessions freed from the shared pool tripped an allocator assertion
        # (torch 2.11, CUDACachingAllocator use_count) in a 12-worker recall run
        backend = TorchBackend(model, cuda_graphs=False, compile_prefill=WORKER["compile_prefill"],
                               compile_decode=False, compile_vision=False)
        WORKER["by_weights"][weights] = model, backend
    return WORKER["by_weights"][weights]


def parse_policy(spec: str) -> tuple[str, dict[str, float]]:
    """``name`` or ``name[option=value,...]`` (a policy with config fields set, for sweeps)."""
    name, _, rest = spec.partition("[")
    options = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = float(value) if "." in value or "e" in value else int(value)
    return name, options


def session(policy: str, capacity: int, chunk: int) -> StreamingSession:
    """A session with no system prompt, freeing one chunk per eviction (evictions validated on
    the CPU, trusted and captured on CUDA). ``policy`` as ``parse_policy`` reads it, optionally
    with a packed-weight suffix (``h2o-kinds+int4-x8``, session_variants.py) and an int8 cache's
    (``+kv8``)."""
    spec, variant = session_variant(policy)
    model, backend = model_and_backend(variant.pop("weights", "float"))
    kv_cache_dtype = variant.pop("kv_cache_dtype", "model")
    if variant:
        raise ValueError(f"{policy}: a text stream takes only weight and cache suffixes, not {sorted(variant)}")
    config = SessionConfig(capacity=capacity, max_chunk=chunk, slack_fraction=chunk / capacity, system_prompt="",
                           check_evictions=model.device.type != "cuda", max_new_tokens=16,
                           kv_cache_dtype=kv_cache_dtype)
    name, options = parse_policy(spec)
    return StreamingSession(model, WORKER["tokenizer"], make_policy(name, **options), config, template_for("qwen2"),
                            backend=backend)


def weight_suffix(spec: str) -> str:
    """The packed-weight setting a policy spec names (``float`` when none)."""
    return session_variant(spec)[1].get("weights", "float")


def with_weights(spec: str, weights: str) -> str:
    """``spec`` with the packed-weight suffix ``weights`` names (none for ``float``): the inverse of
    ``weight_suffix``."""
    return spec if weights == "float" else f"{spec}+{weights}"


def kv_cache_suffix(spec: str) -> str:
    """The cache storage a policy spec names: ``int8`` with ``+kv8``, else ``model``."""
    return session_variant(spec)[1].get("kv_cache_dtype", "model")


def with_kv_cache(spec: str, kv_cache_dtype: str) -> str:
    """``spec`` with the cache suffix ``kv_cache_dtype`` names (none for ``model``)."""
    return spec if kv_cache_dtype == "model" else f"{spec}+kv8"


def unpacked(spec: str) -> str:
    """``spec`` without its packed-weight and cache suffixes: the run a packed one is paired with."""
    parts = spec.split("+")
    return "+".join(parts[:1] + [p for p in parts[1:] if p not in weight_settings.SESSION_SETTINGS and p != "kv8"])


def model_context(model_path: str) -> int:
    """The model's trained context length (a full cache is only measured within it)."""
    from ros_infmllm.model.config import load_config

    files = locate(model_path)
    if files.gguf is not None:
        from ros_infmllm.model.gguf_file import open_gguf
        from ros_infmllm.model.gguf_text import text_config

        return text_config(open_gguf(files.gguf)).max_position_embeddings
    return load_config(files.folder).text.max_position_embeddings


def run_all(task: Callable, jobs: list[tuple], workers: int, model_path: str, device: str,
            compile_prefill: bool = False, report: Callable[[tuple, Any], None] | None = None) -> list:
    """``task(*job)`` for every job, in ``workers`` spawned processes (or here, for one);
    ``report(job, result)`` as each one ends."""
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                                 initargs=(model_path, device, compile_prefill)) as pool:
            futures = {pool.submit(task, *job): i for i, job in enumerate(jobs)}
            results: list = [None] * len(jobs)
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if report:
                    report(jobs[futures[future]], results[futures[future]])
            return results
    start_worker(model_path, device, compile_prefill)
    results = []
    for job in jobs:
        results.append(task(*job))
        if report:
            report(job, results[-1])
    return results
