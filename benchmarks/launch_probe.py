"""What a decode step would take without some of its launches: an upper bound on fusing them away.

Why: the 7B int4 step runs at about two thirds of its memory roofline, and most of the rest is the
chain of small dependent launches per layer (four products, the launch rounding x to int8 before
each of them, the attention's partial pass and its combine). Before building a fusion, this
measures what it could save at most: ``bench_gpu.py`` with the named launches skipped.

- ``quantize``: ``matvec_dp4a.quantized_activations`` hands back one fixed buffer of codes and
  stats per input width instead of launching ``quantize_activations``;
- ``combine``: the decode attention's combine launch does not run (its outputs stay unwritten).

**Timing only: the step's numbers are wrong** (x's codes are stale, the attention's output and
mass unwritten), so tokens and evictions are not the model's; the step's launches, bytes and graph
are otherwise the shipped ones. CUDA only.

``python benchmarks/launch_probe.py --without quantize -- --models llama2-7b --weights int4 ...``
(everything after ``--`` goes to bench_gpu.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

def skip_quantize() -> None:
    """x's codes and stats from one fixed buffer per input width (random codes, small scales)."""
    from ros_infmllm.model import matvec_dp4a

    fixed: dict = {}

    def stale_codes(x: torch.Tensor, group: int = 32, norm_weight=None, split: bool = True, pdl: bool = False,
                    groups_per_program: int = 0):
        key = (x.numel(), group, split, x.device)
        if key not in fixed:
            generator = torch.Generator(device=x.device).manual_seed(0)
            fixed[key] = (torch.randint(-100, 100, (x.numel(),), dtype=torch.int8, device=x.device,
                                        generator=generator).view(torch.int32),
                          torch.full((matvec_dp4a.stats_size(x.numel(), group),), 1e-3, device=x.device))
        return fixed[key]

    matvec_dp4a.quantized_activations = stale_codes


def skip_combine() -> None:
    """The combine kernel's launches do nothing."""
    from ros_infmllm.model import decode_kernels

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    decode_kernels.combine_attention = NoLaunch()


SKIPS = {"quantize": skip_quantize, "combine": skip_combine}  # what each launch's name patches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--without", nargs="*", choices=tuple(SKIPS), default=[],
                        help="launches to skip (none: the shipped step, the baseline)")
    parser.add_argument("bench_gpu_args", nargs=argparse.REMAINDER, help="after --: bench_gpu.py's arguments")
    args = parser.parse_args(argv)
    if args.without and not torch.cuda.is_available():
        parser.error("skipping launches needs a CUDA GPU (the CPU runs no Triton decode kernels)")
    for launch in args.without:
        SKIPS[launch]()
    import bench_gpu

    rest = args.bench_gpu_args[1:] if args.bench_gpu_args[:1] == ["--"] else args.bench_gpu_args
    return bench_gpu.main(rest)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
