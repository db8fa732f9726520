"""Start-up cost: the node with the bundled demo model on the CPU (process start to its "ready"
log line, a fresh process each run), and the checkpoint check an exported backend runs at every
start, on a 7B-shaped checkpoint (Qwen2-7B's 15.2 GB of bf16 weights as sparse files: the real
byte count, read at the speed of the page cache, so the figure is the hashing itself), first with
an empty digest cache and then with the digests cached (``ros_infmllm/export/file_digest.py``).

``python benchmarks/bench_startup.py [--runs 3]`` writes ``benchmarks/results/bench_startup.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
# Qwen2-7B: 7.62e9 parameters in bf16, in four shards as the published checkpoint has them.
SEVEN_B_BYTES, SEVEN_B_SHARDS = 15_231_233_024, 4


def node_start_seconds(timeout: float = 120.0) -> float:
    """Seconds from launching ``infmllm_node`` (bundled demo model, CPU) to its ready line."""
    node = shutil.which("infmllm_node") or str(Path(sys.executable).parent / "infmllm_node")
    env = {**os.environ, "ROS_DOMAIN_ID": str(150 + os.getpid() % 50), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "PYTHONUNBUFFERED": "1", "RCUTILS_LOGGING_BUFFERED_STREAM": "0"}
    started = time.monotonic()
    process = subprocess.Popen([node], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in process.stdout:
            if "ready: policy=" in line:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                break
        raise RuntimeError("infmllm_node did not report ready")
    finally:
        process.terminate()
        process.wait(timeout=30)


def checkpoint_check_seconds(folder: Path) -> tuple[float, float]:
    """(seconds with an empty digest cache, seconds with it filled) of ``model_sha256``."""
    from ros_infmllm.export import model_sha256

    timings = []
    for _ in range(2):
        started = time.monotonic()
        model_sha256(folder)
        timings.append(time.monotonic() - started)
    return timings[0], timings[1]


def write_markdown(report: dict, path: Path) -> None:
    node = report["node_start_seconds"]
    lines = ["# Start-up cost", "", f"From `benchmarks/bench_startup.py` on this {report['cpu_cores']}-core CPU.", "",
             "| what | seconds |", "|---|---|",
             f"| `infmllm_node`, bundled demo model, CPU: launch to ready (median of {report['runs']}: "
             f"{', '.join(f'{s:.2f}' for s in node)}) | {report['node_start_median']:.2f} |",
             f"| exported backend's checkpoint check, 7B-shaped ({report['seven_b_bytes'] / 1e9:.1f} GB), first start | "
             f"{report['checkpoint_check_first_seconds']:.2f} |",
             f"| the same check, later starts (digests cached by size and modification time) | "
             f"{report['checkpoint_check_cached_seconds']:.4f} |"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    node = sorted(node_start_seconds() for _ in range(args.runs))
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["ROS_INFMLLM_CACHE"] = str(Path(scratch) / "cache")  # start with no cached digest
        folder = Path(scratch) / "seven_b"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
        for shard in range(SEVEN_B_SHARDS):
            with (folder / f"model-{shard + 1:05d}-of-{SEVEN_B_SHARDS:05d}.safetensors").open("wb") as handle:
                handle.truncate(SEVEN_B_BYTES // SEVEN_B_SHARDS)  # sparse: no disk needed
        first, cached = checkpoint_check_seconds(folder)
    report = {"node_start_seconds": node, "node_start_median": node[len(node) // 2], "runs": args.runs,
              "seven_b_bytes": SEVEN_B_BYTES, "checkpoint_check_first_seconds": first,
              "checkpoint_check_cached_seconds": cached, "cpu_cores": os.cpu_count()}
    save_report(args.out, "bench_startup", report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
