"""Expected decode speed and memory on Jetson Orin boards, from the efficiency measured on a data-centre GPU
(the H100 of the latest llama.cpp comparison by default).

``python benchmarks/jetson_plan.py``: a plan on paper, not a measurement. For decoder shapes of
0.5B, 1.5B, 3B and 7B parameters (Qwen2 / Qwen2.5 / LLaMA-2 shapes, SigLIP so400m/384 tower, a
4096-token cache) in bf16, int8 and int4:

- bytes one decode token reads = the decoder's projections (bf16 2 bytes a weight; int8 1 + a
  float16 scale per 32; int4 0.5 + a float16 scale and offset per 32) + the LM head (bf16, int8
  with packed weights) + the K/V cache (bf16);
- tokens/s = (the board's memory bandwidth x the share of it a copy reaches) x the fraction of
  that roofline our decode reached on that GPU for that weight type (``--measured``: a
  ``bench_llamacpp.py`` results file; the nearest measured shape) / bytes per token. The copy
  share is that GPU's (measured copy bandwidth / datasheet), assumed the same on LPDDR5;
- memory = weights (decoder, embeddings, LM head, vision tower and projector) + cache + the
  workspace that run needed beyond them (peak - parts, same weight type), against the board's
  memory less what JetPack and the robot's other processes keep (``--reserve-gib``).

A fourth setting, ``int4-compact``: int4 blocks with the LM head, the token table and the tower
packed int8 (``embedding_weights`` / ``vision_weights``; a tied table is the head's), its tower
bytes and workspace from a run that measured that setting (``--compact``: a ``bench_llamacpp.py``
file with an ``int4/int8/int8/int8`` row), its decode fraction int4's (the same kernels).

Two tables: with each weight type's own measured fraction, and with the bf16 kernel's fraction
for every type (what a packed kernel as efficient as the bf16 one would give: the goal, while the
packed kernel's measured fraction is far below it).

Writes ``<out>/jetson_plan.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATASHEET_BYTES_PER_S = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}
BOARDS = {  # name: (memory GiB, bandwidth bytes/s)
    "Orin Nano 8GB": (8, 68e9), "Orin Nano 8GB Super": (8, 102e9), "Orin NX 16GB": (16, 102.4e9),
    "AGX Orin 64GB": (64, 204.8e9)}
QWEN2 = {"vocab": 151936, "tied": True}
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied LM head; nearest measured shape
    "qwen2-0.5b": dict(QWEN2, hidden=896, inter=4864, layers=24, heads=14, kv=2, measured="qwen2-1.5b"),
    "qwen2-1.5b": dict(QWEN2, hidden=1536, inter=8960, layers=28, heads=12, kv=2, measured="qwen2-1.5b"),
    "qwen2.5-3b": dict(QWEN2, hidden=2048, inter=11008, layers=36, heads=16, kv=2, measured="qwen2-1.5b"),
    "llama2-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000, tied=False,
                      measured="llama2-7b"),
}
BYTES_PER_WEIGHT = {"float": 2.0, "int8": 1 + 2 / 32, "int4": 0.5 + 4 / 32}
HEAD_FOR = {"float": "float", "int8": "int8", "int4": "int8"}
TOWER_BYTES = 0.81 * (1 << 30)  # SigLIP so400m/384 + projector in bf16, as the H200 and H100 runs held them
COMPACT = ("int4", "int8", "int8", "int8")  # blocks / LM head / token table / tower of ``int4-compact``


def shape_bytes(shape: dict, weights: str, capacity: int, head: str | None = None) -> dict[str, float]:
    """Bytes of a shape's parts; the LM head packed as ``HEAD_FOR`` says unless ``head`` names its type."""
    h, i, layers = shape["hidden"], shape["inter"], shape["layers"]
    kv = h // shape["heads"] * shape["kv"]
    projections = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    head_bytes = shape["vocab"] * h * BYTES_PER_WEIGHT[head or HEAD_FOR[weights]]
    embed_bytes = shape["vocab"] * h * 2.0
    cache = 2 * layers * kv * capacity * 2.0
    blocks = projections * BYTES_PER_WEIGHT[weights]
    held_head = 0.0 if shape["tied"] and (head or HEAD_FOR[weights]) == "float" else head_bytes
    return {"per_token": blocks + head_bytes + cache, "decoder_blocks": blocks, "embeddings": embed_bytes,
            "lm_head": held_head, "cache": cache, "parameters": projections + shape["vocab"] * h * (1 if shape["tied"] else 2)}


def held_bytes(sizes: dict[str, float], tower: float) -> float:
    """What a model holds besides its workspace: weights (blocks, table, head), tower and cache."""
    return sizes["decoder_blocks"] + sizes["embeddings"] + sizes["lm_head"] + tower + sizes["cache"]


