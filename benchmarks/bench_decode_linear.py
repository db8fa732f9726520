"""One decode token's linear layers: the Triton matrix-vector op (model/decode_linear.py) against
cuBLAS, per matrix of each model shape of bench_gpu.py, bf16, batch 1; ``--weights int8|int4``
times the op on packed weights (model/quantized.py, groups of 32) against the same bf16 baselines.

Per decoder matrix and the LM head (q/k/v with the input norm, bias and rotary, o with the residual add, gate/up with the
norm and SwiGLU, down with the residual add), three versions of the same work:
- **cuBLAS**: ``F.linear`` alone (the product only);
- **compiled**: what the decode block ran before the op: norm, product, bias/SwiGLU/residual as
  torch ops under ``torch.compile`` (inductor's kernels around cuBLAS);
- **op**: the Triton op with its fusions, at the shipped launch shape and at each of a sweep.
Each is timed as a CUDA graph of one call per layer over that layer's own weights (so no weight
sits in L2 between calls), replayed back to back between device events; median of the replays.
GB/s = the bytes each version reads (bf16, or packed codes + scales + offsets) / time. Errors
are against a float64 reference (of the dequantized weights where packed).

Writes ``results/bench_decode_linear.{json,md}`` (``--name`` changes the name); prints the table. ``--smoke`` runs tiny shapes
through Triton's CPU interpreter (checks the script; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is first imported

from bench_decode_attention import relative, timed_us  # noqa: E402
from launch_tuning import sweep, tuning_for_run  # noqa: E402
from bench_gpu import SHAPES, SMOKE_SHAPES, write_checkpoint_config  # noqa: E402
from results_files import save_report  # noqa: E402
from ros_infmllm.model import decode_linear as op  # noqa: E402
from ros_infmllm.model.config import load_config  # noqa: E402
from ros_infmllm.model.quantized import QuantizedLinear  # noqa: E402
from ros_infmllm.rope import Rotary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 1e-6


def matrices(cfg) -> list[dict]:
    """The four products of one decoder layer and the LM head, and what each folds in."""
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return [dict(name="q/k/v", rows=qkv, columns=cfg.hidden_size, norm=True, bias=cfg.qkv_bias, residual=False,
                 gated=False, rotary=cfg.head_dim, rotated_rows=(cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim),
            dict(name="o", rows=cfg.hidden_size, columns=cfg.num_heads * cfg.head_dim, norm=False, bias=cfg.o_bias,
                 residual=True, gated=False),
            dict(name="gate/up", rows=2 * cfg.intermediate_size, columns=cfg.hidden_size, norm=True, bias=False,
                 residual=False, gated=True),
            dict(name="down", rows=cfg.hidden_size, columns=cfg.intermediate_size, norm=False, bias=False,
                 residual=True, gated=False),
            # once per token, not per layer: the LM head with the final norm
            dict(name="LM head", rows=cfg.vocab_size, columns=cfg.hidden_size, norm=True, bias=False, residual=False,
                 gated=False, per_token=True)]


def layer_inputs(spec: dict, layers: int, device: str, dtype: torch.dtype, seed: int) -> list[tuple]:
    """Per layer: the op's arguments (random, scaled like trained weights; never zeros)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, device=device)).to(dtype)

    out_rows = spec["rows"] // (2 if spec["gated"] else 1)
    rotary = spec.get("rotary", 0)
    cos, sin = Rotary(rotary, 10000.0).cos_sin(torch.tensor([1234]), dtype) if rotary else (None, None)
    return [(draw(1, spec["columns"]), draw(spec["rows"], spec["columns"], scale=spec["columns"] ** -0.5),
             draw(spec["rows"]) if spec["bias"] else None, 1 + draw(spec["columns"], scale=0.1) if spec["norm"] else None,
             draw(1, out_rows) if spec["residual"] else None, EPS, spec["gated"],
             None if cos is None else cos.to(device), None if sin is None else sin.to(device), spec.get("rotated_rows", 0))
            for _ in range(layers)]


def packed_inputs(args: tuple, layer: QuantizedLinear) -> tuple:
    """The op's arguments with ``layer``'s packed weight: codes in place of the weight, then its
    scales, offsets and bits."""
    return (args[0], layer.qweight, *args[2:], layer.scales, layer.offsets, layer.bits)


