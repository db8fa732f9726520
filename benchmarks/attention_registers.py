"""Registers per thread of the decode attention's partial pass, and what they allow per SM (no GPU).

Why: over an int8 cache the 7B attention call takes 1.5x the time of a bf16 one on an H100
(docs/quantized_weights.md) while reading half the bytes. At batch 1 a call is bound by how
many bytes each SM keeps in flight, and that is bounded by the register file: a program holds its
key tile (and, for an int8 cache, the turn's float32 halves and cos / sin rows) in registers, so
the registers per program set how many programs share an SM, and so how many keys are requested
at once.

Compiles ``decode_kernels.partial_attention`` ahead of time (Triton's compiler and ptxas) for each
case, reads its resource use with the ``cuobjdump`` that ships with Triton, and writes
``results/attention_registers.{json,md}``: registers per thread, stack (spills), programs per SM
that the register file allows (65,536 registers per SM on sm_80 to sm_90), and the key bytes
those programs request at once.

``python benchmarks/attention_registers.py``
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from matvec_sass import cuda_tool
from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
REGISTERS_PER_SM = 65536
# (cache, slots per split, pipeline stages, slots per loop step, warps): the shipped 7B shapes at
# 4,096 slots (one tile per split), a split of four tiles, and smaller tiles / more warps
CASES = [("bf16", 128, 3, 128, 4), ("bf16", 64, 3, 64, 4), ("int8", 128, 2, 128, 4), ("int8", 512, 2, 128, 4),
         ("int8", 64, 2, 64, 4), ("int8", 128, 2, 64, 4), ("int8", 128, 2, 128, 8)]


def resources(cache: str, split: int, stages: int, block: int, warps: int, arch: int, dim: int = 128) -> dict:
    """One compiled case: registers per thread, stack bytes, shared memory and what they allow."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from ros_infmllm.model import decode_kernels

    codes = "*i8" if cache == "int8" else "*bf16"
    pointers = dict(q_ptr="*bf16", k_ptr=codes, v_ptr=codes, valid_ptr="*u8", scores_ptr="*fp32", max_ptr="*fp32",
                    sum_ptr="*fp32", acc_ptr="*fp32", k_scale_ptr="*fp32", v_scale_ptr="*fp32", cos_ptr="*fp32",
                    sin_ptr="*fp32")
    constants = dict(SPLIT_LEN=split, GROUP=1, GROUP_PAD=16, DIM=dim, BLOCK=block, NUM_SPLITS=4096 // split,
                     WITH_SCORES=True, IEEE=False, SCALED=cache == "int8", PDL=arch >= 90)
    signature = dict(pointers, capacity="i32", scale="fp32", **{name: "constexpr" for name in constants})
    names = list(signature)
    source = ASTSource(fn=decode_kernels.partial_attention, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(k),): [["tt.divisibility", 16]] for k in pointers})
    compiled = compile(source, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": warps, "num_stages": stages, "launch_pdl": arch >= 90})
    usage = cuda_tool(compiled.asm["cubin"], "cuobjdump", "-res-usage")
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    programs = REGISTERS_PER_SM // (registers * 32 * warps)
    key_bytes = block * dim * (1 if cache == "int8" else 2)
    return {"cache": cache, "split": split, "stages": stages, "block": block, "warps": warps,
            "registers_per_thread": registers, "stack_bytes": stack, "shared_bytes": compiled.metadata.shared,
            "programs_per_sm_by_registers": programs, "key_bytes_in_flight_per_sm": programs * key_bytes}


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# The decode attention's partial pass: registers and what they allow per SM (sm_{report['arch']}, "
             f"head size {report['dim']}, Triton {report['triton']})", "",
             "From `benchmarks/attention_registers.py`: compiled ahead of time, resource use read by cuobjdump; no GPU. "
             "Programs per SM: what a 65,536-register file allows (other limits may bind first). Key bytes in flight: "
             "those programs' key tiles, requested at once.", "",
             "| cache | slots per split | stages | slots per step | warps | registers / thread | stack bytes | "
             "shared bytes | programs per SM | key bytes in flight per SM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        lines.append(f"| {r['cache']} | {r['split']} | {r['stages']} | {r['block']} | {r['warps']} | "
                     f"{r['registers_per_thread']} | {r['stack_bytes']} | {r['shared_bytes']:,} | "
                     f"{r['programs_per_sm_by_registers']} | {r['key_bytes_in_flight_per_sm']:,} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 90 (H100/H200), 87 (Orin)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="attention_registers")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    import triton

    report = {"arch": args.arch, "dim": 128, "triton": triton.__version__,
              "cases": [resources(*case, arch=args.arch) for case in CASES]}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