def measured_efficiency(report: dict, capacity: int) -> dict[tuple[str, str], dict]:
    """Fraction of the roofline and workspace bytes per (shape, weight type) from the measured run
    (the row whose LM head is packed as HEAD_FOR says); the workspace is the peak less the
    weights, tower and cache counted from the shape (a results file's per-part figures may count
    fused projections twice: the first run's did)."""
    out = {}
    for row in report["ours"]:
        if row["lm_head"] != HEAD_FOR[row["weights"]] or row["model"] not in SHAPES:
            continue
        if (row.get("embeddings", "float"), row.get("vision_weights", "float")) != ("float", "float"):
            continue  # an int4-compact row (compact_figures): its table and tower are not this row's
        sizes = shape_bytes(SHAPES[row["model"]], row["weights"], report["depth"])
        held = held_bytes(sizes, TOWER_BYTES)
        out[(row["model"], row["weights"])] = {"fraction": row["roofline_fraction"],
                                               "workspace": max(0.0, row["peak_memory_bytes"] - held)}
    return out


def decode_efficiency(run: dict) -> dict[tuple[str, str], dict]:
    """The same figures from a ``bench_gpu.py`` results file (its policy of record, the last
    checkpoint of the stream): why: a later kernel is timed there before a whole llama.cpp
    comparison is run again. bench_gpu keeps the LM head in float."""
    out = {}
    for model in run["models"]:
        if model["model"] not in SHAPES:
            continue
        last = model["policies"][run["ours"]]["checkpoints"][-1]
        sizes = shape_bytes(SHAPES[model["model"]], run["weights"], run["capacity"], head="float")
        held = held_bytes(sizes, TOWER_BYTES)
        out[(model["model"], run["weights"])] = {"fraction": model["roofline_ms"] / last["decode_p50_ms"],
                                                 "workspace": max(0.0, last["peak_memory_bytes"] - held)}
    return out


def compact_figures(report: dict) -> dict[str, dict]:
    """Per measured shape, the ``int4-compact`` row's tower bytes and workspace (peak less the
    parts the shape's formula and that tower hold)."""
    out = {}
    for row in report["ours"]:
        setting = (row["weights"], row["lm_head"], row.get("embeddings", "float"), row.get("vision_weights", "float"))
        if setting != COMPACT or row["model"] not in SHAPES:
            continue
        tower = row["parts_bytes"]["vision_and_projector"]
        held = held_bytes(compact_bytes(SHAPES[row["model"]], report["depth"]), tower)
        out[row["model"]] = {"tower": tower, "workspace": max(0.0, row["peak_memory_bytes"] - held)}
    return out


def compact_bytes(shape: dict, capacity: int) -> dict[str, float]:
    """``shape_bytes`` of int4 blocks and an int8 head, with the table int8 (none of its own when
    tied: it reads the head's codes)."""
    sizes = shape_bytes(shape, "int4", capacity, head="int8")
    table = 0.0 if shape["tied"] else shape["vocab"] * shape["hidden"] * BYTES_PER_WEIGHT["int8"]
    return {**sizes, "embeddings": table}


def plan(report: dict, capacity: int, reserve_gib: float, as_float: bool = False,
         later: dict[str, dict] | None = None, compact: dict[str, dict] | None = None) -> list[dict]:
    """One row per (shape, weight type, board); ``as_float``: the bf16 kernel's roofline fraction
    for every weight type (each type's own workspace); ``later``: per bench_gpu results file, its
    ``decode_efficiency``, which replaces the llama.cpp comparison's for its (shape, weight type);
    ``compact``: ``compact_figures`` of a run that measured ``int4-compact`` (its rows added)."""
    copy_share = report["bandwidth_bytes_per_s"] / DATASHEET_BYTES_PER_S.get(report["device"], 4.8e12)
    efficiency = measured_efficiency(report, capacity)
    replaced = {}
    for source, figures in (later or {}).items():
        efficiency.update(figures)
        replaced.update(dict.fromkeys(figures, source))
    rows = []
    for name, shape in SHAPES.items():
        for weights in ("float", "int8", "int4", "int4-compact"):
            packed = (compact or {}).get(shape["measured"]) if weights == "int4-compact" else None
            timed = "int4" if packed else weights  # whose decode fraction the row takes
            measured = efficiency.get((shape["measured"], timed))
            if measured is None or (weights == "int4-compact" and packed is None):
                continue
            if packed:
                measured = {**measured, "workspace": packed["workspace"]}
            if as_float and (shape["measured"], "float") in efficiency:
                measured = {**measured, "fraction": efficiency[(shape["measured"], "float")]["fraction"]}
            sizes = compact_bytes(shape, capacity) if packed else shape_bytes(shape, weights, capacity)
            memory = held_bytes(sizes, packed["tower"] if packed else TOWER_BYTES) + measured["workspace"]
            for board, (memory_gib, bandwidth) in BOARDS.items():
                ms = 1e3 * sizes["per_token"] / (bandwidth * copy_share * measured["fraction"])
                rows.append({"model": name, "weights": weights, "board": board, "tokens_per_s": 1e3 / ms,
                             "ms_per_token": ms, "memory_gib": memory / (1 << 30),
                             "fits": memory / (1 << 30) <= memory_gib - reserve_gib,
                             "efficiency_from": f"{shape['measured']} {'float' if as_float else timed}"
                             + (f", {replaced[(shape['measured'], timed)]}"
                                if not as_float and (shape["measured"], timed) in replaced else ""),
                             "roofline_fraction": measured["fraction"]})
    return rows


