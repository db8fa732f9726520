"""Where the decode attention's time goes where each KV head serves one query head (SmolVLM2's
32 heads of 64, LLaMA-2-7B's 32 of 128): the partial pass alone (with and without storing the
scores), the pair of kernels with and without the mass, with and without programmatic dependent
launch, the combine kernel alone, at several mass blocks and combine warps.

Why: the sweep of bench_decode_attention.py times whole launch shapes; this splits one apart, and
found that the combine kernel with the mass cost 5 us per layer at four warps and nothing
measurable at one (``DecodeKernelTuning.combine_warps``). ``--kv-cache int8``: the partial pass
is the int8 cache's one-pass kernel (decode_kernels_int8.py) at its launch shape, over codes, row
scales and float16 read tables: over an H100's 7B shape it read half the bytes yet took about the
bf16 pass's time, and this said whether the pass or the combine held the rest. Since the
twenty-eighth session the op reads these shapes (one query head per KV head) with the two-pass
kernel (decode_kernels_int8_two_pass.py), which this probe does not launch: time it with
bench_decode_attention.py. The kernels are
launched directly at the given shape (not through the op), each variant as a CUDA graph of one
call per layer, median of replays (bench_decode_attention's timing). Writes ``results/probe_decode_combine.txt`` (or
``--out``); ``--smoke`` runs tiny shapes in Triton's CPU interpreter (checks the script, its
numbers mean nothing).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported

import torch  # noqa: E402

from bench_decode_attention import timed_us  # noqa: E402
from ros_infmllm.cache.kv_codes import quantize_rows, read_tables  # noqa: E402
from ros_infmllm.model import decode_kernels, decode_kernels_int8  # noqa: E402
from ros_infmllm.model.decode_attention import TUNING, reads_valid_words  # noqa: E402
from ros_infmllm.model.launch_splits import cdiv, whole_tile_splits  # noqa: E402
from ros_infmllm.rope import Rotary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = 32
# (parts: p partial, c combine; mass; mass block; combine warps; pdl)
VARIANTS = [("p", False, 64, 4, True), ("p", True, 64, 4, True), ("p", False, 64, 4, False),
            ("pc", False, 64, 4, True), ("pc", False, 64, 4, False), ("pc", True, 64, 4, True),
            ("pc", True, 64, 4, False), ("pc", True, 64, 1, True), ("pc", True, 64, 2, True),
            ("pc", True, 128, 1, True), ("pc", True, 256, 1, True), ("pc", True, 256, 4, True),
            ("pc", True, 1024, 4, True), ("pc", True, 4096, 4, True), ("c", False, 64, 4, False),
            ("c", True, 64, 4, False), ("c", True, 256, 4, False), ("c", True, 4096, 4, False),
            ("c", True, 64, 1, False)]


def layer_inputs(dim: int, layers: int, capacity: int, device: str, int8: bool = False) -> list[dict]:
    """Per layer: the new token's q, k, v and a full cache; ``int8``: the cache as int8 codes with
    their row scales and the float16 read tables (keys taken as unrotated)."""
    generator = torch.Generator(device=device).manual_seed(0)
    tables = read_tables(Rotary(dim, 10000.0), torch.arange(capacity, device=device)) if int8 else ()

    def draw(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16)

    def layer() -> dict:
        inputs = dict(q=draw(HEADS, dim), k_new=draw(HEADS, dim), v_new=draw(HEADS, dim), k=draw(HEADS, capacity, dim),
                      v=draw(HEADS, capacity, dim), valid=torch.ones(capacity, dtype=torch.uint8, device=device))
        if int8:
            (inputs["k"], k_scale), (inputs["v"], v_scale) = quantize_rows(inputs["k"]), quantize_rows(inputs["v"])
            inputs["int8_rows"] = (k_scale, v_scale, *tables)
        return inputs

    return [layer() for _ in range(layers)]


def launcher(dim: int, block: int, programs: int, capacity: int, parts: str, with_mass: bool, mass_block: int,
             combine_warps: int, pdl: bool, device: str):
    """The partial and/or combine kernel at this shape, on scratch buffers of their own."""
    splits, split_len = whole_tile_splits(capacity, block, programs // HEADS, block)
    f32 = dict(dtype=torch.float32, device=device)
    scores = torch.zeros((HEADS, capacity), **f32)
    split_max, split_sum = torch.zeros((HEADS, splits), **f32), torch.ones((HEADS, splits), **f32)
    split_acc, mass = torch.zeros((HEADS, splits, dim), **f32), torch.empty((HEADS, capacity + 1), **f32)
    launch = {"launch_pdl": True} if pdl and device == "cuda" else {}
    splits_pad = 1 << max(0, (splits - 1).bit_length())

    shape = dict(SPLIT_LEN=split_len, GROUP=1, GROUP_PAD=16, DIM=dim, BLOCK=block, NUM_SPLITS=splits,
                 WITH_SCORES=with_mass, IEEE=False, PDL=bool(launch), **launch)

    def run(a: dict) -> None:
        out = torch.empty_like(a["q"])
        tensors = (a["q"], a["k"], a["v"], a["valid"], scores, split_max, split_sum, split_acc)
        if "p" in parts and "int8_rows" in a:  # the int8 cache's pass, as the op launches it
            decode_kernels_int8.partial_attention_codes[(HEADS, splits)](
                *tensors, *a["int8_rows"], capacity, dim ** -0.5, **shape,
                VALID_WORDS=reads_valid_words(a["valid"], TUNING), num_warps=TUNING.int8_num_warps,
                num_stages=TUNING.int8_num_stages)
        elif "p" in parts:
            decode_kernels.partial_attention[(HEADS, splits)](
                *tensors, capacity, dim ** -0.5, **shape, num_warps=4, num_stages=3)
        if "c" in parts:
            blocks = cdiv(capacity, mass_block) if with_mass else 0
            decode_kernels.combine_attention[(HEADS, 1 + blocks)](
                a["q"], a["k_new"], a["v_new"], scores, split_max, split_sum, split_acc, out, mass, scores, scores,
                capacity,
                dim ** -0.5, GROUP=1, ROWS=1, DIM=dim, NUM_SPLITS=splits, SPLITS_PAD=splits_pad,
                SPLIT_CHUNK=min(splits_pad, max(1, 8192 // dim)), MASS_BLOCK=mass_block, PDL=bool(launch),
                num_warps=combine_warps, **launch)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "probe_decode_combine.txt")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter")
    parser.add_argument("--kv-cache", choices=("model", "int8"), default="model",
                        help="int8: the int8 cache's partial pass at its shipped launch shape")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    capacity = 256 if args.smoke else 4096
    int8 = args.kv_cache == "int8"
    # (head size, layers, slots per step, programs): SmolVLM2's and LLaMA-2-7B's swept best shapes,
    # or the int8 pass's shipped one
    shapes = [(64, 24, 64, 528), (128, 32, 128, 1056)]
    if int8:
        shapes = [(dim, layers, TUNING.int8_block, TUNING.int8_programs) for dim, layers, _, _ in shapes]
    lines = [f"# produced by benchmarks/probe_decode_combine.py on "
             f"{torch.cuda.get_device_name() if device == 'cuda' else 'the CPU (interpreter)'}, "
             f"{HEADS} KV heads of one query head, capacity {capacity}, "
             f"{'an int8 cache, ' if int8 else ''}us per layer"]
    for dim, layers, block, programs in shapes:
        if args.smoke and int8:  # several splits of several tiles (its pipelined loop) at the smoke capacity
            block, programs = 32, 4 * HEADS
        per_layer = [(inputs,) for inputs in layer_inputs(dim, 1 if args.smoke else layers, capacity, device, int8)]
        for parts, with_mass, mass_block, warps, pdl in VARIANTS:
            run = launcher(dim, block, programs, capacity, parts, with_mass, mass_block, warps, pdl, device)
            us = timed_us(run, per_layer, device, args.replays)
            lines.append(f"dim {dim} parts {parts:2s} mass {int(with_mass)} mass_block {mass_block:4d} "
                         f"combine_warps {warps} pdl {int(pdl)}: {us:6.1f} us")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