def unfused(x, weight, bias, norm_weight, residual, eps, gated, cos=None, sin=None, rotated_rows=0):
    """The same work as separate torch ops (the decoder's plain path)."""
    if norm_weight is not None:
        x32 = x.float()
        x = norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, weight, bias)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if cos is not None:
        heads = Rotary.apply(y[:, :rotated_rows].view(-1, cos.shape[-1]), cos, sin).view(1, -1)
        y = torch.cat((heads, y[:, rotated_rows:]), dim=-1)
    return y if residual is None else residual + y


def reference(x, weight, bias, norm_weight, residual, eps, gated, cos=None, sin=None, rotated_rows=0):
    def wide(t):
        return None if t is None else t.double()

    return unfused(wide(x), wide(weight), wide(bias), wide(norm_weight), wide(residual), eps, gated, wide(cos),
                   wide(sin), rotated_rows)


def cublas_only(x, weight, *_):
    return F.linear(x, weight)


def bench_matrix(spec: dict, layers: int, args, device: str, dtype: torch.dtype, shipped: op.MatvecTuning) -> dict:
    per_layer = layer_inputs(spec, layers, device, dtype, seed=1)
    fresh = layer_inputs(spec, 1, device, dtype, seed=2)[0]
    want = reference(*fresh)
    float_bytes = spec["rows"] * spec["columns"] * dtype.itemsize
    compiled = torch.compile(unfused, dynamic=False) if device == "cuda" else unfused
    row = {**spec, "bytes": float_bytes,
           "cublas": {"us": timed_us(cublas_only, per_layer, device, args.replays), "bytes": float_bytes},
           "compiled": {"us": timed_us(compiled, per_layer, device, args.replays),
                        "error": relative(compiled(*fresh), want), "bytes": float_bytes}}
    op_bytes, rows_field, chunk_field, warps_field = float_bytes, "block_n", "block_k", "num_warps"
    if args.weights != "float":  # packed by rounding, groups of 32; the reference on the dequantized weight
        per_layer = [packed_inputs(layer, QuantizedLinear.from_float(layer[1], None, args.weights))
                     for layer in per_layer]
        packed = QuantizedLinear.from_float(fresh[1], None, args.weights)
        want = reference(fresh[0], packed.dequantized(torch.float64), *fresh[2:])
        fresh = packed_inputs(fresh, packed)
        op_bytes, rows_field = packed.packed_bytes(), shipped.rows_field(packed.bits, shipped.x8(packed.bits))
        chunk_field, warps_field = f"{args.weights}_block_k", "packed_num_warps"
        row["bytes"] = op_bytes
    tunings = [shipped, op.MatvecTuning(**{**vars(shipped), "pdl": False})]
    tunings += [op.MatvecTuning(**{**vars(shipped), "block_n": n, "gated_block_n": n, "wide_block_n": n,
                                   rows_field: n, chunk_field: k, warps_field: w, "packed_ahead": a})
                for n, k, w, a in itertools.product(args.block_n, args.block_k, args.warps,
                                                    args.ahead if args.weights != "float" else [shipped.packed_ahead])]
    row["variants"] = sweep(op.TUNING, tunings, lambda: timed_us(op.decode_linear, per_layer, device, args.replays),
                            lambda: {"error": relative(op.decode_linear(*fresh), want), "bytes": op_bytes})
    row["op"], row["op_without_pdl"] = row["variants"].pop(0), row["variants"].pop(0)
    for entry in [row["cublas"], row["compiled"], row["op"], row["op_without_pdl"]] + row["variants"]:
        entry["gb_per_s"] = entry["bytes"] / entry["us"] / 1e3
        entry["rows_per_program"] = entry.get(rows_field, entry.get("block_n"))
        entry["chunk"], entry["warps"] = entry.get(chunk_field), entry.get(warps_field)
        entry["ahead"] = entry.get("packed_ahead", 1) if args.weights != "float" else None
    row["best"] = min(row["variants"], key=lambda v: v["us"])
    return row


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Decode linear layers: the Triton matrix-vector op against cuBLAS ({report['device']}, "
             f"{report['dtype']}, weights {report.get('weights', 'float')}"
             + (", x rounded to int8 codes per group (dp4a)" if report.get("weights") in ("int4", "int8")
                and report.get(f"{report['weights']}_activations") == "int8" else "") + ", batch 1)", "",
             "cuBLAS: the product alone; compiled: norm + product + bias/SwiGLU/residual as torch ops under "
             "torch.compile; op: the Triton op with those folded in, at the shipped launch shape "
             "(`MatvecTuning`), and the same without programmatic dependent launch (no PDL); best: the fastest "
             "of the sweep (rows per program, chunk, warps; for packed weights also the chunks requested "
             "ahead). Each is one launch per layer, back to back.", "",
             "| model | matrix | MB | folds in | cuBLAS us (GB/s) | compiled us | op us (GB/s) | no PDL us | "
             "best us: rows, chunk, warps | op vs compiled | op error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    totals = []
    for model in report["models"]:
        for r in model["matrices"]:
            folds = ", ".join(k for k in ("norm", "rotary", "bias", "gated", "residual") if r.get(k)) or "-"
            c, m, o, b = r["cublas"], r["compiled"], r["op"], r["best"]
            lines.append(f"| {model['model']} | {r['name']} | {r['bytes'] / 1e6:.1f} | {folds} | "
                         f"{c['us']:.1f} ({c['gb_per_s']:.0f}) | {m['us']:.1f} | {o['us']:.1f} ({o['gb_per_s']:.0f}) | "
                         f"{r['op_without_pdl']['us']:.1f} | "
                         f"{b['us']:.1f}: {b['rows_per_program']}, {b['chunk']}, {b['warps']}"
                         + (f", {b['ahead']} ahead" if b.get("ahead") else "") + " | "
                         f"{m['us'] / o['us']:.2f}x | {o['error']:.1e} |")
        per_layer = [r for r in model["matrices"] if not r.get("per_token")]
        compiled = sum(r["compiled"]["us"] for r in per_layer)
        fused = sum(r["op"]["us"] for r in per_layer)
        totals.append(f"| {model['model']} | {compiled:.1f} | {fused:.1f} | {compiled - fused:.1f} | "
                      f"{(compiled - fused) * model['layers'] / 1e3:.3f} |")
    lines += ["", "Per layer, the four products with their folded work:", "",
              "| model | compiled us | op us | saved us | saved ms per token (all layers) |", "|---|---|---|---|---|"]
    lines += totals
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--block-n", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--block-k", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--ahead", type=int, nargs="+", default=[1], choices=(1, 2),
                        help="packed weights: chunks requested ahead (MatvecTuning.packed_ahead)")
    parser.add_argument("--weights", choices=("float", "int8", "int4"), default="float",
                        help="the op's weights: the model's dtype, or packed (groups of 32; rows per program swept "
                             "through MatvecTuning.int8_block_n / int4_block_n, chunk and warps through "
                             "int8_block_k / int4_block_k and packed_num_warps)")
    parser.add_argument("--int4-activations", choices=("float", "int8"), default=None,
                        help="int4 products against float x or x's int8 codes (dp4a); default: the shipped tuning's")
    parser.add_argument("--matvec", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="the shipped launch shape changed first (fields of decode_linear.MatvecTuning, e.g. "
                             "int8_activations=int8): its rows and every variant take it")
    parser.add_argument("--min-weight-mb", type=int, default=240, help="weights per timed graph, above L2's size")
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bench_decode_linear", help="results file name (without extension)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    shapes, dtype = SHAPES, torch.bfloat16
    if args.smoke:
        shapes, args.models, dtype = SMOKE_SHAPES, list(SMOKE_SHAPES), torch.float32
        args.block_n, args.block_k, args.warps, args.replays, args.min_weight_mb = [2], [64], [4], 1, 0
        args.ahead = [2] if args.weights != "float" else args.ahead
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "weights": args.weights,
              "models": []}
    # the path timed: its "shipped" row and every variant take the overrides
    with tuning_for_run(parser, op.TUNING, args.matvec + (
            [f"int4_activations={args.int4_activations}"] if args.int4_activations else [])) as shipped:
        report["int4_activations"], report["int8_activations"] = shipped.int4_activations, shipped.int8_activations
        report["matvec_overrides"] = args.matvec
        for name in args.models:
            cfg = load_config(write_checkpoint_config(Path(tempfile.mkdtemp()) / name, shapes[name])).text
            rows = []
            for spec in matrices(cfg):
                size = spec["rows"] * spec["columns"] * dtype.itemsize
                size = size if args.weights == "float" else size // (2 if args.weights == "int8" else 4)
                layers = max(2, -(-(args.min_weight_mb << 20) // size))
                rows.append(bench_matrix(spec, layers, args, device, dtype, shipped))
                print(f"{name} {spec['name']}: cuBLAS {rows[-1]['cublas']['us']:.1f} us, op {rows[-1]['op']['us']:.1f} us",
                      flush=True)
            report["models"].append({"model": name, "layers": cfg.num_layers, "matrices": rows})
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
