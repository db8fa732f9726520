"""Decode attention alone: the Triton kernels (model/decode_attention.py) against the decoder's
explicit path compiled as the decode block compiles it, per model shape of bench_gpu.py, bf16.

For each shape: the error of both against a float64 reference, then each launch shape of a sweep
(slots per block, programs, warps) and the explicit path, timed as a CUDA graph of one call per
layer over the layers' own caches (so the caches do not sit in L2 as one repeated buffer would),
replayed back to back between device events; median of several replays. Bytes are the K and V
slots read once per call; GB/s = those bytes / time. The fastest launch shape per model is what
``DecodeKernelTuning`` should hold. ``--kv-cache int8``: the caches as int8 codes with a float32
scale per row (cache/kv_codes.py), read packed by the kernels; the explicit path dequantizes each
layer and turns its keys first, as the torch path does; the reference is the rows a float cache
would hold (dequantized, keys turned to their slots).

Writes ``results/bench_decode_attention.{json,md}``; prints the table. ``--smoke`` runs tiny shapes
through Triton's CPU interpreter (checks the script; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported

from bench_gpu import FAMILY_SHAPES, SHAPES, SMOKE_SHAPES, cache_row_bytes, write_checkpoint_config  # noqa: E402
from launch_tuning import kept_tuning, sweep  # noqa: E402
from ros_infmllm.cache.kv_codes import KV_CACHE_DTYPES, dequantize_rows, quantize_rows, read_keys, read_tables  # noqa: E402
from ros_infmllm.model import decode_attention as op  # noqa: E402
from ros_infmllm.model.config import load_config  # noqa: E402
from ros_infmllm.model.decoder import Attention  # noqa: E402
from ros_infmllm.rope import Rotary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 32  # inf-mllm's retrieval window: the mass is computed (0 with --no-mass: streamingllm's call)


def inputs(attention: Attention, capacity: int, layers: int, device: str, dtype: torch.dtype, seed: int):
    """Per layer: q, k, v of the new token ``[heads|kv_heads, 1, dim]``, the cache ``[kv_heads, C, dim]``
    (random: zeros would hide wrong indexing) and a mask with the last 100 slots empty."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    mask = torch.ones(1, capacity + 1, dtype=torch.bool, device=device)
    mask[0, capacity - 100:capacity] = False
    return [(draw(heads, 1, dim), draw(kv_heads, 1, dim), draw(kv_heads, 1, dim), draw(kv_heads, capacity, dim),
             draw(kv_heads, capacity, dim), mask) for _ in range(layers)]


def packed(tables: tuple, q, k, v, past_k, past_v, mask) -> tuple:
    """One layer's inputs with its cache as int8 codes (the random keys taken as unrotated), the
    row scales and the slots' rotation ``tables`` last: what the kernel reads."""
    (k_codes, k_scale), (v_codes, v_scale) = quantize_rows(past_k), quantize_rows(past_v)
    return q, k, v, k_codes, v_codes, mask, k_scale, v_scale, *tables


def unpacked(q, k, v, k_codes, v_codes, mask, k_scale, v_scale, read_cos, read_sin) -> tuple:
    """``packed``'s inputs with the cache as a float cache holds it (float32): what the reference reads."""
    keys = read_keys(k_codes, k_scale, read_cos, read_sin, torch.float32)
    return q, k, v, keys, dequantize_rows(v_codes, v_scale, torch.float32), mask


