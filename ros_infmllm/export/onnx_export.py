"""Export a checkpoint to ONNX: ``vision.onnx`` and ``decoder_step.onnx`` at a fixed cache
capacity, checked by ``onnx.checker``, described by ``manifest.json``."""
from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import torch

from ..model import load_model
from ..model.llava import LlavaModel
from ..model.quantized import WEIGHT_MODES, weight_modes
from .graphs import STEP_INPUTS, STEP_OUTPUTS, VISION_INPUTS, VISION_OUTPUTS, StepGraph, VisionGraph, frame_size, \
    step_example, vision_example
from .manifest import DTYPE_NAMES, PRECISIONS, GraphSpec, Manifest, TensorSpec, model_sha256
from .packed_weights import pack_initializers, unpack_for_tracing

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a .onnx.data file beside the graph (protobuf's 2 GB cap)


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime", "tensorrt", "tensorrt_rtx_cu13"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def step_spec(model: LlavaModel, capacity: int, max_chunk: int) -> GraphSpec:
    text, dtype = model.cfg.text, DTYPE_NAMES[model.dtype]
    cache = [text.num_layers, text.num_kv_heads, capacity, text.head_dim]
    new = [text.num_layers, text.num_kv_heads, "q", text.head_dim]
    positions = ["q"] if text.mrope_section is None else [3, "q"]  # M-RoPE: temporal, height, width
    inputs = [TensorSpec("embeds", dtype, ["q", text.hidden_size]), TensorSpec("positions", "int64", positions),
              TensorSpec("cache_k", dtype, cache), TensorSpec("cache_v", dtype, cache),
              TensorSpec("valid", "bool", [capacity]), TensorSpec("attn_window", "int64", [])]
    outputs = [TensorSpec("logits", "float32", [1, text.vocab_size]), TensorSpec("new_k", dtype, new),
               TensorSpec("new_v", dtype, new),
               TensorSpec("attn_mass", "float32", [text.num_layers, text.num_kv_heads, f"{capacity}+q"])]
    assert [t.name for t in inputs] == list(STEP_INPUTS) and [t.name for t in outputs] == list(STEP_OUTPUTS)
    return GraphSpec("decoder_step.onnx", inputs, outputs, {"q": [1, max_chunk]})


def vision_spec(model: LlavaModel, max_images: int, size: tuple[int, int]) -> GraphSpec:
    """``n`` images of ``size`` pixels; a dynamic-resolution tower: one frame per call (its
    layout is fixed by the frame's grid, so the batch is too)."""
    dtype, hidden = DTYPE_NAMES[model.dtype], model.cfg.text.hidden_size
    if model.dynamic_resolution:
        rows, cols = model.frame_grid(torch.empty(1, 3, *size, device="meta"))
        return GraphSpec("vision.onnx", [TensorSpec(VISION_INPUTS[0], dtype, [1, 3, *size])],
                         [TensorSpec(VISION_OUTPUTS[0], dtype, [1, rows * cols, hidden])], {})
    inputs = [TensorSpec(VISION_INPUTS[0], dtype, ["n", 3, *size])]
    outputs = [TensorSpec(VISION_OUTPUTS[0], dtype, ["n", model.cfg.num_image_tokens, hidden])]
    return GraphSpec("vision.onnx", inputs, outputs, {"n": [1, max_images]})


def _export(module: torch.nn.Module, example: tuple, spec: GraphSpec, path: Path, external: bool) -> None:
    import onnx

    dims = {symbol: torch.export.Dim(symbol, min=low, max=high) for symbol, (low, high) in spec.dynamic.items()}
    dynamic_shapes = tuple({i: dims[d] for i, d in enumerate(t.shape) if d in dims} or None for t in spec.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], opset_version=OPSET, dynamo=True,
                          dynamic_shapes=dynamic_shapes, external_data=external, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)


def export_onnx(model_dir: str | Path, out: str | Path, capacity: int = 1024, max_chunk: int = 128,
                max_images: int = 4, precision: str = "fp32", min_pixels: int = 0, max_pixels: int = 0,
                weights: str = "float") -> Manifest:
    """Write both graphs and the manifest into ``out``; returns the manifest. ``min_pixels`` /
    ``max_pixels``: a dynamic-resolution tower's pixel budget, as the node's ``vision.*``
    parameters give it (0: the checkpoint's); its vision graph takes a VGA camera's frames so resized.
    ``weights``: the decoder blocks' projections in the step graph, as ``load_model`` takes it
    (``int8`` / ``int4``: packed, dequantized by the graph; see ``packed_weights``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    if weights != "float" and precision == "bf16":
        raise ValueError("packed weights export with precision fp32 or fp16 (ONNX scales in bfloat16 are not "
                         "written here)")
    if not 2 <= max_chunk <= capacity:
        raise ValueError(f"max_chunk must be in [2, capacity={capacity}], got {max_chunk}")
    model_dir, out = Path(model_dir), Path(out)
    model = load_model(model_dir, dtype=PRECISIONS[precision], weights=weights).eval()
    if any(mode.endswith("+lora") for mode in weight_modes(model.decoder)):
        raise ValueError(f"{model_dir}: weights {weights!r} loads a packed base with float LoRA factors, which "
                         f"the exported graphs do not hold: export with --weights float or int8")
    packed = unpack_for_tracing(model, PRECISIONS[precision])  # traced as float, packed in the file after
    out.mkdir(parents=True, exist_ok=True)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    size = None
    if model.dynamic_resolution:
        from ..session.preprocess import preprocessor_for_folder

        pre = preprocessor_for_folder(model_dir, model.cfg.vision, min_pixels, max_pixels)
        size = (pre.height, pre.width)
    size = frame_size(model, size)
    graphs = {"vision": vision_spec(model, max_images, size), "decoder_step": step_spec(model, capacity, max_chunk)}
    with torch.no_grad():
        example = vision_example(model, 1 if model.dynamic_resolution else min(2, max_images), size)
        model.encode_images(*example)  # a tower that lays out its grid once (Qwen2-VL) does it before tracing
        _export(VisionGraph(model), example, graphs["vision"], out / graphs["vision"].onnx, external)
        _export(StepGraph(model), step_example(model, capacity, min(3, max_chunk)), graphs["decoder_step"],
                out / graphs["decoder_step"].onnx, external)
    if packed:
        pack_initializers(out / graphs["decoder_step"].onnx, packed, external)
    modes = {layer.mode for layer in packed.values()}
    manifest = Manifest(model_sha256(model_dir), model.cfg.text.model_type, capacity, max_chunk, max_images,
                        precision, graphs, tool_versions(), str(model_dir.resolve()),
                        "+".join(sorted(modes)) if modes else "float")
    manifest.save(out)
    return manifest
