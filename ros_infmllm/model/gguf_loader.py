"""A model from llama.cpp GGUF files: a text GGUF alone (``CausalLM``), or a text GGUF plus an
``mmproj`` GGUF holding the vision tower and projector (``LlavaModel``).

Every tensor is dequantized by the `gguf` package into the requested dtype; a file with a tensor
type we cannot dequantize is refused before anything is read, in one message that lists them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .causal_lm import CausalLM
from .config import CausalLMConfig
from .freed_heap import HeapReleaser
from .gguf_file import SUPPORTED_TYPES, GGUFFile, open_gguf
from .gguf_mmproj import llava_config, vision_tensor_names
from .gguf_text import needs_unpermute, text_config, text_tensor_names, unpermute_qk
from .llava import LlavaModel
from .materialize import materialize
from .packed_head import place_head_and_table
from .quantized import GGUF_DIRECT_MODES, QUANTIZED_PROJECTIONS, QuantizedLinear

IMAGE_TOKEN_TEXT = "<image>"


def eos_token_ids(text: GGUFFile) -> tuple[int, ...]:
    """End-of-sequence and end-of-turn ids named in the metadata."""
    ids = [text.get(key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def image_token_index(text: GGUFFile) -> int:
    """The id of ``<image>`` where the vocabulary has one (a converted LLaVA), else -1: llama.cpp
    feeds visual tokens without a placeholder id, so ours is then one no tokenizer produces."""
    try:
        return text.tokens.index(IMAGE_TOKEN_TEXT)
    except ValueError:
        return -1


def keeps_packed(kind: str, weights: str) -> bool:
    """Whether a projection stored as ``kind`` stays in its blocks under ``weights``: ``auto`` keeps
    every type we read directly, ``int8`` / ``int4`` only those of their width."""
    mode = GGUF_DIRECT_MODES.get(kind)
    return mode is not None and weights in ("auto", mode)


def packed_projection(file: GGUFFile, theirs: str, kind: str, shape: tuple[int, int], heads: int) -> QuantizedLinear:
    """A block projection kept in its GGUF blocks (re-laid, never through floats); rows of q and
    k un-permuted as the float path does."""
    layer = QuantizedLinear.from_gguf_blocks(file.raw_blocks(theirs), kind, shape)
    if heads:
        order = unpermute_qk(torch.arange(shape[0]), heads)
        for name in ("qweight", "scale_bits", "offset_bits"):
            buffer = getattr(layer, name)
            if buffer is not None:
                setattr(layer, name, buffer[order].contiguous())
    return layer


class RowsAsRead:
    """A GGUF matrix dequantized a piece of rows at a time (``rows[start:stop]`` in ``dtype``), for
    ``QuantizedLinear.from_float``: a tensor rounded as it is read never exists whole in float32
    (a 7B gate projection in F16: 180 MB, beside its copy in ``dtype``). LLaMA's q / k rows
    (``heads``) are read in whole heads and un-permuted per piece."""

    def __init__(self, file: GGUFFile, name: str, dtype: torch.dtype, heads: int = 0) -> None:
        self.file, self.name, self.dtype = file, name, dtype
        self.shape = torch.Size(file.tensor_shape(name))
        self.head_rows = self.shape[0] // heads if heads else 0

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        if not self.head_rows:
            return self.file.dequantized_rows(self.name, start, stop).to(self.dtype)
        low, high = start - start % self.head_rows, -(-stop // self.head_rows) * self.head_rows
        block = unpermute_qk(self.file.dequantized_rows(self.name, low, high), (high - low) // self.head_rows)
        return block[start - low:stop - low].to(self.dtype)


def rounded_projection(file: GGUFFile, theirs: str, heads: int, dtype: torch.dtype, mode: str) -> QuantizedLinear:
    """A block projection of another type (F16, Q5_K, ...) under ``int8`` / ``int4``, or a head or
    table of another width: rounded to nearest from its values in ``dtype`` as its rows are read
    (``RowsAsRead``), as ``quantize_decoder`` rounds a loaded float layer."""
    if file.reads_rows(theirs):
        return QuantizedLinear.from_float(RowsAsRead(file, theirs, dtype, heads), None, mode)
    tensor = file.tensor(theirs)
    if heads:
        tensor = unpermute_qk(tensor, heads)
    return QuantizedLinear.from_float(tensor.to(dtype), None, mode)


def packed_matrix(file: GGUFFile, theirs: str, mode: str, dtype: torch.dtype) -> QuantizedLinear:
    """A matrix outside the blocks (the LM head, the token table) packed in ``mode``: its own blocks
    where its type has that width, else rounded from its values in ``dtype``."""
    kind = file.tensor_type(theirs)
    if keeps_packed(kind, mode):
        return packed_projection(file, theirs, kind, tuple(file.tensor_shape(theirs)), 0)
    return rounded_projection(file, theirs, 0, dtype, mode)


def load_gguf_model(text_path: str | Path, mmproj_path: str | Path | None = None,
                    dtype: torch.dtype = torch.float32, weights: str = "float", lm_head_weights: str = "float",
                    embedding_weights: str = "float") -> CausalLM:
    """Build and fill the model on the CPU (the caller moves it). ``weights`` (see
    ``quantized.WEIGHT_MODES``): ``float`` dequantizes every tensor to ``dtype``; ``auto``, ``int8``
    and ``int4`` keep the block projections stored as Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K packed
    (``QuantizedLinear``; ``keeps_packed``); under ``int8`` / ``int4`` the others are rounded as
    they are read. ``lm_head_weights`` / ``embedding_weights`` packed: the head and table are
    placed packed before the load (``packed_head``, ``packed_matrix``)."""
    text = open_gguf(text_path)
    text_cfg = text_config(text)
    sources: list[tuple[GGUFFile, dict[str, str]]] = [(text, text_tensor_names(text_cfg))]
    if mmproj_path is None:
        cfg = CausalLMConfig(text=text_cfg, eos_token_ids=eos_token_ids(text))
        builder = CausalLM
    else:
        mmproj = open_gguf(mmproj_path)
        cfg = llava_config(mmproj, text_cfg, image_token_index(text), eos_token_ids(text))
        sources.append((mmproj, vision_tensor_names(mmproj, cfg)))
        builder = LlavaModel
    for file, names in sources:
        bad = file.unsupported_types(list(names.values()))
        if bad:
            listed = ", ".join(f"{n} ({t})" for n, t in list(bad.items())[:3])
            raise CheckpointError(f"{file.path}: tensor types not supported: {listed}"
                                  f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} "
                                  f"(supported: {', '.join(SUPPORTED_TYPES)})")
    with torch.device("meta"):
        model = builder(cfg)
    if cfg.text.tie_word_embeddings:  # one table, allocated once
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    # Projections kept in their blocks, or rounded from one tensor's floats, replace the float layers
    # before any storage is given, so loading a packed model never holds its float copy (materialize.py).
    release = HeapReleaser()
    packed = place_head_and_table(model, lm_head_weights, embedding_weights,
                                  lambda ours, mode: packed_matrix(text, sources[0][1][ours], mode, dtype), dtype)
    for ours, theirs in sources[0][1].items():
        module = ours.removesuffix(".weight")
        kind = text.tensor_type(theirs)
        if not (ours.endswith(".weight") and module.endswith(QUANTIZED_PROJECTIONS)):
            continue
        heads = needs_unpermute(text_cfg, ours)
        if keeps_packed(kind, weights):
            layer = packed_projection(text, theirs, kind, tuple(model.get_submodule(module).weight.shape), heads)
        elif weights in ("int8", "int4"):  # other types rounded as they are read: no float model either
            layer = rounded_projection(text, theirs, heads, dtype, weights)
        else:
            continue
        parent, name = module.rsplit(".", 1)
        model.get_submodule(parent).register_module(name, layer)
        packed.add(module)
        release()  # the tensor's temporaries, past a step of growth (freed_heap.py)
    materialize(model, dtype)
    params = dict(model.state_dict())
    with torch.no_grad():
        for file, names in sources:
            for ours, theirs in names.items():
                heads = needs_unpermute(text_cfg, ours) if file is text else 0
                module = ours.removesuffix(".weight")
                if file is text and module in packed:
                    continue
                target = params.get(ours)
                if (not heads and target is not None and target.dim() == 2
                        and tuple(target.shape) == tuple(file.tensor_shape(theirs))):  # a matrix, rows at a time
                    file.copy_into(theirs, target)
                    release()
                    continue
                tensor = file.tensor(theirs)
                if heads:
                    tensor = unpermute_qk(tensor, heads)
                owner = ours.removesuffix(".bias")
                if file is text and owner in packed:  # a packed projection's bias (Qwen2's q/k/v)
                    model.get_submodule(owner).bias = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)
                    release()
                    continue
                if target is None:
                    raise CheckpointError(f"{file.path}: tensor {theirs!r} has no place in the model")
                if tensor.shape != target.shape:
                    if tensor.numel() != target.numel() or target.dim() != 1:
                        raise CheckpointError(f"{file.path}: tensor {theirs!r} has shape {tuple(tensor.shape)}, "
                                              f"the metadata implies {tuple(target.shape)}")
                    tensor = tensor.reshape(target.shape)  # a [1, n] class embedding, say
                target.copy_(tensor.to(dtype))
                release()
    return model