def reference(attention: Attention, q, k, v, past_k, past_v, mask):
    kv_heads = attention.num_kv_heads
    keys = torch.cat((past_k, k), 1).double()
    values = torch.cat((past_v, v), 1).double()
    grouped = q.double().reshape(kv_heads, -1, attention.head_dim)
    scores = grouped @ keys.transpose(-1, -2) * attention.head_dim ** -0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ values).reshape(attention.num_heads, 1, -1), probs.sum(1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def mass_error(mass: torch.Tensor | None, want: torch.Tensor) -> float:
    """Relative error of the mass; nan where none was asked for (``--no-mass``)."""
    return float("nan") if mass is None else relative(mass, want)


def timed_us(fn, per_layer: list, device: str, replays: int) -> float:
    """µs per call: a CUDA graph of one call per layer, replayed; median over replays."""
    if device != "cuda":
        started = time.perf_counter()
        for args in per_layer:
            fn(*args)
        return 1e6 * (time.perf_counter() - started) / len(per_layer)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for args in per_layer:
                fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in per_layer:
            fn(*args)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(1e3 * start.elapsed_time(end) / len(per_layer))
    return statistics.median(times)


def bench_shape(name: str, shape: dict, args, device: str, dtype: torch.dtype,
                shipped: op.DecodeKernelTuning) -> dict:
    window = 0 if args.no_mass else WINDOW
    cfg = load_config(write_checkpoint_config(Path(tempfile.mkdtemp()) / name, shape)).text
    attention = Attention(cfg).to(device)
    group = cfg.num_heads // cfg.num_kv_heads
    per_layer = inputs(attention, args.capacity, cfg.num_layers, device, dtype, seed=1)
    int8 = args.kv_cache == "int8"
    bytes_read = 2 * cfg.num_kv_heads * args.capacity * cache_row_bytes(cfg.head_dim, dtype, args.kv_cache)
    tables = read_tables(Rotary(cfg.head_dim, cfg.rope_theta), torch.arange(args.capacity, device=device))
    if int8:
        per_layer = [packed(tables, *layer) for layer in per_layer]

    def explicit(q, k, v, past_k, past_v, mask, *int8_rows):
        if int8_rows:  # the torch path's int8 cache: this layer dequantized and its keys turned first
            k_scale, v_scale, read_cos, read_sin = int8_rows
            past_k = read_keys(past_k, k_scale, read_cos, read_sin, q.dtype)
            past_v = dequantize_rows(past_v, v_scale, q.dtype)
        return attention._explicit(q, k, v, past_k, past_v, mask, window, group)

    def kernel(q, k, v, past_k, past_v, mask, *int8_rows):
        return attention._kernel(q, k, v, past_k, past_v, mask, window, int8_rows or None)

    compiled = (torch.compile(explicit, dynamic=False, options={"split_reductions": False})
                if device == "cuda" else explicit)
    fresh = inputs(attention, args.capacity, 1, device, dtype, seed=2)[0]  # other values than the timed ones
    if int8:
        fresh = packed(tables, *fresh)
    want_out, want_mass = reference(attention, *(unpacked(*fresh) if int8 else fresh))
    result = {"model": name, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
              "layers": cfg.num_layers, "bytes_per_call": bytes_read}
    out, mass = compiled(*fresh)
    result["explicit"] = {"us": timed_us(compiled, per_layer, device, args.replays),
                          "out_error": relative(out, want_out), "mass_error": mass_error(mass, want_mass)}
    tunings = [op.DecodeKernelTuning(**vars(shipped))]
    shipped_mass = shipped.mass_block_for(group)
    # a sweep over an int8 cache sets its pass's own fields (and the float ones alike: unused there)
    # two_pass: where each KV head serves one query head, an int8 cache's two-pass kernel (its own fields)
    tunings += [op.DecodeKernelTuning(block=b, grouped_block=b, programs=p, min_split=m, num_warps=w, num_stages=s,
                                      int8_block=b, int8_programs=p, int8_num_warps=w, int8_num_stages=s,
                                      two_pass=two, two_pass_block=b, two_pass_programs=p, two_pass_num_warps=w,
                                      two_pass_num_stages=s, two_pass_maxnreg=r, valid_words=shipped.valid_words,
                                      mass_block=mb, grouped_mass_block=mb, pdl=pdl)
                for b, p, m, w, s, mb, pdl, two, r in itertools.product(
                    args.blocks, args.programs, args.min_splits, args.warps, args.stages,
                    [shipped_mass] if args.no_mass else args.mass_blocks or [shipped_mass], args.pdl,
                    args.two_pass if int8 and group == 1 else [False],
                    args.maxnreg if int8 and group == 1 else [0])
                if two or not r]  # a register cap is the two-pass kernel's alone

    def errors() -> dict:
        out, mass = kernel(*fresh)
        return {"out_error": relative(out, want_out), "mass_error": mass_error(mass, want_mass)}

    result["variants"] = sweep(op.TUNING, tunings, lambda: timed_us(kernel, per_layer, device, args.replays), errors)
    result["shipped"] = result["variants"].pop(0)
    result["shipped"]["block_used"] = shipped.block_for(cfg.num_heads // cfg.num_kv_heads, int8)
    for entry in [result["explicit"], result["shipped"]] + result["variants"]:
        entry["gb_per_s"] = bytes_read / entry["us"] / 1e3
    result["best"] = min(result["variants"], key=lambda v: v["us"])
    return result


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Decode attention: Triton kernels against the explicit path ({report['device']}, "
             f"{report['dtype']}, {'int8 cache, ' if report.get('kv_cache') == 'int8' else ''}"
             f"capacity {report['capacity']}, "
             f"{'no mass (streamingllm' + chr(39) + 's call)' if report.get('no_mass') else 'mass computed'})", "",
             "Shipped: the launch shape `DecodeKernelTuning` holds; best: the fastest of the sweep.", "",
             "| model | heads / KV heads / dim | K+V MB per call | explicit us (GB/s) | shipped us (GB/s), block | "
             "best us: block, programs, min split, warps, stages, mass block, pdl | shipped speed-up | "
             "error out / mass |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        e, s, b = r["explicit"], r["shipped"], r["best"]
        lines.append(f"| {r['model']} | {r['heads']} / {r['kv_heads']} / {r['head_dim']} | "
                     f"{r['bytes_per_call'] / 1e6:.1f} | {e['us']:.1f} ({e['gb_per_s']:.0f}) | "
                     f"{s['us']:.1f} ({s['gb_per_s']:.0f}), {s['block_used']} | {b['us']:.1f}: {launch(b)} | {e['us'] / s['us']:.2f}x | "
                     f"{s['out_error']:.1e} / {s['mass_error']:.1e} |")
    lines += ["", "Every launch shape of the sweep:", "",
              "| model | block, programs, min split, warps, stages, mass block, pdl | us | GB/s |", "|---|---|---|---|"]
    for r in report["models"]:
        for v in sorted(r["variants"], key=lambda v: v["us"]):
            lines.append(f"| {r['model']} | {launch(v)} | {v['us']:.1f} | {v['gb_per_s']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def launch(variant: dict) -> str:
    shape = ", ".join(str(variant[k]) for k in ("block", "programs", "min_split", "num_warps", "num_stages",
                                                 "mass_block", "pdl"))
    shape += ", two-pass" if variant.get("two_pass") else ""
    return shape + (f" at most {variant['two_pass_maxnreg']} registers" if variant.get("two_pass")
                    and variant.get("two_pass_maxnreg") else "")


def on_off(text: str) -> bool:
    """``on`` / ``off`` (also true/false, 1/0) as a bool; anything else is argparse's error."""
    if text.lower() not in ("on", "off", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected on or off")
    return text.lower() in ("on", "true", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES),
                        help=f"default: {', '.join(SHAPES)} (also: {', '.join(FAMILY_SHAPES)})")
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--programs", type=int, nargs="+", default=[66, 132, 264, 528])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[3])
    parser.add_argument("--min-splits", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--mass-blocks", type=int, nargs="+", default=None,
                        help="slots per mass program of the combine kernel, both kinds of K/V head "
                             "(default: the shipped one for the model's, mass_block or grouped_mass_block); "
                             "the probability "
                             "pass of h2o-style policies, issue 17's SmolVLM2 cost")
    parser.add_argument("--pdl", type=on_off, nargs="+", default=[True],
                        metavar="on|off", help="programmatic dependent launch of both kernels (GPUs that have it)")
    parser.add_argument("--two-pass", type=on_off, nargs="+", default=[False],
                        help="over an int8 cache where each KV head serves one query head: the two-pass kernel "
                             "(on), the one-pass kernel (off), or both")
    parser.add_argument("--maxnreg", type=int, nargs="+", default=[0],
                        help="registers per thread the two-pass kernel is capped at (0: no cap), swept")
    parser.add_argument("--no-mass", action="store_true",
                        help="time the call without the mass (streamingllm's): the partial pass stores no scores "
                             "and the combine kernel merges the outputs only")
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="model",
                        help="the caches' storage: the model's dtype, or int8 codes with row scales")
    parser.add_argument("--name", default="bench_decode_attention", help="results file name (without extension)")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    shapes, dtype = {**SHAPES, **FAMILY_SHAPES}, torch.bfloat16
    if args.smoke:
        shapes, args.models, dtype = SMOKE_SHAPES, list(SMOKE_SHAPES), torch.float32
        args.capacity, args.blocks, args.programs, args.warps, args.replays = 80, [16], [4, 8], [4], 1
        args.min_splits, args.mass_blocks = [16], [32, 64]
    unknown = [name for name in args.models if name not in shapes]
    if unknown:
        parser.error(f"unknown model shapes {unknown}: choose from {', '.join(shapes)}")
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "capacity": args.capacity,
              "no_mass": args.no_mass, "kv_cache": args.kv_cache, "models": []}
    with kept_tuning(op.TUNING) as shipped:
        for name in args.models:
            report["models"].append(bench_shape(name, shapes[name], args, device, dtype, shipped))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, args.out / f"{args.name}.md")
    print((args.out / f"{args.name}.md").read_text().split("\n\nEvery")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
