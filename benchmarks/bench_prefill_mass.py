"""Per layer, the attention of a prefill chunk whose policy reads every query (``h2o``): the explicit
path (the whole float32 softmax materialised, as before the mass op) against the fused path (fused
attention for the output plus the Triton mass op, ``model/prefill_mass.py``), side by side.

Why: on an H200 ``h2o``'s frame ingest cost 2.6x ``streamingllm``'s, and the SmolVLM2 profile put
the difference in the explicit path (two slow batched products and four passes over the
probabilities per layer). Per shape: a frame's chunk of queries over a full cache of
``--capacity`` slots in every layer (inputs of their own per layer), each path compiled as the
session's prefill is and timed by ``bench_decode_attention.timed_us`` (one CUDA graph of a call per
layer, replayed), and their outputs and masses compared. Beside them: the fused path with each
source of the queries' log-sum-exp (``--lse-from``: the attention kernel's, cuDNN's, or the mass
op's own first kernel; ``model/prefill_attention.py``) and the attention alone (what a chunk pays
without the mass).

GPU: ``python benchmarks/bench_prefill_mass.py --out $OUT`` (seconds). ``--sweep`` also times the mass
op alone (given each query's log-sum-exp, as the decoder calls it) at the shipped launch shape and
at each of a grid of ``PrefillMassTuning`` values (``--block-m``, ``--block-n``, ``--programs``,
``--num-warps``: the mass kernel's rows and keys per tile, programs and warps), with its largest
difference from the explicit path's mass. CPU: ``--smoke`` (a tiny shape in Triton's interpreter:
checks the script and the agreement, not speed).
Results: ``benchmarks/results/<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # before the kernels are first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from bench_decode_attention import timed_us  # noqa: E402
from launch_tuning import kept_tuning, sweep  # noqa: E402
from bench_gpu import FAMILY_SHAPES, SHAPES  # noqa: E402
from results_files import save_report  # noqa: E402
from ros_infmllm.model.config import parse_text_config  # noqa: E402
from ros_infmllm.model import prefill_attention, prefill_mass as mass_op  # noqa: E402
from ros_infmllm.model.decoder import Attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (name, tokens per frame in the chunk) of bench_gpu's shapes: a 640x480 frame's ingest chunk
CHUNKS = {"qwen2-1.5b": 729, "qwen2.5-vl-3b": 394, "smolvlm2-2.2b": 85, "llama2-7b": 729}
SMOKE = {"tiny": {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                  "max_position_embeddings": 4096}}


def layer_inputs(attention: Attention, chunk: int, capacity: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Rotated q ``[heads, chunk, dim]``, the chunk's k / v, a full cache and the prefill mask."""
    generator = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    q, k, v = randn(heads, chunk, dim), randn(kv_heads, chunk, dim), randn(kv_heads, chunk, dim)
    past_k, past_v = randn(kv_heads, capacity, dim), randn(kv_heads, capacity, dim)
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    mask = torch.cat((torch.ones(chunk, capacity, dtype=torch.bool), causal), dim=1).to(device)
    return q, k, v, past_k, past_v, mask


