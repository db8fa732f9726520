"""``infmllm_export``: checkpoint -> ONNX graphs + manifest (+ TensorRT engines when a TensorRT
module is importable) in one folder, which the node's onnxruntime/tensorrt backends read."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .manifest import PRECISIONS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infmllm_export", description=__doc__)
    parser.add_argument("--model", default="", help="checkpoint folder (default: the bundled demo model)")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. engines/demo")
    parser.add_argument("--capacity", type=int, default=1024, help="KV cache slots baked into the step graph")
    parser.add_argument("--max-chunk", type=int, default=128, help="most tokens per step (prefill chunk)")
    parser.add_argument("--max-images", type=int, default=4, help="most images per vision call")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--min-pixels", type=int, default=0,
                        help="Qwen2-VL / Qwen2.5-VL: the node's vision.min_pixels (0: the checkpoint's)")
    parser.add_argument("--max-pixels", type=int, default=0,
                        help="Qwen2-VL / Qwen2.5-VL: the node's vision.max_pixels (0: the checkpoint's); the "
                             "vision graph takes a 640x480 camera's frames resized within them")
    parser.add_argument("--weights", choices=("float", "int8", "int4", "auto"), default="float",
                        help="the decoder blocks' projections in the step graph: float (in --precision), or packed "
                             "int8 / int4 (groups of 32, dequantized by the graph); auto: a GGUF's own blocks")
    parser.add_argument("--engines", choices=("auto", "yes", "no"), default="auto",
                        help="build TensorRT engines: auto = when tensorrt or tensorrt_rtx imports")
    parser.add_argument("--tensorrt-module", choices=("tensorrt", "tensorrt_rtx"),
                        help="which TensorRT Python module builds (default: tensorrt, else tensorrt_rtx)")
    parser.add_argument("--compute-capability", nargs="+", metavar="SM",
                        help="TensorRT-RTX only: GPU targets such as SM86 SM89 (default: the GPU present)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ..demo import bundled_model_path
    from .onnx_export import export_onnx
    from .trt_build import EngineBuildError, build_engines, tensorrt_module

    model = Path(args.model) if args.model else bundled_model_path()
    started = time.monotonic()
    try:
        manifest = export_onnx(model, args.out, args.capacity, args.max_chunk, args.max_images, args.precision,
                               args.min_pixels, args.max_pixels, args.weights)
    except (ValueError, FileNotFoundError) as error:
        print(f"infmllm_export: {error}", file=sys.stderr)
        return 2
    for spec in manifest.graphs.values():
        print(f"{args.out / spec.onnx}: {(args.out / spec.onnx).stat().st_size / 1e6:.1f} MB, passes onnx.checker")
    print(f"ONNX export done in {time.monotonic() - started:.0f} s")
    if args.engines == "no" or (args.engines == "auto" and tensorrt_module(args.tensorrt_module) is None):
        print("no TensorRT engines built (no tensorrt/tensorrt_rtx module, or --engines no)")
        return 0
    try:
        build_engines(args.out, args.tensorrt_module, args.compute_capability)
    except EngineBuildError as error:
        print(f"infmllm_export: {error}", file=sys.stderr)
        return 3
    print(f"engines and {args.out / 'manifest.json'} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
