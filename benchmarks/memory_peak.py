"""What is allocated at a run's GPU memory peak, by the code that allocated it:
``python benchmarks/memory_peak.py -- <bench_gpu.py arguments>``.

Why: the 7B int4 model streams at 7.63 GiB peak on an H200, 0.68 GiB above its weights, tower and
cache (docs/quantized_weights.md), against issue 19's 45%-of-bf16 target, and `bench_gpu.py` only
reports the peak and the parts it knows. This runs ``bench_gpu.main`` with the CUDA caching
allocator's history recorded from the first allocation (``torch.cuda.memory._record_memory_history``),
replays the allocation trace to find the moment of the most bytes allocated after bench_gpu's
last peak reset (its warm-up done, as its own figure), and groups what was
live then by the first stack frame inside this repository (so a weight, a cache buffer, a graph's
static output or a prefill temporary each name their line). Graph replays allocate nothing, so
what CUDA graphs keep reserved in their pool is not in the peak, as in ``max_memory_allocated``.

Writes ``<out>/<name>.{json,md}``; ``peak_allocations`` is the function the tests check on a
synthetic trace.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
REPOSITORY = Path(__file__).resolve().parent.parent


def owner(frames: list[dict]) -> str:
    """``file:line function`` of the innermost frame inside this repository, else the innermost frame."""
    for frame in frames:
        name = frame.get("filename", "")
        if str(REPOSITORY) in name and "/.venv/" not in name:
            return f"{Path(name).relative_to(REPOSITORY)}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{Path(frames[0].get('filename', '?')).name}:{frames[0].get('line')} {frames[0].get('name')}"
    return "(no stack: allocated before recording)"


def peak_allocations(trace: list[dict], start: int = 0) -> tuple[int, dict[int, tuple[int, str]]]:
    """Replays an allocator trace (``alloc`` / ``free_completed`` events with ``addr``, ``size``,
    ``frames``): the most bytes live at once from event ``start`` on (bench_gpu resets its peak
    after a warm-up), and the live blocks then (address -> size, owner)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for index, event in enumerate(trace):
        if index == start:
            peak, at_peak = total, dict(live)
        action, addr, size = event.get("action"), event.get("addr"), event.get("size", 0)
        if action == "alloc":
            live[addr] = (size, owner(event.get("frames", [])))
            total += size
            if index >= start and total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]
    return peak, at_peak


def by_owner(blocks: dict[int, tuple[int, str]]) -> list[dict]:
    """Live blocks summed per allocating line, largest first."""
    sums: dict[str, list[int]] = {}
    for size, where in blocks.values():
        entry = sums.setdefault(where, [0, 0])
        entry[0] += size
        entry[1] += 1
    return [{"owner": where, "bytes": total, "blocks": count}
            for where, (total, count) in sorted(sums.items(), key=lambda item: -item[1][0])]


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# What is allocated at the GPU memory peak ({report['device']})", "",
             f"From `benchmarks/memory_peak.py` around `bench_gpu.py {' '.join(report['bench_gpu_args'])}`: the "
             "caching allocator's trace replayed; the peak is the most bytes allocated at once (as "
             "`max_memory_allocated`, whose own figure is beside it), grouped by the first stack frame in this "
             "repository.", "",
             f"Peak from the trace: **{report['peak_bytes'] / 2**30:.3f} GiB**; `max_memory_allocated`: "
             f"{report['max_memory_allocated'] / 2**30:.3f} GiB; trace events: {report['events']}.", "",
             "| allocated by | GiB | blocks |", "|---|---|---|"]
    lines += [f"| `{row['owner']}` | {row['bytes'] / 2**30:.3f} | {row['blocks']} |" for row in report["owners"][:40]]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="memory_peak")
    parser.add_argument("--max-entries", type=int, default=2_000_000, help="allocator events kept (a ring buffer)")
    parser.add_argument("bench_gpu_args", nargs=argparse.REMAINDER, help="after --: bench_gpu.py's arguments")
    args = parser.parse_args(argv)
    bench_args = [a for a in args.bench_gpu_args if a != "--"]
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the allocator history is CUDA's")
    import bench_gpu

    resets: list[int] = []  # trace length at each of bench_gpu's peak resets (after its warm-up)
    reset = torch.cuda.reset_peak_memory_stats

    def marked_reset(*a, **k):
        resets.append(sum(len(d) for d in torch.cuda.memory._snapshot()["device_traces"]))
        return reset(*a, **k)

    torch.cuda.memory._record_memory_history(stacks="python", max_entries=args.max_entries)
    torch.cuda.reset_peak_memory_stats = marked_reset
    try:
        bench_gpu.main(bench_args + ["--out", str(args.out / f"{args.name}_bench_gpu")])
    finally:
        torch.cuda.reset_peak_memory_stats = reset
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = [event for device in snapshot["device_traces"] for event in device]
    if len(trace) >= args.max_entries:
        print(f"the trace filled its {args.max_entries} entries: early allocations are missing", file=sys.stderr)
    peak, blocks = peak_allocations(trace, resets[-1] if resets else 0)
    report = {"device": torch.cuda.get_device_name(), "bench_gpu_args": bench_args, "events": len(trace),
              "peak_counted_from_event": resets[-1] if resets else 0,
              "peak_bytes": peak, "max_memory_allocated": torch.cuda.max_memory_allocated(),
              "owners": by_owner(blocks)}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
