"""How long the int8 cache's two-pass partial pass would take if its instruction issue and its memory
traffic did not overlap at all: a static model, checked against the H100's measured calls.

Compiles the pass ahead of time for sm_90 at several launch shapes (no GPU), counts the SASS
instructions one thread runs (one tile per split: no loop repeats), and sums:

- issue: instructions x warps per program x programs over (132 SMs x 4 schedulers x clock);
- memory: the call's key and value codes and scales over the copy bandwidth bench_gpu.py measured.

On an H100 (twenty-ninth session) the 7B step's profile put the pass alone at 19.1 us and this model
at 19.3 for the shipped shape; the calls measured by bench_decode_attention.py (the pass plus the
combine; results/decode_two_pass_variants_h100.md, bench_decode_attention_kv8_two_pass_h100.md) ranked
as the model ranks them, save where registers leave two programs per SM. The counts are this
machine's Triton's; the device ran Triton 3.6. Writes ``results/two_pass_issue_model.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from attention_registers import resources
from matvec_sass import ISSUE_PER_CLOCK
from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
SMS = 132  # H100 SXM
CLOCK_HZ = 1.755e9  # the H100's clock under load (--clock-control none)
COPY_BYTES_PER_S = 2.99e12  # bench_gpu.py's measured copy bandwidth on the H100 (results/bench_gpu_session29_*_h100.json)
KV_HEADS, CAPACITY = 32, 4096  # LLaMA-2-7B and SmolVLM2: 32 KV heads, one query head each
# (slots per split = per step, warps, head size, the call's measured us with the combine on an H100 or None[,
# register cap]): the shipped 7B shape also under the caps DecodeKernelTuning.two_pass_maxnreg may set (more
# programs per SM, more instructions: the spills), not yet timed
CASES = [(128, 4, 128, 20.7), (128, 8, 128, 26.5), (64, 4, 128, 25.2), (256, 4, 128, 21.7), (128, 4, 64, 13.0),
         (256, 4, 64, 11.9), (128, 4, 128, None, 96), (128, 4, 128, None, 80), (128, 4, 128, None, 64),
         (128, 4, 64, None, 64)]


def model_case(block: int, warps: int, dim: int, measured: float | None, maxnreg: int = 0) -> dict:
    """One launch shape compiled (attention_registers.resources: a split of one tile, registers
    capped at ``maxnreg`` where set) and modelled."""
    compiled = resources("int8 two-pass", block, 2, block, warps, maxnreg, arch=90, dim=dim)
    programs = KV_HEADS * (CAPACITY // block)
    issue_us = 1e6 * compiled["instructions"] * warps * 32 * programs / (SMS * ISSUE_PER_CLOCK * CLOCK_HZ)
    memory_us = 1e6 * KV_HEADS * CAPACITY * 2 * (dim + 4) / COPY_BYTES_PER_S  # codes and a float32 scale per row
    per_sm = min(compiled["programs_per_sm_by_registers"], compiled["programs_per_sm_by_shared"])
    return {"block": block, "warps": warps, "dim": dim, "maxnreg": maxnreg,
            "instructions_per_thread": compiled["instructions"], "spill_instructions": compiled["spill_instructions"],
            "registers_per_thread": compiled["registers_per_thread"],
            "programs_per_sm": per_sm,
            "issue_us": issue_us, "memory_us": memory_us, "serial_us": issue_us + memory_us,
            "overlapped_us": max(issue_us, memory_us),
            # the programs over those one pass of every SM holds: 1.1 is a full wave and a tenth of another
            "waves": programs / (SMS * per_sm),
            "measured_call_us": measured}


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# The int8 cache's two-pass pass: instruction issue and memory, modelled without overlap (sm_90)", "",
             f"From `benchmarks/two_pass_issue_model.py` (Triton {report['triton']}): SASS instructions per thread "
             "at one tile per split, compiled ahead of time; issue = instructions x warps x programs over "
             f"{SMS} SMs x {ISSUE_PER_CLOCK} thread-instructions per clock x {CLOCK_HZ / 1e9:.3f} GHz; memory = the codes and row scales "
             f"over {COPY_BYTES_PER_S / 1e12:.2f} TB/s. Measured: the call (this pass and the combine) on an H100, "
             "bench_decode_attention.py (results/decode_two_pass_variants_h100.md). Overlapped: the larger of "
             "the two, what the call would take if issue and memory overlapped fully (a floor).", "",
             "| slots per split | warps | head size | register cap | instructions / thread (spills) | registers | "
             "programs per SM (waves) | issue us | memory us | issue + memory us | overlapped us | measured call us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        measured = f"{r['measured_call_us']:.1f}" if r["measured_call_us"] else ""
        lines.append(f"| {r['block']} | {r['warps']} | {r['dim']} | {r['maxnreg'] or 'none'} | "
                     f"{r['instructions_per_thread']} ({r['spill_instructions']}) | {r['registers_per_thread']} | "
                     f"{r['programs_per_sm']} ({r['waves']:.2f}) | {r['issue_us']:.1f} | {r['memory_us']:.1f} | {r['serial_us']:.1f} | "
                     f"{r['overlapped_us']:.1f} | {measured} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="two_pass_issue_model")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    import triton

    report = {"triton": triton.__version__, "cases": [model_case(*case) for case in CASES]}
    save_report(args.out, args.name, report, write_markdown)
    for r in report["cases"]:
        print(f"{r['block']:4d} slots {r['warps']} warps dim {r['dim']:3d} cap {r['maxnreg']:3d}: "
              f"{r['instructions_per_thread']} instructions, "
              f"{r['registers_per_thread']} registers, issue {r['issue_us']:.1f} + memory {r['memory_us']:.1f} = "
              f"{r['serial_us']:.1f} us (measured {r['measured_call_us']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