def short_name(device: str) -> str:
    """A results file's device as the tables name it: ``NVIDIA H100 80GB HBM3`` -> ``H100``."""
    words = device.split()
    return words[1] if len(words) > 1 and words[0] == "NVIDIA" else device


def table(rows: list[dict], gpu: str) -> list[str]:
    boards = list(BOARDS)
    lines = ["| model | weights | " + " | ".join(boards) + f" | memory GiB | {gpu} roofline fraction used |",
             "|---|---|" + "---|" * len(boards) + "---|---|"]
    for (model, weights) in dict.fromkeys((r["model"], r["weights"]) for r in rows):
        cells = {r["board"]: r for r in rows if r["model"] == model and r["weights"] == weights}
        first = next(iter(cells.values()))
        lines.append(f"| {model} | {weights} | " + " | ".join(
            f"{cells[b]['tokens_per_s']:.0f}" if cells[b]["fits"] else f"no ({cells[b]['tokens_per_s']:.0f})"
            for b in boards) + f" | {first['memory_gib']:.1f} | {first['roofline_fraction']:.2f} ({first['efficiency_from']}) |")
    return lines


def write_markdown(report: dict, measured: list[dict], goal: list[dict], source: Path, capacity: int,
                   reserve: float, path: Path, decode_sources: tuple[Path, ...] = (),
                   compact_source: Path | None = None) -> None:
    later = "".join(f", [{d.name}]({d.name})" for d in decode_sources)
    gpu = short_name(report["device"])
    lines = [f"# Jetson plan (on paper, from the {gpu}'s measured efficiency)", "",
             f"From `benchmarks/jetson_plan.py` over [{source.name}]({source.name}) ({report['device']}, copy "
             f"{report['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s)"
             + (f", its figures replaced where a later bench_gpu run timed the same shape and weight type{later} "
                "(named in the last column)" if decode_sources else "")
             + f"; decode tokens/s at a {capacity}-token cache, "
             f"batch 1; memory = weights + so400m tower + cache + the {gpu} run's workspace; 'no' where it "
             f"exceeds the board's memory less {reserve:g} GiB for JetPack and the robot. Not measured on a Jetson."
             + (f" `int4-compact`: int4 blocks with the LM head, token table and tower packed int8, its tower and "
                f"workspace from [{compact_source.name}]({compact_source.name}), its decode fraction int4's."
                if compact_source else ""), "",
             "Tokens/s with each weight type's measured fraction of the roofline:", ""]
    lines += table(measured, gpu)
    lines += ["", "Tokens/s if the packed kernels reached the bf16 kernel's fraction (the goal, not measured):", ""]
    lines += table(goal, gpu)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", type=Path, default=RESULTS / "bench_llamacpp_h100.json")
    parser.add_argument("--decode", type=Path, nargs="*", default=[],
                        help="bench_gpu.py results files whose (shape, weight type) decode figures replace --measured's")
    parser.add_argument("--compact", type=Path, default=RESULTS / "bench_llamacpp_ours_pdl_h200.json",
                        help="a bench_llamacpp.py file with int4/int8/int8/int8 rows: the int4-compact setting's "
                             "tower and workspace (none: no such rows)")
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--reserve-gib", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = json.loads(args.measured.read_text())
    later = {path.stem: decode_efficiency(json.loads(path.read_text())) for path in args.decode}
    compact = compact_figures(json.loads(args.compact.read_text())) if args.compact.is_file() else {}
    measured = plan(report, args.capacity, args.reserve_gib, later=later, compact=compact)
    goal = plan(report, args.capacity, args.reserve_gib, as_float=True, later=later, compact=compact)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jetson_plan.json").write_text(json.dumps({"source": args.measured.name,
                                                           "compact_source": args.compact.name if compact else None,
                                                           "decode_sources": [p.name for p in args.decode],
                                                           "measured": measured, "bf16_efficiency": goal}, indent=1))
    write_markdown(report, measured, goal, args.measured, args.capacity, args.reserve_gib, args.out / "jetson_plan.md",
                   tuple(args.decode), args.compact if compact else None)
    print((args.out / "jetson_plan.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
