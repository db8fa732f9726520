"""Peak memory of a packed projection's prefill product (``QuantizedLinear.forward``), now against
the implementation before 2026-12-03, side by side (CPU here; ``--device cuda`` on a GPU).

Why: a 7B int4 model streamed at 7.75 GiB peak on an H200 (results/bench_gpu_int4_x8_h200.md),
0.69 GiB above its weights, tower and cache, against issue 19's 45%-of-bf16 target (7.2 GiB). A
prefill chunk multiplies by each packed projection's float copy; the implementation before
dequantized a whole projection of up to 16,384 output rows at once, through three float32
temporaries (codes, codes x scales, + offsets). Now ``forward`` dequantizes 2^24 weights of whole
rows at a time, in place on one float32 copy.

Each (matrix, implementation) runs in a fresh process: packed int4 weights with offsets from random
codes (no float weights, so nothing else raises the high-water mark), one product of a chunk of
``--tokens`` tokens, and the growth of the process's peak memory over that product (the CPU's
resident-set high-water mark, or ``torch.cuda.max_memory_allocated``). The products must agree.
Writes ``results/<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from results_files import save_report
from ros_infmllm.model.quantized import QuantizedLinear

RESULTS = Path(__file__).resolve().parent / "results"
# LLaMA-2-7B's projections (q, k, v and o share a shape), out x in
MATRICES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
SMOKE_MATRICES = {"tiny": (96, 64)}
BEFORE_ROWS = 16384  # the earlier FORWARD_ROWS


def before(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The product as ``QuantizedLinear`` computed it before 2026-12-03 (kept here as the baseline)."""
    def dequantized(rows: slice) -> torch.Tensor:
        scales, offsets = layer.scales[rows], layer.offsets[rows]
        count, groups = scales.shape
        codes = layer.codes(rows).to(torch.float32)
        w = codes.reshape(count, groups, layer.group) * scales.to(torch.float32)[..., None]
        w = w + offsets.to(torch.float32)[..., None]
        return w.reshape(count, layer.in_features).to(x.dtype)

    if layer.out_features <= BEFORE_ROWS:
        return F.linear(x, dequantized(slice(None)))
    return torch.cat([F.linear(x, dequantized(slice(s, s + BEFORE_ROWS)))
                      for s in range(0, layer.out_features, BEFORE_ROWS)], dim=-1)


def random_layer(rows: int, columns: int, device: str) -> QuantizedLinear:
    generator = torch.Generator().manual_seed(rows + columns)
    codes = torch.randint(0, 256, (rows, columns // 2), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(rows, columns // 32, generator=generator) * 0.01).to(torch.float16)
    offsets = (-torch.rand(rows, columns // 32, generator=generator) * 0.08).to(torch.float16)
    return QuantizedLinear(codes, scales, offsets, 4, columns).to(device)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(rows: int, columns: int, implementation: str, tokens: int, device: str) -> dict:
    """In this (fresh) process: the growth of the peak over one product, and a checksum."""
    dtype = torch.bfloat16
    layer = random_layer(rows, columns, device)
    x = torch.randn(tokens, columns, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = peak_bytes(device)
    with torch.inference_mode():
        y = (before if implementation == "before" else QuantizedLinear.forward)(layer, x)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"peak_growth_bytes": peak_bytes(device) - start, "checksum": float(y.float().abs().sum()),
            "packed_bytes": layer.packed_bytes()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in the prefill chunk (the output is small)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="packed_prefill_memory_cpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny matrix: checks the script")
    parser.add_argument("--one", nargs=3, metavar=("ROWS", "COLUMNS", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process
        rows, columns, implementation = int(args.one[0]), int(args.one[1]), args.one[2]
        print(json.dumps(measure(rows, columns, implementation, args.tokens, args.device)))
        return 0
    matrices = SMOKE_MATRICES if args.smoke else MATRICES
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU", "tokens": args.tokens,
              "torch": torch.__version__, "rows": []}
    for name, (rows, columns) in matrices.items():
        row = {"matrix": name, "rows": rows, "columns": columns}
        for implementation in ("before", "now"):
            done = subprocess.run([sys.executable, __file__, "--one", str(rows), str(columns), implementation,
                                   "--tokens", str(args.tokens), "--device", args.device],
                                  capture_output=True, text=True, check=True)
            row[implementation] = json.loads(done.stdout.strip().splitlines()[-1])
        before_sum, now_sum = row["before"]["checksum"], row["now"]["checksum"]
        row["relative_difference"] = abs(before_sum - now_sum) / max(abs(before_sum), 1e-30)
        report["rows"].append(row)
        print(f"{name}: before +{row['before']['peak_growth_bytes'] / 2**20:.0f} MiB, "
              f"now +{row['now']['peak_growth_bytes'] / 2**20:.0f} MiB", flush=True)
    save_report(args.out, args.name, report, write_markdown)
    return 0


def write_markdown(report: dict, path: Path) -> None:
    mib = 1 << 20
    lines = [f"# Peak memory of a packed projection's prefill product ({report['device']}, int4 with offsets, "
             f"{report['tokens']} tokens, bfloat16)", "",
             "From `benchmarks/packed_prefill_memory.py`: each cell in a fresh process, the growth of its peak "
             "memory over one `QuantizedLinear` product (CPU: resident-set high-water mark; CUDA: "
             "`max_memory_allocated`). Before: a whole projection (up to 16,384 rows) dequantized through three "
             "float32 temporaries; now: 2^24 weights of whole rows at a time, in place.", "",
             "| matrix (out x in) | packed MiB | before: peak growth MiB | now: peak growth MiB | products' checksums differ by |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['matrix']} ({r['rows']} x {r['columns']}) | {r['now']['packed_bytes'] / mib:.1f} | "
                     f"{r['before']['peak_growth_bytes'] / mib:.0f} | {r['now']['peak_growth_bytes'] / mib:.0f} | "
                     f"{r['relative_difference']:.1e} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
