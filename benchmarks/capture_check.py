"""Whether the node's session captures its CUDA graphs, without ROS: the session the node's
parameters describe (``ros_infmllm.ros.session_factory.build_session``), its warm-up, then a stream
of 640x480 camera frames with a question every few frames, as the node's worker runs them, but in
one thread. Reports the graphs captured after warm-up and at the end, every failed capture with its
reason, and the calls per step kind.

Why: in the bf16 node run on the H200 (results/bench_node_qwen2-1.5b_bf16_h200.md) the capture of
a frame chunk failed, while a session-level check on a tiny model captured everything. This runs
the node's own session for the real shape with no ROS threads, so a failure here is the session's
and a clean run points at the node's threads. It also checks the graph runner's per-key fallback.

GPU: ``python benchmarks/capture_check.py --model qwen2-1.5b --device cuda --out $OUT`` (the bench_node
random checkpoint of that shape, written under ``--work`` if missing). CPU: ``--smoke`` (the tiny
bundled model, eager: checks the script). Results: ``benchmarks/results/<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from bench_node import QUESTIONS, model_path
from results_files import save_report
from ros_infmllm.cache import DEFAULT_POLICY
from ros_infmllm.ros import params as P
from ros_infmllm.ros.session_factory import build_session

RESULTS = Path(__file__).resolve().parent / "results"


def camera_rgb(size: tuple[int, int], count: int) -> list[np.ndarray]:
    """Synthetic busy-table frames at the camera's (width, height), RGB."""
    import cv2

    from ros_infmllm.demo.world import BUSY_TABLE, scene_stream

    return [cv2.resize(frame.image, size, interpolation=cv2.INTER_LINEAR)
            for frame in scene_stream(5, count, 1, 128, 128, BUSY_TABLE)]


def run(args: argparse.Namespace) -> dict:
    values = {spec.name: spec.default for spec in P.PARAMS}
    values.update({"model_path": model_path(args.model, args.work), "device": args.device, "dtype": args.dtype,
                   "policy": args.policy, "capacity": args.capacity, "max_chunk": args.max_chunk,
                   "max_new_tokens": args.max_new_tokens, "weights": args.weights})
    session = build_session(values)
    runner = session.runner
    started = time.monotonic()
    session.warm_up()
    warm_up_s = time.monotonic() - started
    after_warm_up = sorted(map(repr, runner.graphs))
    error_after_warm_up = runner.capture_error
    frames = camera_rgb((640, 480), 16)
    answers = 0
    for i in range(args.frames):
        session.ingest_frame(frames[i % len(frames)])
        if i % args.question_every == args.question_every - 1:
            session.answer(QUESTIONS[answers % len(QUESTIONS)])
            answers += 1
    book = getattr(runner, "book", None)
    calls = collections.Counter()
    for key, count in (book.calls.items() if book else ()):
        calls[repr(key[:2]) if isinstance(key, tuple) else repr(key)] += count
    return {"model": args.model, "device": args.device, "dtype": str(session.model.dtype).removeprefix("torch."),
            "policy": args.policy, "capacity": args.capacity, "max_chunk": args.max_chunk, "warm_up_s": warm_up_s,
            "frames": args.frames, "questions": answers, "tokens_streamed": session.cache.total_seen,
            "graphs_after_warm_up": after_warm_up, "graphs_at_end": sorted(map(repr, runner.graphs)),
            "capture_error_after_warm_up": error_after_warm_up, "capture_error": runner.capture_error,
            "failures": {repr(k): v for k, v in (book.failures.items() if book else ())},
            "first_errors": {repr(k): v for k, v in (book.first_errors.items() if book else ())},
            "calls": dict(calls)}


def write_markdown(report: dict, path: Path) -> None:
    new = [g for g in report["graphs_at_end"] if g not in report["graphs_after_warm_up"]]
    lines = [f"# CUDA-graph capture of the node's session: {report['model']}", "",
             f"From `benchmarks/capture_check.py` ({report['device']}, {report['dtype']}, policy {report['policy']}, "
             f"capacity {report['capacity']}, max_chunk {report['max_chunk']}): the node's session, its warm-up "
             f"({report['warm_up_s']:.1f} s), then {report['frames']} 640x480 frames and {report['questions']} questions "
             f"in one thread, no ROS ({report['tokens_streamed']:,} tokens streamed).", "",
             "| figure | value |", "|---|---|",
             f"| graphs after warm-up | {len(report['graphs_after_warm_up'])}: {', '.join(report['graphs_after_warm_up'])} |",
             f"| graphs captured after warm-up (should be none) | {len(new)}: {', '.join(new) or '-'} |",
             f"| failed captures per key | {report['failures'] or 'none'} |",
             f"| capture error after warm-up / at the end | {report['capture_error_after_warm_up'] or 'none'} / "
             f"{report['capture_error'] or 'none'} |",
             f"| each failed key's first reason | {report.get('first_errors') or 'none'} |",
             f"| calls per step kind and size | {report['calls'] or '- (eager runner)'} |"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-1.5b", help="a bench_gpu shape, demo-vlm or tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--weights", default="float", help="the node's weights parameter (auto on the demo VLM: "
                        "its 4-bit base plus float LoRA factors)")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--max-chunk", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--question-every", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ros_infmllm_bench_node"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="results file name (default: capture_check_<model>)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.capacity, args.max_chunk, args.frames = "tiny", "cpu", 256, 64, 6
        args.question_every, args.max_new_tokens = 3, 4
    save_report(args.out, args.name or f"capture_check_{args.model}", run(args), write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
