"""The prefill product of packed weights, side by side: how a chunk of tokens is multiplied by an
int4 / int8 projection (issue 19: "prefill may dequantize per chunk or use a quantized GEMM from a
well-kept library, whichever measures better").

Variants, per LLaMA-2-7B projection shape and chunk length (bf16 activations):
- ``float``: cuBLAS on the bf16 weights (what a bf16 model does; the speed to approach);
- ``torch``: a float copy of ``FORWARD_ELEMENTS`` weights at a time made with torch operations
  (``QuantizedLinear.dequantized``, the CPU's path), then cuBLAS: the GPU's path before 2026-12-04;
- ``triton``: the same pieces made by one Triton pass (``model/dequant_kernels.py``), then cuBLAS;
- ``shipped``: ``QuantizedLinear.forward`` (on a GPU: Triton pieces of ``GPU_FORWARD_ELEMENTS``);
- ``whole``: the whole matrix in one Triton pass, then one cuBLAS product (the most memory);
- ``tinygemm`` (int4, CUDA): PyTorch's int4 GEMM, ``torch._weight_int4pack_mm``, on operands
  converted once from ours (its own tiled copy of the codes, and bf16 scales and zeros: a
  second copy of the weights beside the one the decode kernel reads, counted in ``extra MB``).

Each time is a CUDA graph of one product per layer over ``--layers`` different weights (more bytes
than L2 holds), replayed, median (bench_decode_attention.timed_us). Error: the largest absolute
difference from a float64 product of the same dequantized weights, over the largest magnitude.
Writes ``results/<name>.{json,md}``. ``--smoke``: a tiny shape on the CPU (Triton's interpreter),
which checks the script, not speed.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_decode_attention import timed_us
from results_files import save_report
from ros_infmllm.model.quantized import FORWARD_ELEMENTS, GPU_FORWARD_ELEMENTS, QuantizedLinear

RESULTS = Path(__file__).resolve().parent / "results"
MATRICES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}  # out x in, LLaMA-2-7B
PER_LAYER = {"q/k/v/o": 4, "gate/up": 2, "down": 1}  # products of each shape in one decoder layer
SMOKE_MATRICES = {"tiny": (96, 256)}
INNER_K_TILES = 8


def tinygemm_operands(layer: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch._weight_int4pack_mm``'s weight and ``[groups, out, 2]`` bf16 scales and zeros from
    an int4 layer. Its dequantization is ``(q - 8) * scale + zero``: ours is ``q * scale + offset``
    (zero = offset + 8 scale) or ``(q - 8) * scale`` (zero 0). Its packing wants element ``2j`` in
    the high nibble; ours holds it in the low one."""
    swapped = ((layer.qweight & 0x0F) << 4) | (layer.qweight >> 4)
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), INNER_K_TILES)
    scales = layer.scales.to(torch.float32)
    zeros = torch.zeros_like(scales) if layer.offsets is None else layer.offsets.to(torch.float32) + 8 * scales
    return packed, torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def random_layer(rows: int, columns: int, bits: int, device: str, seed: int) -> QuantizedLinear:
    weight = torch.randn(rows, columns, device=device, generator=torch.Generator(device).manual_seed(seed)) * 0.02
    return QuantizedLinear.from_float(weight, None, f"int{bits}")


