"""Registers per thread of the decode attention's partial pass, and what they allow per SM (no GPU).

Why: over an int8 cache the 7B attention call took 1.5x the time of a bf16 one on an H100
(docs/quantized_weights.md) while reading half the bytes. At batch 1 a call is bound by how
many bytes each SM keeps in flight: the float pass holds its key tile in registers, so the
registers per program set how many programs share an SM, and so how many keys are requested at
once; the int8 pass (decode_kernels_int8.py) copies its next tiles into shared memory instead,
so there the pipeline's stages hold them.

Compiles ``decode_kernels.partial_attention`` (bf16) and ``decode_kernels_int8.partial_attention_codes``
(int8) ahead of time (Triton's compiler and ptxas) for each case, reads the resource use with the
``cuobjdump`` that ships with Triton, and writes ``results/attention_registers.{json,md}``:
registers per thread, stack (spills), shared memory, the programs per SM that the register file
(65,536 registers per SM on sm_80 to sm_90) and the shared memory (228 KB on sm_90) allow, and
the key bytes those programs request at once (a tile each, or the tiles ahead in a pipelined split).

``python benchmarks/attention_registers.py``
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from matvec_sass import INSTRUCTION, disassemble
from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 233472  # bytes of shared memory per SM on sm_90 (228 KB)
# (cache, slots per split, pipeline stages, slots per loop step, warps[, register cap]): the bf16 pass's shipped 7B
# shape at 4,096 slots (one tile per split) and a smaller tile; the int8 pass (decode_kernels_int8.py,
# pipelined) at one tile per split and at splits of several tiles, as its launch sweep ran them; the
# two-pass kernel (decode_kernels_int8_two_pass.py) at its shipped shape (one tile per split: through its two
# loops) and over four tiles, and at its shipped shape under register caps (DecodeKernelTuning.two_pass_maxnreg:
# more programs per SM, the rest spilled)
CASES = [("bf16", 128, 3, 128, 4), ("bf16", 64, 3, 64, 4), ("int8", 128, 2, 128, 4), ("int8", 512, 2, 128, 4),
         ("int8", 512, 3, 64, 4), ("int8", 512, 2, 64, 8), ("int8", 512, 3, 64, 8), ("int8", 512, 2, 128, 8),
         ("int8 two-pass", 128, 2, 128, 4), ("int8 two-pass", 512, 3, 64, 4),
         *(("int8 two-pass", 128, 2, 128, 4, cap) for cap in (112, 96, 80, 72, 64))]


def resources(cache: str, split: int, stages: int, block: int, warps: int, maxnreg: int = 0, *, arch: int,
              dim: int = 128) -> dict:
    """One compiled case: registers per thread, stack bytes, shared memory and what they allow;
    ``maxnreg`` caps the registers (Triton's option; 0: none)."""
    from ros_infmllm.model import decode_kernels, decode_kernels_int8, decode_kernels_int8_two_pass
    from ros_infmllm.model.ahead_of_time import compile_for, resource_usage
    from ros_infmllm.model.decode_attention import TUNING, register_cap

    two_pass = cache.startswith("int8 two-pass")
    int8 = cache.startswith("int8")
    codes = "*i8" if int8 else "*bf16"
    pointers = dict(q_ptr="*bf16", k_ptr=codes, v_ptr=codes, valid_ptr="*u8", scores_ptr="*fp32", max_ptr="*fp32",
                    sum_ptr="*fp32", acc_ptr="*fp32")
    if int8:  # row scales, and the read tables in float16 (cache/kv_codes.read_tables)
        pointers.update(k_scale_ptr="*fp32", v_scale_ptr="*fp32", cos_ptr="*fp16", sin_ptr="*fp16")
    constants = dict(SPLIT_LEN=split, GROUP=1, GROUP_PAD=16, DIM=dim, BLOCK=block, NUM_SPLITS=4096 // split,
                     WITH_SCORES=True, IEEE=False, PDL=arch >= 90)
    if int8:  # the validity read as the op launches it at a capacity of 4,096
        constants.update(VALID_WORDS=TUNING.valid_words)
    kernel = decode_kernels_int8.partial_attention_codes if int8 else decode_kernels.partial_attention
    if two_pass:  # no padded rows; the loops' stages given to tl.range
        constants = dict(SPLIT_LEN=split, DIM=dim, BLOCK=block, NUM_SPLITS=4096 // split, IEEE=False, PDL=arch >= 90,
                         VALID_WORDS=TUNING.valid_words, STAGES=stages, KEYS_EARLY=False)
        kernel = decode_kernels_int8_two_pass.partial_attention_codes_two_pass
    compiled = compile_for(kernel, arch, dict(pointers, capacity="i32", scale="fp32"), constants, aligned=pointers,
                           num_warps=warps, num_stages=stages, launch_pdl=arch >= 90,
                           **register_cap(maxnreg))
    usage = resource_usage(compiled)
    registers, stack = usage["REG"], usage["STACK"]
    programs = REGISTERS_PER_SM // (registers * 32 * warps)
    by_shared = SHARED_PER_SM // max(1, compiled.metadata.shared)
    tiles_ahead = stages - 1 if split > block else 1  # a pipelined split requests the next stages' tiles
    key_bytes = tiles_ahead * block * dim * (1 if int8 else 2)
    opcodes = (INSTRUCTION.match(line) for line in disassemble(compiled.asm["cubin"]))
    names = [match.group(1) for match in opcodes if match and match.group(1) != "NOP"]
    return {"cache": cache, "split": split, "stages": stages, "block": block, "warps": warps, "maxnreg": maxnreg,
            "registers_per_thread": registers, "stack_bytes": stack, "shared_bytes": compiled.metadata.shared,
            "instructions": len(names), "spill_instructions": sum(name in ("LDL", "STL") for name in names),
            "programs_per_sm_by_registers": programs, "programs_per_sm_by_shared": by_shared,
            "key_bytes_in_flight_per_sm": min(programs, by_shared) * key_bytes}


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# The decode attention's partial pass: registers and what they allow per SM (sm_{report['arch']}, "
             f"head size {report['dim']}, Triton {report['triton']})", "",
             "From `benchmarks/attention_registers.py`: compiled ahead of time, resource use read by cuobjdump; no GPU. "
             "Programs per SM: what a 65,536-register file and 228 KB of shared memory allow (other limits may bind "
             "first). Key bytes in flight: those programs' key tiles requested at once (one each, or the tiles a "
             "pipelined split of several has ahead).", "",
             "| cache | slots per split | stages | slots per step | warps | register cap | registers / thread | "
             "stack bytes | spill instructions / SASS instructions | shared bytes | "
             "programs per SM (registers / shared) | key bytes in flight per SM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        lines.append(f"| {r['cache']} | {r['split']} | {r['stages']} | {r['block']} | {r['warps']} | "
                     f"{r['maxnreg'] or 'none'} | {r['registers_per_thread']} | {r['stack_bytes']} | "
                     f"{r['spill_instructions']} / {r['instructions']:,} | {r['shared_bytes']:,} | "
                     f"{r['programs_per_sm_by_registers']} / {r['programs_per_sm_by_shared']} | "
                     f"{r['key_bytes_in_flight_per_sm']:,} |")
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
