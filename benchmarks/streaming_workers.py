"""What the quality benchmarks share: a model loaded once per (worker) process, sessions over it
for one policy and capacity, and configurations spread over spawned worker processes (a small
model leaves the GPU idle between its launches, so several streams at once use it better)."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable

import torch

from ros_infmllm.backends import TorchBackend
from ros_infmllm.cache import make_policy
from ros_infmllm.model import load_model, locate
from ros_infmllm.model.checkpoint_text import load_tokenizer
from ros_infmllm.session import SessionConfig, StreamingSession, template_for

WORKER: dict[str, Any] = {}


def start_worker(model_path: str, device: str, compile_prefill: bool = False) -> None:
    """Load the model (bf16 on CUDA, fp32 on the CPU) and its tokenizer into this process."""
    files = locate(model_path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(files, device=device, dtype=dtype)
    WORKER.update(model=model, tokenizer=load_tokenizer(files),
                  # no CUDA graphs: a worker makes a session per configuration, and graphs of
                  # earlier sessions freed from the shared pool tripped an allocator assertion
                  # (torch 2.11, CUDACachingAllocator use_count) in a 12-worker recall run
                  backend=TorchBackend(model, cuda_graphs=False, compile_prefill=compile_prefill,
                                       compile_decode=False, compile_vision=False))


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
    the CPU, trusted and captured on CUDA). ``policy`` as ``parse_policy`` reads it."""
    model = WORKER["model"]
    config = SessionConfig(capacity=capacity, max_chunk=chunk, slack_fraction=chunk / capacity, system_prompt="",
                           check_evictions=model.device.type != "cuda", max_new_tokens=16)
    name, options = parse_policy(policy)
    return StreamingSession(model, WORKER["tokenizer"], make_policy(name, **options), config, template_for("qwen2"),
                            backend=WORKER["backend"])


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
