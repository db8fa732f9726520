"""Soak test of the node as a robot runs it: ``python benchmarks/soak_node.py --minutes 60``.

The node runs as a subprocess (``python -m ros_infmllm.ros.node``) with a parameters file; this
process publishes a 30 fps camera (``sensor_msgs/Image``, 640x480 rgb8 frames of the synthetic
world, over real DDS) and a question every few seconds on ``~/query``, and every few seconds
records the node's resident memory (``/proc``), its GPU memory and cache fill and counters (from
``/diagnostics``) to a CSV. The run fails, and the script exits non-zero, if:

* the node dies;
* a question goes unanswered (each must be answered within ``--answer-timeout`` seconds);
* memory grows after warm-up: the largest RSS (and GPU memory, where measured) of the last half of
  the run exceeds the largest of the first quarter (taken after the node said ready) by more than
  ``--rss-bound-mb`` (``--gpu-bound-mb``).

Writes ``<out>/<name>.csv``, ``.json``, ``.md`` and a plot. On the CPU the defaults use the tiny
bundled model; ``--model demo-vlm`` soaks the demo VLM.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from ros_infmllm.cache import DEFAULT_POLICY
from node_harness import CameraProbe, Ticker, camera_frames, rss_mb, sleep_until_due, start_node, stop_node

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = ("what is in view ?", "how many objects are there ?", "what was the first object you saw ?",
             "What do you see on the table?", "How many different objects have you seen?")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--model", default="", help="model_path for the node ('' = tiny bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--dtype", default="auto",
                        help="the node's dtype (auto: float32 on the CPU, bfloat16 on a GPU)")
    parser.add_argument("--capacity", type=int, default=1024)
    parser.add_argument("--fps", type=float, default=30.0, help="camera frames per second")
    parser.add_argument("--frame-rate", type=float, default=10.0, help="the node's frame_rate (ingest cap)")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--question-every", type=float, default=3.0, help="seconds between questions")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between CSV rows")
    parser.add_argument("--answer-timeout", type=float, default=60.0)
    parser.add_argument("--rss-bound-mb", type=float, default=64.0)
    parser.add_argument("--gpu-bound-mb", type=float, default=16.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="soak_node_cpu")
    return parser.parse_args(argv)


def soak(args: argparse.Namespace) -> dict:
    import rclpy

    from ros_infmllm.ros.entry import spinning

    node, folder = start_node({"model_path": args.model, "device": args.device, "dtype": args.dtype,
                               "policy": args.policy, "capacity": args.capacity, "max_chunk": 128, "frame_rate": args.frame_rate,
                               "max_new_tokens": 24, "diagnostics_period": 1.0,
                               "image_topics": ["/camera/image_raw"]})
    rclpy.init()
    probe = CameraProbe()
    record = probe.record
    frames = camera_frames(tuple(args.size))
    rows: list[dict] = []
    asked: list[float] = []
    failure, ready_s = "", float("nan")
    try:
        with spinning(probe.node):
            ready_s = probe.wait_ready(node, folder / "node.log")
            begin = time.monotonic()
            end = begin + args.minutes * 60
            frame_tick, question_tick, sample_tick = (Ticker(1.0 / args.fps, begin), Ticker(args.question_every, begin),
                                                      Ticker(args.sample_every, begin))
            sent = 0
            while time.monotonic() < end:
                now = time.monotonic()
                if node.poll() is not None:
                    failure = f"node died (exit {node.returncode})"
                    break
                if frame_tick.due(now):
                    probe.publish_frame(frames[sent % len(frames)])
                    sent += 1
                if question_tick.due(now):
                    asked.append(probe.ask(QUESTIONS[len(asked) % len(QUESTIONS)]))
                if sample_tick.due(now):
                    rows.append({"seconds": round(now - begin, 1), "rss_mb": round(rss_mb(node.pid), 1),
                                 "frames_published": sent, "questions_asked": len(asked),
                                 "answers": len(record.answers), **{k: record.diagnostics.get(k, "") for k in (
                                     "gpu_memory_allocated_mb", "gpu_memory_reserved_mb", "cache_fill",
                                     "cache_capacity", "tokens_streamed", "evictions", "frames_received",
                                     "frames_ingested", "frames_dropped", "queries_answered", "queries_refused",
                                     "queries_failed", "last_ingest_ms", "last_first_token_ms",
                                     "max_frame_age_ms", "captured_graphs", "graph_capture_error")}})
                sleep_until_due(frame_tick, question_tick, sample_tick)
            deadline = time.monotonic() + args.answer_timeout  # the last questions' answers
            while len(record.answers) < len(asked) and time.monotonic() < deadline and node.poll() is None:
                time.sleep(0.1)
    finally:
        alive = node.poll() is None
        exit_code = stop_node(node)
        probe.node.destroy_node()
        rclpy.try_shutdown()
    return {"rows": rows, "asked": len(asked), "answers": [a for _, a in record.answers], "failure": failure,
            "ready_s": round(ready_s, 1), "alive_at_end": alive, "exit_code": exit_code,
            "log_tail": (folder / "node.log").read_text()[-3000:]}


def growth(rows: list[dict], key: str) -> float | None:
    """Largest value of the last half minus the largest of the first quarter (MB)."""
    values = [float(r[key]) for r in rows if r.get(key) not in ("", None)]
    if len(values) < 4:
        return None
    quarter, half = len(values) // 4, len(values) // 2
    return max(values[half:]) - max(values[:max(1, quarter)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = soak(args)
    rows = run["rows"]
    rss_growth, gpu_growth = growth(rows, "rss_mb"), growth(rows, "gpu_memory_reserved_mb")
    unanswered = run["asked"] - len(run["answers"])
    errors = [a for a in run["answers"] if a.startswith("error")]
    failures = [f for f in (
        run["failure"],
        f"{unanswered} questions unanswered" if unanswered else "",
        f"{len(errors)} answers were errors: {errors[:3]}" if errors else "",
        f"RSS grew {rss_growth:.1f} MB (bound {args.rss_bound_mb})" if rss_growth is not None
        and rss_growth > args.rss_bound_mb else "",
        f"GPU memory grew {gpu_growth:.1f} MB (bound {args.gpu_bound_mb})" if gpu_growth is not None
        and gpu_growth > args.gpu_bound_mb else "",
        "" if run["exit_code"] == 0 else f"node exit code {run['exit_code']} at shutdown",
    ) if f]
    last = rows[-1] if rows else {}
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "passed": not failures, "failures": failures, "ready_s": run["ready_s"],
              "questions_asked": run["asked"], "questions_answered": len(run["answers"]),
              "rss_growth_mb": rss_growth, "gpu_growth_mb": gpu_growth, "last_sample": last,
              "answers_sample": run["answers"][:10], "node_log_tail": run["log_tail"]}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{args.name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["seconds"])
        writer.writeheader()
        writer.writerows(rows)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    report["plot"] = write_plot(rows, args.out / f"{args.name}.png")
    write_markdown(report, rows, args.out / f"{args.name}.md")
    print((args.out / f"{args.name}.md").read_text())
    return 0 if report["passed"] else 1


def write_markdown(report: dict, rows: list[dict], path: Path) -> None:
    s = report["settings"]
    last = report["last_sample"]
    fmt = lambda v: "n/a" if v is None else f"{v:+.1f} MB"  # noqa: E731
    lines = [f"# Node soak: {'PASSED' if report['passed'] else 'FAILED'}", "",
             f"Produced by `benchmarks/soak_node.py` ({s['minutes']} min, device {s['device']}, model "
             f"`{s['model'] or 'tiny bundled'}`, dtype {s.get('dtype', 'auto')}, policy {s['policy']}, capacity "
             f"{s['capacity']}): a {s['fps']:g} fps "
             f"{s['size'][0]}x{s['size'][1]} rgb8 camera over DDS, a question every {s['question_every']:g} s; "
             f"the node's frame_rate cap {s['frame_rate']:g}/s. Samples every {s['sample_every']:g} s in "
             f"`{path.stem}.csv`" + (f", plot `{path.stem}.png`." if report.get("plot") else
                                     " (no plot: matplotlib is not installed)."), "",
             "| figure | value |", "|---|---|",
             f"| node ready after (start-up incl. warm-up) | {report['ready_s']} s |",
             f"| questions asked / answered | {report['questions_asked']} / {report['questions_answered']} |",
             f"| frames published / received / ingested / dropped | {last.get('frames_published', '')} / "
             f"{last.get('frames_received', '')} / {last.get('frames_ingested', '')} / {last.get('frames_dropped', '')} |",
             f"| tokens streamed / cache fill / capacity | {last.get('tokens_streamed', '')} / "
             f"{last.get('cache_fill', '')} / {last.get('cache_capacity', '')} |",
             f"| RSS at the end | {last.get('rss_mb', '')} MB |",
             f"| RSS growth (max of last half - max of first quarter) | {fmt(report['rss_growth_mb'])} "
             f"(bound {s['rss_bound_mb']:g} MB) |",
             f"| GPU memory growth (reserved) | {fmt(report['gpu_growth_mb'])} (bound {s['gpu_bound_mb']:g} MB) |",
             f"| CUDA graphs captured / capture error (last sample) | {last.get('captured_graphs', 'n/a')} / "
             f"{last.get('graph_capture_error') or 'none'} |"]
    if report["failures"]:
        lines += ["", "Failures:", *[f"- {f}" for f in report["failures"]]]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> bool:
    from plotting import pyplot

    plt = pyplot()
    if plt is None or not rows:
        return False
    seconds = [r["seconds"] / 60 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(seconds, [r["rss_mb"] for r in rows], label="RSS (MB)")
    gpu = [float(r["gpu_memory_reserved_mb"]) for r in rows if r.get("gpu_memory_reserved_mb") not in ("", None)]
    if len(gpu) == len(rows):
        axes[0].plot(seconds, gpu, label="GPU reserved (MB)")
    axes[0].set_xlabel("minutes")
    axes[0].set_ylim(bottom=0)
    axes[0].legend()
    axes[1].plot(seconds, [float(r["cache_fill"] or 0) for r in rows], label="cache fill (tokens)")
    axes[1].set_xlabel("minutes")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
