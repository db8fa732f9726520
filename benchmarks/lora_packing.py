"""How much of a merged LoRA update survives packed weights: the demo VLM's decoder.

Why: the demo VLM's decoder is SmolLM2 (Q4_1 blocks, dequantized) plus LoRA updates merged into its
projections (``ros_infmllm.demo.vlm.merge_lora``). Packing the merged floats rounds every weight to
its group's grid; an update smaller than the grid's step is mostly rounded away, and with it what
the fine-tune taught. Measured per projection matrix ``W = W0 + D`` (``W0`` the base, ``D`` the
update) and per packing ``Q``:

- share of the update kept: ``<Q(W) - W0, D> / |D|^2`` (1: all of it; 0: none);
- packing error against the update: ``|Q(W) - W| / |D|``.

CPU, seconds: ``python benchmarks/lora_packing.py`` (the demo VLM is assembled on first use).
Results: ``benchmarks/results/lora_packing_cpu.{json,md}``; eval_demo's ``+int8`` / ``+int4``
suffixes measure what it does to the answers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from results_files import save_report
from ros_infmllm.demo.vlm import base_text_weights, demo_vlm_path
from ros_infmllm.model.checkpoint import LLAVA_LAYOUT, checkpoint_name
from ros_infmllm.model.quantized import QuantizedLinear
from ros_infmllm.model.smollm2 import smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("int8", "int4")


def update_kept(merged: torch.Tensor, base: torch.Tensor, mode: str) -> tuple[float, float]:
    """(share of the update kept, packing error / |update|) of one matrix packed as ``mode``."""
    update = merged - base
    packed = QuantizedLinear.from_float(merged, None, mode).dequantized()
    energy = (update * update).sum()
    return float(((packed - base) * update).sum() / energy), float((packed - merged).norm() / update.norm())


def measure(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> list[dict]:
    """One row per decoder projection that carries an update (``merged`` under the checkpoint's
    names, as ``assemble`` wrote them)."""
    rows = []
    for name, weight in base.items():
        theirs = checkpoint_name(name, LLAVA_LAYOUT)
        if not name.endswith("_proj.weight") or theirs not in merged:
            continue
        update = merged[theirs].float() - weight
        if update.norm() == 0:
            continue
        rows.append({"matrix": name, "update_norm": float(update.norm()), "weight_norm": float(weight.norm()),
                     **{mode: update_kept(merged[theirs].float(), weight, mode) for mode in MODES}})
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        kept = torch.tensor([r[mode][0] for r in rows])
        error = torch.tensor([r[mode][1] for r in rows])
        out[mode] = {"matrices": len(rows), "kept_median": float(kept.median()), "kept_min": float(kept.min()),
                     "kept_max": float(kept.max()), "error_over_update_median": float(error.median())}
    out["update_over_weight_median"] = float(torch.tensor([r["update_norm"] / r["weight_norm"] for r in rows]).median())
    return out


def write_markdown(report: dict, path: Path) -> None:
    s = report["summary"]
    lines = ["# A merged LoRA update through packed weights: the demo VLM's decoder", "",
             "From `benchmarks/lora_packing.py` (CPU): each decoder projection W = W0 + D (W0: SmolLM2's "
             "dequantized Q4_1 weights; D: the demo VLM's merged LoRA update) packed as the node's `weights` "
             "would pack it (round to nearest, groups of 32). Kept: <Q(W) - W0, D> / |D|^2. Error: |Q(W) - W| / |D|. "
             f"Median |D| / |W0| over the matrices: {s['update_over_weight_median']:.3f}.", "",
             "| weights | matrices | update kept, median (min-max) | packing error / update, median |",
             "|---|---|---|---|"]
    for mode in MODES:
        m = s[mode]
        lines.append(f"| {mode} | {m['matrices']} | {m['kept_median']:.3f} ({m['kept_min']:.3f}-{m['kept_max']:.3f}) "
                     f"| {m['error_over_update_median']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="lora_packing_cpu")
    args = parser.parse_args(argv)
    rows = measure(load_file(str(demo_vlm_path() / "model.safetensors")), base_text_weights(smollm2_path()))
    report = {"summary": summary(rows), "rows": rows}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
