"""Packed decoder weights in the exported step graph.

Why: a model exported with float weights loses what packing bought (a 7B int4 model's projections
are 3.8 GB packed, 13.5 GB in bf16). Here each packed projection (``QuantizedLinear``) is traced as
a plain linear layer over its dequantized weight, and the float initializer the exporter writes for
it is then replaced by the packed bytes and ONNX's block-wise ``DequantizeLinear`` (opset 21):

- int8: ``INT8`` codes ``[out, in]``, scales ``[out, in / group]``: ``w = q * scale``;
- int4: the codes as signed ``INT4`` (``q - 8``; TensorRT imports INT4 initializers, not UINT4),
  so codes centred on 8 (GGUF Q4_0) are ``w = (q - 8) * scale`` with no zero point;
- int4 with offsets (Q4_1, and rounding from floats): ``(q - 8) * scale`` as above, then
  ``offset + 8 scale`` added per group (``reshape [out, in / group, group]``, add, reshape back):
  ONNX's zero point is an integer code, which a float offset is not.

The dequantized tensor keeps the float initializer's name, so the graph's ``Gemm`` nodes read it
unchanged. onnxruntime then gives the torch backend's logits on the same packed weights (to float
rounding: the offset form adds in another order), and TensorRT-RTX builds both forms; the plain
``DequantizeLinear`` -> ``Gemm`` form is TensorRT's weight-only pattern, while whether it keeps the
offset form's weights packed has not been measured.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model.quantized import QuantizedLinear

PACKED_OPSET = 21  # DequantizeLinear with block_size and 4-bit types


def unpack_for_tracing(model: nn.Module, dtype: torch.dtype) -> dict[str, QuantizedLinear]:
    """Replace every ``QuantizedLinear`` of ``model`` by an ``nn.Linear`` over its weight
    dequantized to ``dtype`` (the graph's), so the exporter traces a plain product; returns the
    weight initializer's name (``<module path>.weight``) -> the packed layer it came from."""
    packed = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.dequantized(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        setattr(parent, child, linear)
        packed[f"{name}.weight"] = module
    for block in getattr(getattr(model, "decoder", model), "layers", []):  # fused views of the packed layers
        block.self_attn.qkv, block.mlp.gate_up = None, None
    return packed


def pack_initializers(path: Path, packed: dict[str, QuantizedLinear], external: bool) -> None:
    """Rewrite the exported graph at ``path``: each float initializer named in ``packed`` becomes
    the packed layer's codes, scales (and offsets) and the nodes that dequantize them under the
    initializer's name; the opset becomes ``PACKED_OPSET``. Checked by
    ``onnx.checker`` afterwards."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    floats = {t.name: t for t in graph.initializer}
    missing = sorted(set(packed) - set(floats))
    if missing:
        raise ValueError(f"{path.name}: no initializer for the packed weights {', '.join(missing[:3])}")
    nodes = []
    for name, layer in packed.items():
        template = floats[name]
        graph.initializer.remove(template)
        new_tensors, new_nodes = _dequantize(name, layer, template.data_type)
        graph.initializer.extend(new_tensors)
        nodes.extend(new_nodes)
    # the dequantizing nodes first: they depend on initializers only, and the graph stays sorted
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, PACKED_OPSET)
    if external:
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}.data")
    else:
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _dequantize(name: str, layer: QuantizedLinear, float_type: int) -> tuple[list, list]:
    """Initializers and nodes that compute ``layer``'s weight ``[out, in]`` as ``name``."""
    from onnx import helper, numpy_helper

    scale_dtype = helper.tensor_dtype_to_np_dtype(float_type)
    out_features, in_features, group = layer.out_features, layer.in_features, layer.group
    scales = layer.scales.float()
    attributes = dict(axis=1, block_size=group)
    if layer.bits == 8:
        codes = numpy_helper.from_array(layer.qweight.numpy(), f"{name}.codes")
    else:  # signed nibbles q - 8 (TensorRT imports INT4, not UINT4): flipping bit 3 of each nibble
        codes = _int4(f"{name}.codes", layer.qweight.numpy() ^ 0x88, (out_features, in_features))
    scale_tensor = numpy_helper.from_array(scales.numpy().astype(scale_dtype), f"{name}.scales")
    tensors = [codes, scale_tensor]
    if layer.offsets is None:
        return tensors, [helper.make_node("DequantizeLinear", [codes.name, scale_tensor.name], [name],
                                          name=f"{name}.dequantize", **attributes)]
    # q * s + o = (q - 8) * s + (o + 8 s)
    offsets = (layer.offsets.float() + 8 * scales).numpy().astype(scale_dtype)[..., None]
    offset_tensor = numpy_helper.from_array(offsets, f"{name}.offsets")
    grouped_shape = numpy_helper.from_array(np.array([out_features, in_features // group, group], np.int64),
                                            f"{name}.grouped_shape")
    flat_shape = numpy_helper.from_array(np.array([out_features, in_features], np.int64), f"{name}.flat_shape")
    tensors += [offset_tensor, grouped_shape, flat_shape]
    return tensors, [
        helper.make_node("DequantizeLinear", [codes.name, scale_tensor.name], [f"{name}.scaled"],
                         name=f"{name}.dequantize", **attributes),
        helper.make_node("Reshape", [f"{name}.scaled", grouped_shape.name], [f"{name}.grouped"], name=f"{name}.group"),
        helper.make_node("Add", [f"{name}.grouped", offset_tensor.name], [f"{name}.shifted"],
                         name=f"{name}.add_offsets"),
        helper.make_node("Reshape", [f"{name}.shifted", flat_shape.name], [name], name=f"{name}.ungroup")]


def _int4(name: str, packed_bytes: np.ndarray, shape: tuple[int, int]):
    """An ``INT4`` tensor from bytes that hold two codes each, the first in the low nibble: ONNX
    packs the flattened tensor so, as ``QuantizedLinear`` packs each row of an even width, so the
    bytes are copied as they are."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.INT4, dims=shape)
    tensor.raw_data = np.ascontiguousarray(packed_bytes, dtype=np.uint8).tobytes()
    return tensor