@torch.inference_mode()
def bench_shape(name: str, text: dict, chunk: int, args) -> dict:
    cfg = parse_text_config(text, Path(name))
    attention = Attention(cfg)
    prefill_attention.probe_cudnn(args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
                                  cfg.head_dim)  # as the decoder does when its kernels go on
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    per_layer = [layer_inputs(attention, chunk, args.capacity, args.device, dtype, seed=layer)
                 for layer in range(cfg.num_layers)]
    group = cfg.num_heads // cfg.num_kv_heads
    window = 10**9  # every query, as h2o asks

    def explicit(*inputs):  # the path h2o's prefill took before the mass op
        return attention._explicit(*inputs, window, group)

    def fused(*inputs):  # with the shipped log-sum-exp source
        return attention._fused(*inputs, window, group)

    def attention_only(q, k, v, past_k, past_v, mask):  # the fused output alone: what streamingllm's chunk pays
        keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)
        return prefill_attention.attention(q.reshape(k.shape[0], -1, q.shape[-1]), keys, values, mask, group)

    if args.device == "cuda":  # as the session's prefill runs them
        explicit, fused = torch.compile(explicit, dynamic=False), torch.compile(fused, dynamic=False)
        attention_only = torch.compile(attention_only, dynamic=False)
    (out_e, mass_e), (out_f, mass_f) = explicit(*per_layer[0]), fused(*per_layer[0])
    row = {"model": name, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
           "chunk": chunk, "capacity": args.capacity, "dtype": str(dtype).removeprefix("torch."),
           "lse_from": mass_op.TUNING.lse_from,
           "explicit_ms": timed_us(explicit, per_layer, args.device, args.replays) / 1e3,
           "fused_ms": timed_us(fused, per_layer, args.device, args.replays) / 1e3,
           "attention_only_ms": timed_us(attention_only, per_layer, args.device, args.replays) / 1e3,
           "max_output_difference": float((out_e.float() - out_f.float()).abs().max()),
           "max_mass_difference": float((mass_e - mass_f).abs().max()),
           "mass_per_head": float(mass_f.sum(-1).mean()), "expected_mass_per_head": float(group * chunk)}
    row["speedup"] = row["explicit_ms"] / row["fused_ms"]
    row["layers"] = cfg.num_layers
    row["per_frame_saving_ms"] = (row["explicit_ms"] - row["fused_ms"]) * cfg.num_layers
    row["lse_sources"] = time_lse_sources(attention, per_layer, window, group, mass_e, args)
    if args.sweep:
        row["mass_op"] = sweep_mass_op(per_layer, group, mass_e, args)
    print(f"{name}: explicit {row['explicit_ms']:.3f} ms, fused + mass op {row['fused_ms']:.3f} ms per layer "
          f"({row['speedup']:.2f}x; {row['per_frame_saving_ms']:.1f} ms per frame over {cfg.num_layers} layers)",
          flush=True)
    return row


def time_lse_sources(attention: Attention, per_layer: list, window: int, group: int, reference: torch.Tensor,
                     args) -> list[dict]:
    """The fused path per layer with each source of the queries' log-sum-exp in turn
    (``PrefillMassTuning.lse_from``; the shipped one is restored after): ms, or the error of a
    backend this GPU or build does not run."""
    rows = []
    with kept_tuning(mass_op.TUNING):
        for source in args.lse_from:
            mass_op.TUNING.lse_from = source

            def fused(*inputs):
                return attention._fused(*inputs, window, group)

            if args.device == "cuda":
                torch._dynamo.reset()
                fused = torch.compile(fused, dynamic=False)
            try:
                mass = fused(*per_layer[0])[1]
                ms = timed_us(fused, per_layer, args.device, args.replays) / 1e3
                rows.append({"lse_from": source, "fused_ms": ms,
                             "max_mass_difference": float((mass - reference).abs().max())})
            except Exception as error:  # noqa: BLE001 - a backend this build lacks is a result, not a stop
                rows.append({"lse_from": source, "error": f"{type(error).__name__}: {error}"[:300]})
            print(f"  lse from {source}: {rows[-1]}", flush=True)
    return rows


