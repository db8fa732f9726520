"""Where the time of one decode token and of one frame goes (a diagnosis aid for bench_gpu.py).

For each model shape of bench_gpu.py, on a session streamed past its capacity (graphs captured):
- decode: the host-timed step (the interval between tokens, as bench_gpu times it), the captured token step's
  GPU time alone (device events around back-to-back replays), and the GPU kernels by total time
  (torch.profiler over a few tokens);
- frame ingest: preprocess, vision tower, the frame's prefill chunks and evictions, each timed
  with a sync around it, and the kernels of a few frames.

Prints a short table; ``--out`` receives one ``profile_<model>.txt`` per model with the kernel
tables (``profile_<model>_<weights>.txt`` with ``--weights int8|int4|q4_0``, ``_kv8`` added over an int8
cache). ``--decode-only`` skips the frame rows; ``--decode-attention FIELD=VALUE`` sets the decode
attention's launch as bench_gpu.py does.
``python benchmarks/profile_gpu.py --models qwen2-1.5b --out /tmp/profile``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from launch_tuning import tuning_for_run
from bench_gpu import FAMILY_SHAPES, SHAPES, StreamDriver, camera_frame, pack_random_model, random_model, \
    shape_tokenizer, write_checkpoint_config
from ros_infmllm.cache import DEFAULT_POLICY, make_policy
from ros_infmllm.cache.kv_codes import KV_CACHE_DTYPES
from ros_infmllm.model.quantized import HEAD_MODES
from ros_infmllm.session import SessionConfig, StreamingSession, template_for
from ros_infmllm.session.preprocess import preprocessor_for_folder


def timed(fn, repeats: int) -> float:
    """Median wall ms of ``fn`` with a device sync on each side."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def replay_ms(session: StreamingSession, repeats: int) -> float:
    """GPU ms of the captured decode step, replayed back to back; the cache's device fill level
    is put back afterwards (the replays wrote past the host's count, into empty slots)."""
    captured = session.runner.graphs[("next", 1, False, False)]
    repeats = min(repeats, session.cache.free - 1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        captured.graph.replay()
    end.record()
    torch.cuda.synchronize()
    session.cache.length_t.fill_(session.cache.length)
    session.cache.seen_t.fill_(session.cache.total_seen)
    return start.elapsed_time(end) / repeats


def kernel_table(fn, rows: int = 60, per: int = 0) -> str:
    """The profiler's table of ``fn``; with ``per``, first the GPU kernels' own time summed per
    ``per`` calls of the step (µs each, largest first), the list a decode step is read from (the
    question's prefill runs first, so its kernels are listed too; under dependent launches a
    kernel's time includes its wait for the one before)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    if not per:
        return table
    kernels = sorted(((e.self_device_time_total / per, e.count / per, e.key) for e in events
                      if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0), reverse=True)
    lines = [f"{us:10.1f} us {calls:6.1f} calls  {name[:90]}" for us, calls, name in kernels]
    total = sum(us for us, _, _ in kernels)
    return "\n".join([f"GPU kernels per step (summed: {total:.1f} us):"] + lines) + "\n\n" + table


def profile_model(name: str, args) -> dict:
    shape = {**SHAPES, **FAMILY_SHAPES}[name]
    folder = write_checkpoint_config(Path(tempfile.mkdtemp()) / name, shape)
    model = random_model(folder, "cuda", torch.bfloat16)
    pack_random_model(model, args.weights, args.lm_head)
    tokenizer = shape_tokenizer(model, shape)
    config = SessionConfig(capacity=args.capacity, max_chunk=args.max_chunk, template="demo", max_new_tokens=8,
                           check_evictions=False, kv_cache_dtype=args.kv_cache)
    session = StreamingSession(model, tokenizer, make_policy(args.policy), config, template_for("demo"),
                               preprocessor_for_folder(folder, model.cfg.vision))
    driver = StreamDriver(session, "cuda", camera_frame(model, shape))
    driver.stream_to(3 * args.capacity)
    driver.decode(16)
    _, steps = driver.decode(128)
    row = {"model": name, "decode_host_p50_ms": statistics.median(steps), "decode_replay_ms": replay_ms(session, 64)}
    question = driver.question_ids()
    decode_kernels = kernel_table(lambda: list(session.tokens(question, 10)), per=10)
    frame_kernels = "" if args.decode_only else frame_rows(row, session, driver, model)
    row["graphs"] = sorted(str(k) for k in session.runner.graphs)
    suffix = ("" if args.weights == "float" else f"_{args.weights}") + ("_kv8" if args.kv_cache == "int8" else "")
    _write(args.out, name, suffix, row, decode_kernels, frame_kernels)
    del session, model
    torch.cuda.empty_cache()
    return row


def frame_rows(row: dict, session: StreamingSession, driver: StreamDriver, model) -> str:
    """One frame's preprocess, tower, prefill, evictions and ingest timed into ``row``; the kernel
    table of three frames returned."""
    frame = driver.frames[0]
    row["preprocess_ms"] = timed(lambda: session.preprocessor(frame, model.device), 10)
    pixels = session.preprocessor(frame, model.device)
    row["vision_ms"] = timed(lambda: session.backend.encode_images(pixels), 10)
    ids, features, offsets = session.frame_inputs(frame)  # M-RoPE models: the frame's position offsets too
    driver.eviction_ms.clear()
    prefill = timed(lambda: session.feed(ids, features, position_offsets=offsets), 20)
    row["prefill_ms"] = prefill
    row["evictions_per_frame"] = len(driver.eviction_ms) / 20
    row["eviction_p50_ms"] = statistics.median(driver.eviction_ms) if driver.eviction_ms else 0.0
    row["ingest_ms"] = timed(lambda: session.ingest_frame(frame), 10)
    return kernel_table(lambda: [session.ingest_frame(frame) for _ in range(3)])


def _write(out: Path | None, name: str, suffix: str, row: dict, decode_kernels: str, frame_kernels: str) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        frames = f"\n\n# 3 frames\n{frame_kernels}" if frame_kernels else ""
        (out / f"profile_{name}{suffix}.txt").write_text(f"{row}\n\n# 10 decode tokens\n{decode_kernels}{frames}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), help=f"also: {', '.join(FAMILY_SHAPES)}")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--max-chunk", type=int, default=1024)
    parser.add_argument("--weights", choices=("float", "int8", "int4", "q4_0"), default="float",
                        help="decoder projections")
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="model", help="the K/V cache's dtype")
    parser.add_argument("--decode-attention", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="decode_attention.DecodeKernelTuning fields for this run")
    parser.add_argument("--matvec", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="decode_linear.TUNING fields for this run (pdl=false: kernel times that do not overlap)")
    parser.add_argument("--decode-only", action="store_true", help="the decode rows only (no frame ingest)")
    parser.add_argument("--lm-head", choices=HEAD_MODES, default="float")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from ros_infmllm.model import decode_attention, decode_linear

    with tuning_for_run(parser, decode_attention.TUNING, args.decode_attention, "--decode-attention"), \
            tuning_for_run(parser, decode_linear.TUNING, args.matvec):
        rows = [profile_model(name, args) for name in args.models]
    columns = ["model", "decode_host_p50_ms", "decode_replay_ms"] + ([] if args.decode_only else [
        "preprocess_ms", "vision_ms", "prefill_ms", "evictions_per_frame", "eviction_p50_ms", "ingest_ms"])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
        print("   graphs:", row["graphs"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