def bench_matrix(name: str, rows: int, columns: int, bits: int, tokens: int, args, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layers = [random_layer(rows, columns, bits, device, seed) for seed in range(args.layers)]
    x = torch.randn(tokens, columns, device=device).to(dtype)
    floats = [layer.dequantized(dtype) for layer in layers]
    reference = (x.double() @ layers[0].dequantized(torch.float64).T)
    whole = rows * columns
    variants = {"float": (lambda i: F.linear(x, floats[i])),
                "torch": (lambda i: layers[i].product_in_pieces(x, FORWARD_ELEMENTS, kernel=False)),
                "triton": (lambda i: layers[i].product_in_pieces(x, FORWARD_ELEMENTS, kernel=True)),
                "shipped": (lambda i: layers[i](x)),
                "whole": (lambda i: layers[i].product_in_pieces(x, whole, kernel=True))}
    extra = {}
    if bits == 4 and device == "cuda":
        operands = [tinygemm_operands(layer) for layer in layers]
        variants["tinygemm"] = lambda i: torch.ops.aten._weight_int4pack_mm(x, operands[i][0], layers[i].group,
                                                                             operands[i][1])
        extra["tinygemm"] = sum(t.numel() * t.element_size() for t in operands[0])
    row = {"matrix": name, "rows": rows, "columns": columns, "bits": bits, "tokens": tokens, "variants": {}}
    for variant, fn in variants.items():
        got = fn(0).double()
        error = float((got - reference).abs().max() / reference.abs().max())
        us = timed_us(fn, [(i,) for i in range(len(layers))], device, args.replays)
        row["variants"][variant] = {"us": us, "relative_error": error, "extra_bytes": extra.get(variant, 0)}
    del floats
    return row


def write_markdown(report: dict, path: Path) -> None:
    variants = list(dict.fromkeys(v for r in report["rows"] for v in r["variants"]))
    lines = ["# Packed prefill products (issue 19)", "",
             f"From `benchmarks/bench_packed_prefill.py` on {report['device']} ({report['torch']}): one product of a "
             f"chunk of bf16 activations by a LLaMA-2-7B projection, µs (median of {report['replays']} replays of a "
             f"CUDA graph over {report['layers']} layers' weights); `float`: cuBLAS on bf16 weights; `torch`: float "
             f"copies of {report['forward_elements']:,} weights at a time made by torch operations, then cuBLAS (the "
             "GPU's path before 2026-12-04); `triton`: the same copies by `dequant_kernels.py`; `shipped`: "
             f"`QuantizedLinear.forward` (Triton, {report.get('gpu_forward_elements', 0):,} weights at a time on a "
             "GPU; on the CPU the torch path); `whole`: one Triton copy of the whole matrix; `tinygemm`: "
             "`torch._weight_int4pack_mm` on its own copy of the weights (extra MB). Error: largest |difference| from a float64 product of the same dequantized "
             "weights over its largest magnitude.", "",
             "| weights | matrix (out x in) | tokens | " + " | ".join(f"{v} µs" for v in variants)
             + " | best packed / float | errors | extra MB |",
             "|---|---|---|" + "---|" * len(variants) + "---|---|---|"]
    for r in report["rows"]:
        v = r["variants"]
        packed = min((v[k]["us"], k) for k in v if k != "float")
        lines.append(f"| int{r['bits']} | {r['matrix']} ({r['rows']}x{r['columns']}) | {r['tokens']} | "
                     + " | ".join(f"{v[k]['us']:.1f}" if k in v else "-" for k in variants)
                     + f" | {packed[1]} {packed[0] / v['float']['us']:.2f}x | "
                     + ", ".join(f"{k} {v[k]['relative_error']:.1e}" for k in v) + " | "
                     + ", ".join(f"{k} {v[k]['extra_bytes'] / 1e6:.1f}" for k in v if v[k]["extra_bytes"]) + " |")
    lines += ["", "Per decoder layer (four q/k/v/o products, two gate/up, one down), µs:", "",
              "| weights | tokens | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for bits in sorted({r["bits"] for r in report["rows"]}):
        for tokens in sorted({r["tokens"] for r in report["rows"]}):
            rows = [r for r in report["rows"] if r["bits"] == bits and r["tokens"] == tokens]
            if {r["matrix"] for r in rows} != set(PER_LAYER):
                continue
            cells = []
            for k in variants:
                if all(k in r["variants"] for r in rows):
                    cells.append(f"{sum(PER_LAYER[r['matrix']] * r['variants'][k]['us'] for r in rows):.0f}")
                else:
                    cells.append("-")
            lines.append(f"| int{bits} | {tokens} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=(4, 8))
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 729])
    parser.add_argument("--layers", type=int, default=4, help="weights per graph (more bytes than L2 holds)")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script, not speed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bench_packed_prefill")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    matrices = SMOKE_MATRICES if args.smoke else MATRICES
    rows = []
    for bits in args.bits:
        for tokens in args.tokens:
            for name, (out_features, in_features) in matrices.items():
                rows.append(bench_matrix(name, out_features, in_features, bits, tokens, args, device))
                times = {k: round(v["us"], 1) for k, v in rows[-1]["variants"].items()}
                print(f"int{bits} {name} tokens={tokens}: {times}", flush=True)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "layers": args.layers, "replays": args.replays, "forward_elements": FORWARD_ELEMENTS,
              "gpu_forward_elements": GPU_FORWARD_ELEMENTS, "rows": rows,
              "median_error": {k: statistics.median(r["variants"][k]["relative_error"] for r in rows
                                                    if k in r["variants"])
                               for k in dict.fromkeys(v for r in rows for v in r["variants"])}}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