def sweep_mass_op(per_layer: list, group: int, reference: torch.Tensor, args) -> dict:
    """The mass op alone (its share of the fused path), given each query's log-sum-exp from the
    attention kernel, at the shipped ``PrefillMassTuning`` and at each of the grid; the shipped
    tuning is restored after."""
    inputs = []
    for q, k, v, past_k, past_v, mask in per_layer:
        grouped = q.reshape(k.shape[0], group * q.shape[1], q.shape[2])
        keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)
        lse = prefill_attention.attention_with_lse(grouped, keys, values, mask, group)[1]
        inputs.append((grouped, keys, mask, lse))
    with kept_tuning(mass_op.TUNING) as shipped:
        tunings = [shipped] + [dataclasses.replace(shipped, block_m=m, mass_block_n=n, mass_programs=programs,
                                                   num_warps=warps)
                               for m, n, programs, warps in itertools.product(args.block_m, args.block_n, args.programs,
                                                                              args.num_warps)]
        rows = sweep(mass_op.TUNING, tunings, lambda: timed_us(mass_op.prefill_mass, inputs, args.device, args.replays),
                     lambda: {"max_mass_difference": float((mass_op.prefill_mass(*inputs[0]) - reference).abs().max())})
    return {"shipped": rows[0], "best": min(rows[1:], key=lambda r: r["us"]), "grid": rows[1:]}


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Prefill attention with every query's mass (h2o): explicit path vs fused + mass op", "",
             f"From `benchmarks/bench_prefill_mass.py` on {report['device']}: a chunk of a 640x480 frame's "
             f"tokens over a full cache of {report['capacity']} slots in every layer, per layer: the median of "
             f"{report['replays']} replays of a CUDA graph of one call per layer (compiled, as the session's prefill). "
             "Explicit: the float32 softmax materialised (the path `h2o` prefill took before the mass op). Fused: "
             "scaled_dot_product_attention for the output plus `model/prefill_mass.py` for the mass.", "",
             "The fused path takes each query's log-sum-exp from the source `lse_from` names "
             "(`model/prefill_attention.py`); the attention alone is what a chunk pays without the mass.", "",
             "| shape | heads / KV heads / dim | chunk | explicit ms | fused + mass op ms (lse from) | speed-up | "
             "per frame (all layers) ms saved | attention alone ms | max output diff | max mass diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['heads']} / {r['kv_heads']} / {r['head_dim']} | {r['chunk']} | "
                     f"{r['explicit_ms']:.3f} | {r['fused_ms']:.3f} ({r['lse_from']}) | {r['speedup']:.2f}x | "
                     f"{r['per_frame_saving_ms']:.1f} | {r['attention_only_ms']:.3f} | "
                     f"{r['max_output_difference']:.1e} | {r['max_mass_difference']:.1e} |")
    lines += ["", "The fused path per layer with each source of the log-sum-exp:", "",
              "| shape | lse from | fused + mass op ms | max mass diff |", "|---|---|---|---|"]
    for r in report["rows"]:
        for source in r["lse_sources"]:
            timed = (f"{source['fused_ms']:.3f} | {source['max_mass_difference']:.1e}" if "fused_ms" in source
                     else f"error: {source['error'][:80]} | -")
            lines.append(f"| {r['model']} | {source['lse_from']} | {timed} |")
    swept = [r for r in report["rows"] if "mass_op" in r]
    if swept:
        lines += ["", "The mass op alone per layer, at the shipped launch shape and the best of the grid "
                  "(rows per tile, keys per tile, programs, warps):", "",
                  "| shape | shipped us | best us | best block_m / block_n / programs / warps | best's max mass diff |",
                  "|---|---|---|---|---|"]
        for r in swept:
            shipped, best = r["mass_op"]["shipped"], r["mass_op"]["best"]
            lines.append(f"| {r['model']} | {shipped['us']:.1f} | {best['us']:.1f} | {best['block_m']} / "
                         f"{best['mass_block_n']} / {best['mass_programs']} / {best['num_warps']} | "
                         f"{best['max_mass_difference']:.1e} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CHUNKS))
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sweep", action="store_true", help="also time the mass op alone over a launch-shape grid")
    parser.add_argument("--lse-from", nargs="+", default=list(prefill_attention.LSE_SOURCES),
                        help="sources of each query's log-sum-exp timed in the fused path (PrefillMassTuning.lse_from)")
    parser.add_argument("--block-m", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--programs", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU in Triton's interpreter")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bench_prefill_mass")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.capacity, args.replays = "cpu", 96, 1
        args.block_m, args.block_n, args.programs, args.num_warps = [16], [16, 32], [64], [4]
        args.lse_from = [source for source in args.lse_from if source != "cudnn"]  # a CUDA backend
        shapes = {name: (text, 24) for name, text in SMOKE.items()}
    else:
        every = {**SHAPES, **FAMILY_SHAPES}
        shapes = {name: (every[name]["text"], CHUNKS[name]) for name in args.models}
    rows = [bench_shape(name, text, chunk, args) for name, (text, chunk) in shapes.items()]
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    report = {"device": device, "capacity": args.capacity, "replays": args.replays, "rows": rows}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
