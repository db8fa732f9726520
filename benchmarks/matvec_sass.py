"""What the decode matrix-vector kernel costs per weight, read from its compiled code (no GPU).

Why: packed int8 / int4 products read their bytes at 1.2-2.6 TB/s on an H200 against bf16's
3.3-3.5 (results/bench_decode_linear_int{8,4}_h200.md), and take the same time for half the
bytes, so something other than memory bounds them. A streaming multiprocessor issues at most
128 thread-instructions per clock (4 schedulers x 32 lanes); an H200 delivers about 18 bytes per
clock per SM (4.8 TB/s over 132 SMs at 1.98 GHz), i.e. 9 bf16 weights, 18 int8 codes or 36 int4
codes. So the loop may spend at most about 14 instructions per bf16 weight, 7 per int8 code and
3.5 per int4 code before instruction issue, not memory, sets the speed.

For each weight type this compiles ``matvec_kernels.matvec`` ahead of time for ``--arch`` (Triton's
compiler and ptxas; pointers 16-byte aligned, as Triton specialises them at run time) at the
shipped launch shape for one LLaMA-2-7B matrix, disassembles it (nvdisasm from Triton's wheel),
finds the main loop and counts its instructions per weight, with the most frequent opcodes.

Writes ``results/matvec_sass.{json,md}``; prints the table. ``python benchmarks/matvec_sass.py``.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
ISSUE_PER_CLOCK = 128  # thread-instructions per clock per SM (4 schedulers x 32 lanes)
WEIGHT_TYPES = {0: ("bf16", "*bf16", 2.0), 8: ("int8", "*i8", 1.0), 4: ("int4", "*u8", 0.5),  # bytes per weight
                -4: ("int4 x int8 dp4a (int4_activations int8)", "*i32", 0.5),
                -8: ("int8 x int8 dp4a (int8_activations int8)", "*i32", 1.0)}


def compile_matvec(bits: int, rows: int, columns: int, arch: int):
    """The kernel as the op launches it for this weight type (its MatvecTuning rows per program)."""
    from ros_infmllm.model import matvec_kernels
    from ros_infmllm.model.ahead_of_time import compile_for
    from ros_infmllm.model.decode_linear import TUNING, chunk_size

    block_n = getattr(TUNING, TUNING.rows_field(abs(bits), bits < 0)) if bits else TUNING.block_n
    warps = TUNING.warps(bits)
    pointers = {name: "*bf16" for name in ("x_ptr", "w_ptr", "out_ptr", "norm_ptr", "bias_ptr", "residual_ptr",
                                           "cos_ptr", "sin_ptr", "scale_ptr", "offset_ptr", "stats_ptr",
                                           "codes_out_ptr", "stats_out_ptr", "norm_out_ptr", "arrivals_ptr")}
    typed = dict(pointers, w_ptr=WEIGHT_TYPES[bits][1], **({"scale_ptr": "*fp16", "offset_ptr": "*fp16"} if bits else {}),
                 **({"x_ptr": "*i32", "stats_ptr": "*fp32"} if bits < 0 else {}))
    constants = dict(N=rows, K=columns, NORM=False, GATED=False, HALF=0, ROTATED_ROWS=0, BIAS=False, RESIDUAL=True,
                     BLOCK_N=block_n, BLOCK_K=chunk_size(columns, TUNING.chunk(abs(bits))),
                     PDL=arch >= 90, BITS=abs(bits),
                     GROUP=32 if bits else 1, OFFSET=abs(bits) == 4, X8=bits < 0, AHEAD=TUNING.packed_ahead if bits else 1,
                     EARLY_EPILOGUE=TUNING.early_epilogue)
    kernel = compile_for(matvec_kernels.matvec, arch, dict(typed, eps="fp32"), constants, aligned=typed,
                         num_warps=warps, launch_pdl=arch >= 90)
    return kernel, constants, warps


def disassemble(cubin: bytes) -> list[str]:
    """SASS instruction lines and labels, by the nvdisasm that ships with Triton."""
    from ros_infmllm.model.ahead_of_time import cuda_tool

    return cuda_tool(cubin, "nvdisasm", "-c").splitlines()


INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9]*)")


def main_loop(lines: list[str]) -> list[str]:
    """The opcodes of the longest backward-branching block (the kernel's loop over chunks)."""
    labels, body = {}, []
    for line in lines:
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            labels[label.group(1)] = len(body)
        match = INSTRUCTION.match(line)
        if match:
            body.append((match.group(1), line))
    loops = []
    for at, (opcode, line) in enumerate(body):
        target = re.search(r"\.L_x_(\d+)", line) if opcode == "BRA" else None
        if target and labels.get(target.group(1), at + 1) <= at:
            loops.append([op for op, _ in body[labels[target.group(1)]:at + 1]])
    return max(loops, key=len) if loops else []


def measure(bits: int, rows: int, columns: int, arch: int) -> dict:
    """``bits`` 0, 8, 4: the kernel's float-x paths; -4 / -8: its int4 / int8 paths against int8
    activations (``X8``)."""
    kernel, constants, warps = compile_matvec(bits, rows, columns, arch)
    loop = main_loop(disassemble(kernel.asm["cubin"]))
    weights = constants["BLOCK_N"] * constants["BLOCK_K"] / (32 * warps)  # per thread per loop step
    per_weight = len(loop) / weights
    name, _, weight_bytes = WEIGHT_TYPES[bits]
    return {"weights": name, "rows_per_program": constants["BLOCK_N"], "chunk": constants["BLOCK_K"],
            "loop_instructions": len(loop), "weights_per_thread_per_step": weights,
            "instructions_per_weight": per_weight, "opcodes": collections.Counter(loop).most_common(10),
            # the issue limit as bytes per clock per SM, against the ~18 an H200's memory supplies
            "issue_bound_bytes_per_clock": ISSUE_PER_CLOCK / per_weight * weight_bytes}


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# The decode matvec's main loop, instructions per weight (sm_{report['arch']}, "
             f"{report['rows']}x{report['columns']}, Triton {report['triton']})", "",
             "From `benchmarks/matvec_sass.py`: compiled ahead of time at the shipped launch shape, disassembled, "
             "the loop over chunks counted. Issue limit: 128 thread-instructions per clock per SM, as bytes of "
             "weights per clock per SM; an H200's memory supplies about 18.", "",
             "| weights | rows per program | loop instructions | weights per thread per step | instructions per "
             "weight | issue limit, bytes/clock/SM | most frequent opcodes |", "|---|---|---|---|---|---|---|"]
    for r in report["kernels"]:
        opcodes = ", ".join(f"{op} {count}" for op, count in r["opcodes"][:6])
        lines.append(f"| {r['weights']} | {r['rows_per_program']} | {r['loop_instructions']} | "
                     f"{r['weights_per_thread_per_step']:.0f} | {r['instructions_per_weight']:.2f} | "
                     f"{r['issue_bound_bytes_per_clock']:.1f} | {opcodes} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 87 (Orin)")
    parser.add_argument("--rows", type=int, default=4096, help="default: LLaMA-2-7B's down projection")
    parser.add_argument("--columns", type=int, default=11008)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="matvec_sass")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    import triton

    report = {"arch": args.arch, "rows": args.rows, "columns": args.columns, "triton": triton.__version__,
              "kernels": [measure(bits, args.rows, args.columns, args.arch) for bits in WEIGHT_TYPES]}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
