"""The decode op's int4 x int8 ``dp4a`` path (``MatvecTuning.int4_activations = "int8"``,
model/matvec_dp4a.py, shipped since 2026-12-03) against its int4 path with float x
(``int4_activations = "float"``, at the shipped launch shape otherwise) and cuBLAS in bf16, per
decoder matrix that carries only a residual add (o and down: the same work in all three), batch 1.

Why: the float-x int4 path spends 7.1 instructions per code and moved its bytes at 1.2-1.4 TB/s
on an H200; the dp4a path's loop counts 2.20 (results/matvec_sass_dp4a.md), which on paper lifts
the instruction limit above the memory's. This says whether it does on the GPU, at which launch
shape (rows per program, inputs per step), and what quantizing x to int8 per group costs in
accuracy (relative error against a float64 product with the dequantized weights and unrounded x)
before the path is turned on.

Each version is timed as a CUDA graph of one call per layer over that layer's own weights (more
than L2 holds), replayed back to back; the dp4a path's time includes its activation-quantizing
launch. Writes ``results/<name>.{json,md}``. ``--smoke``: tiny shapes in Triton's CPU interpreter
(checks the script; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported

from bench_decode_attention import relative, timed_us  # noqa: E402
from launch_tuning import kept_tuning, sweep  # noqa: E402
from results_files import save_report  # noqa: E402
from ros_infmllm.model import decode_linear as op  # noqa: E402
from ros_infmllm.model.quantized import QuantizedLinear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (model, matrix, rows, columns): the products with only a residual add around them
MATRICES = [("qwen2-1.5b", "o", 1536, 1536), ("qwen2-1.5b", "down", 1536, 8960),
            ("llama2-7b", "o", 4096, 4096), ("llama2-7b", "down", 4096, 11008)]
SMOKE_MATRICES = [("tiny", "o", 64, 256), ("tiny", "down", 32, 512)]


def bench(model: str, matrix: str, rows: int, columns: int, args, device: str, dtype: torch.dtype,
          shipped: op.MatvecTuning) -> dict:
    packed_bytes = rows * columns // 2 + 2 * 2 * rows * (columns // 32)  # codes + fp16 scales and offsets
    layers = max(2, -(-(args.min_weight_mb << 20) // packed_bytes))
    generator = torch.Generator().manual_seed(1)
    per_layer = []
    for _ in range(layers):
        weight = torch.randn(rows, columns, generator=generator) * columns ** -0.5
        layer = QuantizedLinear.from_float(weight, None, "int4", group=32).to(device)
        x = torch.randn(1, columns, generator=generator).to(device, dtype)
        residual = torch.randn(1, rows, generator=generator).to(device, dtype)
        per_layer.append((x, weight.to(device, dtype), residual, layer))
    x, weight, residual, layer = per_layer[0]
    exact = (residual.double() + x.double() @ layer.dequantized(torch.float64).T).cpu()
    packed = [(x, lay.qweight, None, None, res, 1e-6, False, None, None, 0, lay.scales, lay.offsets, 4)
              for x, _, res, lay in per_layer]
    dense = [(x, w, res) for x, w, res, _ in per_layer]
    row = {"model": model, "matrix": matrix, "rows": rows, "columns": columns, "layers": layers,
           "packed_bytes": packed_bytes, "bf16_bytes": rows * columns * 2}
    cublas = lambda x, w, res: torch.addmm(res, x, w.T)  # noqa: E731
    us = timed_us(cublas, dense, device, args.replays)
    row["cublas_bf16"] = {"us": us, "gb_per_s": row["bf16_bytes"] / us / 1e3}
    # the decode op itself: its int4 path with float x, then its dp4a path (int4_activations int8) per launch shape
    float_x = dataclasses.replace(shipped, int4_activations="float")
    tunings = [float_x] + [dataclasses.replace(shipped, int4_activations="int8", x8_block_n=n, int4_block_k=k,
                                               packed_num_warps=w, packed_ahead=a)
                           for n, k, w, a in itertools.product(args.block_n, args.block_k, args.warps, args.ahead)]
    variants = sweep(op.TUNING, tunings, lambda: timed_us(op.decode_linear, packed, device, args.replays),
                     lambda: {"error": relative(op.decode_linear(*packed[0]).cpu(), exact)})
    for variant in variants:
        variant["gb_per_s"] = packed_bytes / variant["us"] / 1e3
    row["int4_float_x"], row["dp4a_shapes"] = variants[0], variants[1:]
    row["int4_dp4a"] = min(row["dp4a_shapes"], key=lambda v: v["us"])
    # what the cuBLAS row computes is the unrounded weight: its error is the rounding of the weights
    row["cublas_bf16"]["error"] = relative(F.linear(x, weight).add(residual).cpu(), exact)
    return row


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# The decode op's int4 x int8 dp4a path against its float-x int4 path ({report['device']}, batch 1)", "",
             "From `benchmarks/bench_dp4a_matvec.py`: per matrix, a CUDA graph of one call per layer over its own "
             "weights, median of replays; GB/s of the bytes read (packed: codes, scales and offsets). Error: relative "
             "to a float64 product of the dequantized int4 weights and unrounded x (for cuBLAS: of its bf16 weights, "
             "so it shows the weights' rounding).", "",
             "The dp4a column is its best launch shape (rows per program / inputs per step / warps / chunks requested "
             "ahead; every shape in the json).", "",
             "| model | matrix | rows x cols | cuBLAS bf16 us (GB/s) | int4 float x us (GB/s) | int4 dp4a us (GB/s) | "
             "dp4a shape | dp4a / float x | error float x / dp4a |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        c, s, d = r["cublas_bf16"], r["int4_float_x"], r["int4_dp4a"]
        lines.append(f"| {r['model']} | {r['matrix']} | {r['rows']}x{r['columns']} | {c['us']:.1f} ({c['gb_per_s']:.0f}) "
                     f"| {s['us']:.1f} ({s['gb_per_s']:.0f}) | {d['us']:.1f} ({d['gb_per_s']:.0f}) | "
                     f"{d['x8_block_n']} / {d['int4_block_k']} / {d['packed_num_warps']} / {d['packed_ahead']} | {d['us'] / s['us']:.2f}x | {s['error']:.1e} / {d['error']:.1e} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-weight-mb", type=int, default=240, help="packed weights per timed graph, above L2")
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--block-n", type=int, nargs="+", default=[4, 8, 16], help="the dp4a path's rows per program")
    parser.add_argument("--block-k", type=int, nargs="+", default=[512, 1024], help="its inputs per loop step")
    parser.add_argument("--warps", type=int, nargs="+", default=[4], help="its warps per program")
    parser.add_argument("--ahead", type=int, nargs="+", default=[1], choices=(1, 2), help="its chunks requested ahead")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bench_dp4a_matvec")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    matrices, dtype = (SMOKE_MATRICES, torch.float32) if args.smoke else (MATRICES, torch.bfloat16)
    if args.smoke:
        args.min_weight_mb, args.replays, args.block_n, args.block_k, args.warps, args.ahead = 0, 1, [8], [256], [4], [2]
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)",
              "torch": torch.__version__, "rows": []}
    with kept_tuning(op.TUNING) as shipped:
        for spec in matrices:
            report["rows"].append(bench(*spec, args, device, dtype, shipped))
            r = report["rows"][-1]
            print(f"{spec[0]} {spec[1]}: float x {r['int4_float_x']['us']:.1f} us, dp4a {r['int4_dp4a']['us']:.1f} us",
                  flush=True)
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
