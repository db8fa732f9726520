"""Finding a model's files and loading them: Hugging Face folders (safetensors; LLaVA layout into
``LlavaModel``, Idefics3 / SmolVLM into ``Idefics3Model``, text-only LLaMA-family models into
``CausalLM``, Qwen2-VL / Qwen2.5-VL into ``Qwen2VLModel``) here, GGUF files through ``gguf_loader``.

The safetensors key-name maps live here and only here. Hugging Face has saved LLaVA under two layouts
(``language_model.model.layers.0...`` before transformers 4.52 and in files it writes today;
``model.language_model.layers.0...`` in some newer files) and vision towers with or without the
``vision_model.`` level; all map to our module names. Every tensor we need must be present with
the right shape, else one ``CheckpointError`` names the file and the tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from safetensors import safe_open

from ..errors import CheckpointError
from .causal_lm import CausalLM
from .compressed_checkpoint import PackedProjection, dequantized, packed_projections, read_packed
from .config import Idefics3Config, LlavaConfig, Qwen2VLConfig, load_config
from .freed_heap import HeapReleaser, release_freed_heap
from .idefics3 import Idefics3Model
from .llava import LlavaModel
from .materialize import materialize
from .packed_head import place_head_and_table
from .qwen2_vl import Qwen2VLModel
from .quantized import HEAD_MODES, WEIGHT_MODES, QuantizedLinear, is_block_projection, quantize_head
from .quantized_embedding import EMBEDDING_MODES, quantize_embeddings
from .quantized_vision import VISION_MODES, quantize_vision
from .packed_lora import attach_packed_base, has_packed_base


@dataclass(frozen=True)
class KeyLayout:
    """How one kind of checkpoint names its tensors. ``prefixes``: (checkpoint prefix, our
    prefix), longest checkpoint prefix first so the most specific one wins; ``saved``: the
    checkpoint prefixes transformers writes today, used to name a missing tensor."""

    prefixes: tuple[tuple[str, str], ...]
    saved: tuple[str, ...]
    unused: tuple[str, ...] = ()  # our names of checkpoint tensors this layout never reads


LLAVA_LAYOUT = KeyLayout(tuple(sorted([
    ("language_model.model.", "decoder."),
    ("model.language_model.", "decoder."),
    ("language_model.lm_head.", "decoder.lm_head."),
    ("lm_head.", "decoder.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "projector."),
    ("model.multi_modal_projector.", "projector."),
], key=lambda pair: -len(pair[0]))), saved=("language_model.", "vision_tower.vision_model.", "multi_modal_projector."),
    unused=("vision_tower.head.", "vision_tower.post_layernorm."))  # SigLIP pooling head, final vision norm
# SmolVLM (Idefics3): ``model.vision_model.*``, ``model.connector.*``, ``model.text_model.*``, ``lm_head.*``.
IDEFICS3_LAYOUT = KeyLayout((("model.vision_model.", "vision_tower."), ("model.connector.", "connector."),
                             ("model.text_model.", "decoder."), ("lm_head.", "decoder.lm_head.")),
                            saved=("model.", "lm_head."))
# Qwen2-VL / Qwen2.5-VL: the Qwen team's files ``visual.*``, ``model.*``, ``lm_head.*``; transformers
# writes ``model.visual.*``, ``model.language_model.*``, ``lm_head.*``.
QWEN2_VL_LAYOUT = KeyLayout(tuple(sorted([
    ("model.language_model.", "decoder."), ("model.visual.", "vision_tower."), ("visual.", "vision_tower."),
    ("lm_head.", "decoder.lm_head."), ("model.", "decoder."),
], key=lambda pair: -len(pair[0]))), saved=("model.language_model.", "model.visual.", "lm_head."))
# Text-only *ForCausalLM checkpoints: ``model.layers.0...``, ``lm_head.weight``.
CAUSAL_LM_LAYOUT = KeyLayout((("lm_head.", "decoder.lm_head."), ("model.", "decoder.")), saved=("model.", "lm_head."))


_LAYOUTS = ((LlavaModel, LlavaConfig, LLAVA_LAYOUT), (Idefics3Model, Idefics3Config, IDEFICS3_LAYOUT),
            (Qwen2VLModel, Qwen2VLConfig, QWEN2_VL_LAYOUT))


def layout_of(model: CausalLM) -> KeyLayout:
    return next((layout for cls, _, layout in _LAYOUTS if isinstance(model, cls)), CAUSAL_LM_LAYOUT)


def config_layout(cfg) -> KeyLayout:
    """The key layout of checkpoints with this config."""
    return next((layout for _, config, layout in _LAYOUTS if isinstance(cfg, config)), CAUSAL_LM_LAYOUT)


def model_class(cfg) -> type[CausalLM]:
    """The module a config builds: one class per checkpoint layout."""
    return next((cls for cls, config, _ in _LAYOUTS if isinstance(cfg, config)), CausalLM)


def canonical_name(key: str, layout: KeyLayout = LLAVA_LAYOUT) -> str | None:
    """Our parameter name for a checkpoint key, or None for keys outside the layout."""
    for prefix, ours in layout.prefixes:
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return None


def checkpoint_name(name: str, layout: KeyLayout = LLAVA_LAYOUT) -> str:
    """The Hugging Face key (transformers' saved layout) for one of our parameter names."""
    for prefix, ours in sorted(layout.prefixes, key=lambda pair: -len(pair[1])):  # decoder.lm_head. first
        if name.startswith(ours) and prefix.startswith(layout.saved):
            return prefix + name[len(ours):]
    return name


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files")
    return files


def check_shape(file: Path, key: str, found: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """Refuse tensor ``key`` of ``file`` unless its shape is the ``shape`` the config implies."""
    if tuple(found) != shape:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(found)}, the config implies {shape}")


def checked_tensor(handle, file: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor ``key`` of an open safetensors file, refused unless it has the ``shape`` the config implies."""
    tensor = handle.get_tensor(key)
    check_shape(file, key, tuple(tensor.shape), shape)
    return tensor


class TensorRows:
    """One safetensors tensor read a slice of rows at a time (``rows[start:stop]``, in ``dtype``),
    for ``QuantizedLinear.from_float``: a matrix rounded as it is read then never has its whole
    float copy in memory (a 7B head: 0.26 GB in bf16), only a piece of rows."""

    def __init__(self, handle, file: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._slice = handle.get_slice(key)
        self.shape = torch.Size(self._slice.get_shape())
        check_shape(file, key, tuple(self.shape), shape)
        self.dtype = dtype

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self._slice[rows].to(self.dtype)


def rounded_as_read(model: CausalLM, folder: Path, ours: str, mode: str, dtype: torch.dtype) -> QuantizedLinear:
    """The folder's tensor for our parameter ``ours`` (the LM head, the token table) rounded to
    ``mode`` from its values in ``dtype`` as its rows are read; its shape checked against the
    meta-device model's (``packed_head``)."""
    layout = layout_of(model)
    shape = tuple(model.get_parameter(ours).shape)
    for file in weight_files(folder):
        if not file.is_file():
            continue  # load_state names the missing file
        with safe_open(str(file), framework="pt") as handle:
            key = next((key for key in handle.keys() if canonical_name(key, layout) == ours), None)
            if key is not None:
                return QuantizedLinear.from_float(TensorRows(handle, file, key, shape, dtype), None, mode)
    raise CheckpointError(f"{folder}: checkpoint is missing tensor {checkpoint_name(ours, layout)!r}")


def load_state(model: CausalLM, model_dir: Path, dtype: torch.dtype, filled: frozenset[str] = frozenset()) -> None:
    """Copy every tensor the model needs from the folder's safetensors files; ``filled``: modules
    already given their weights (packed projections, compressed_checkpoint.py), whose tensors are
    not looked for."""
    layout = layout_of(model)
    expected = {name: tensor for name, tensor in model.state_dict().items()
                if name.rpartition(".")[0] not in filled or name.endswith(".bias")}
    found: dict[str, Path] = {}
    release = HeapReleaser()
    with torch.no_grad():
        for file in weight_files(model_dir):
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index but missing")
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
            with handle:
                for key in handle.keys():
                    name = canonical_name(key, layout)
                    if name is None or (layout.unused and name.startswith(layout.unused)) or name not in expected:
                        continue
                    target = expected[name]
                    target.copy_(checked_tensor(handle, file, key, tuple(target.shape)).to(dtype))
                    found[name] = file
                    release()  # the tensor's read copy, past a step of growth (freed_heap.py)
    lm_head, embed = "decoder.lm_head.weight", "decoder.embed_tokens.weight"
    if lm_head in expected and lm_head not in found and embed in found and model.cfg.text.tie_word_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
        found[lm_head] = found[embed]
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint is missing tensor {checkpoint_name(missing[0], layout)!r}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")


@dataclass(frozen=True)
class CheckpointFiles:
    """Where a model's files are. ``gguf`` is None for a Hugging Face folder (config.json,
    safetensors, tokenizer.json); otherwise the text GGUF, with ``mmproj`` the vision GGUF, if any."""

    folder: Path
    gguf: Path | None = None
    mmproj: Path | None = None

    @property
    def name(self) -> str:
        return str(self.gguf or self.folder)


def locate(path: str | Path, mmproj: str | Path | None = None) -> CheckpointFiles:
    """The files of the model at ``path``: a Hugging Face folder, a ``.gguf`` file (with an optional
    ``mmproj`` GGUF beside it, named explicitly), or a folder holding one text GGUF and at most one
    ``mmproj*.gguf`` (as llama.cpp users keep them)."""
    path = Path(path)
    extra = Path(mmproj) if mmproj else None
    if extra is not None and not extra.is_file():
        raise CheckpointError(f"{extra}: mmproj file not found")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: a model path is a checkpoint folder or a .gguf file")
        return CheckpointFiles(folder=path.parent, gguf=path, mmproj=extra)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model folder not found")
    ggufs = sorted(path.glob("*.gguf"))
    if (path / "config.json").is_file() or not ggufs:
        if extra is not None:
            raise CheckpointError(f"{extra}: an mmproj file goes with a GGUF model, not with the folder {path}")
        return CheckpointFiles(folder=path)
    projections = [f for f in ggufs if f.name.lower().startswith("mmproj")]
    texts = [f for f in ggufs if f not in projections]
    if len(texts) != 1 or (extra is None and len(projections) > 1):
        raise CheckpointError(f"{path}: expected one text GGUF and at most one mmproj*.gguf, found "
                              f"{', '.join(f.name for f in ggufs)}; name the files explicitly")
    return CheckpointFiles(folder=path, gguf=texts[0], mmproj=extra or (projections[0] if projections else None))


def replace_projection(model: CausalLM, name: str, make) -> None:
    """Put ``make(bias)`` in place of the meta-device float layer ``name``; ``bias``: a meta tensor
    shaped as the layer's bias (given storage by ``materialize`` and filled by ``load_state``), or None."""
    layer = model.get_submodule(name)
    bias = None if layer.bias is None else torch.empty_like(layer.bias, device="meta")
    parent, child = name.rsplit(".", 1)
    model.get_submodule(parent).register_module(child, make(bias))


def place_packed(model: CausalLM, folder: Path, weights: str) -> dict[str, PackedProjection]:
    """A compressed-tensors folder's packed projections (GPTQ / AWQ output, compressed_checkpoint.py),
    as for GGUF blocks: under ``auto`` each becomes a ``QuantizedLinear`` from its stored codes,
    under ``int8`` / ``int4`` those of that width do (the others are rounded from their floats by
    ``place_rounded``); under ``float`` they stay float layers, dequantized into after
    ``materialize`` (``fill_dequantized``). Called on the meta-device model, so a packed layer's
    float copy never exists. Returns our module name -> its packed tensors, for every projection
    the folder packs."""
    layout = layout_of(model)
    entries = packed_projections(folder, weight_files(folder), lambda key: canonical_name(key, layout))
    for name, entry in entries.items():
        if weights in ("auto", entry.mode):
            shape = tuple(model.get_submodule(name).weight.shape)
            replace_projection(model, name, lambda bias: read_packed(entry, shape, bias))
    return entries


def place_rounded(model: CausalLM, folder: Path, weights: str, dtype: torch.dtype,
                  entries: dict[str, PackedProjection]) -> set[str]:
    """Under ``int8`` / ``int4``, each block projection not packed already becomes a
    ``QuantizedLinear`` as it is read (rounded to nearest from its values in ``dtype``), a piece of
    rows at a time (``TensorRows``) on the meta-device model: the float model is never built, so a
    7B bf16 checkpoint packs to int4 within the packed model's memory plus a piece's copies, not its
    13.5 GB of floats (a Jetson has no such room). ``entries``: the folder's compressed-tensors
    projections (``place_packed``); those of another width are rounded from their dequantized
    codes. Returns the modules placed; their biases load with ``load_state``."""
    if weights not in ("int8", "int4"):
        return set()
    placed: set[str] = set()
    release = HeapReleaser()

    def place(module: str, values: torch.Tensor | TensorRows) -> None:
        replace_projection(model, module, lambda bias: QuantizedLinear.from_float(values, bias, weights))
        placed.add(module)
        release()  # the rounding's temporaries, past a step of growth (freed_heap.py)

    layout = layout_of(model)
    with torch.no_grad():
        for name, entry in entries.items():
            layer = model.get_submodule(name)
            if isinstance(layer, nn.Linear):  # codes of the other width
                place(name, dequantized(entry, tuple(layer.weight.shape), dtype))
        for file in weight_files(folder):
            if not file.is_file():
                continue  # load_state names the missing file
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    name = canonical_name(key, layout)
                    module = None if name is None else name.removesuffix(".weight")
                    if module is None or module == name or module in entries or not is_block_projection(module):
                        continue
                    layer = model.get_submodule(module)
                    if isinstance(layer, nn.Linear):
                        place(module, TensorRows(handle, file, key, tuple(layer.weight.shape), dtype))
    return placed


def fill_dequantized(model: CausalLM, entries: dict[str, PackedProjection], dtype: torch.dtype) -> None:
    """The float weights (``weights: float``) of the packed projections ``place_packed`` left as float layers."""
    with torch.no_grad():
        for name, entry in entries.items():
            layer = model.get_submodule(name)
            if not isinstance(layer, QuantizedLinear):
                layer.weight.copy_(dequantized(entry, tuple(layer.weight.shape), dtype))


def pack_parts(model: nn.Module, lm_head: str = "float", embeddings: str = "float", vision: str = "float") -> None:
    """Pack the LM head, the token table and the tower's and projector's linear layers, each whose
    mode is not ``float`` (rounded from their floats). The table goes after the head: a table tied
    to a head packed alike reads the head's codes (``quantize_embeddings``)."""
    if lm_head != "float":
        quantize_head(model.decoder, lm_head)
    if embeddings != "float":
        quantize_embeddings(model.decoder, embeddings)
    if vision != "float":
        quantize_vision(model, vision)


def load_model(path: str | Path | CheckpointFiles, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, mmproj: str | Path | None = None,
               weights: str = "float", lm_head_weights: str = "float", embedding_weights: str = "float",
               vision_weights: str = "float") -> CausalLM:
    """Build the model from a checkpoint (see ``locate``) and load its weights, ready for inference:
    ``LlavaModel`` or ``Idefics3Model`` when it has a vision tower, ``CausalLM`` when it is text-only.

    ``weights`` (the decoder blocks' projections; see ``quantized``): ``float`` in ``dtype``;
    ``int8`` / ``int4`` quantized (GGUF Q8_0 / Q4_0 / Q4_1 blocks kept as they are, anything else
    rounded to nearest from floats); ``auto``: a GGUF's own Q8_0 / Q4_0 / Q4_1 blocks kept packed,
    everything else in ``dtype`` (a folder with ``packed_base.json``: its GGUF base's blocks plus
    float LoRA factors, ``packed_lora.py``). ``lm_head_weights``: the LM head in ``dtype``
    (``float``) or packed (``int8`` / ``int4``; a tied table stays float for the embedding).
    ``embedding_weights``: the token table in ``dtype`` or packed likewise (``quantized_embedding.py``;
    a tied table reads the head's codes, and needs the head packed). Both are packed as they are read
    (``packed_head``: a GGUF's own blocks where the width matches, else rounded to nearest from the
    tensor's values), so their float copies are never held.
    ``vision_weights``: the tower's and projector's linear layers in ``dtype`` or packed
    (``quantized_vision.py``). A folder whose projections are stored packed by compressed-tensors
    (GPTQ / AWQ through llm-compressor, ``tools/calibrate.py``) is read as GGUF blocks are: kept
    as stored under ``auto`` or their width, dequantized under ``float``."""
    for name, value, modes in (("weights", weights, WEIGHT_MODES), ("lm_head_weights", lm_head_weights, HEAD_MODES),
                               ("embedding_weights", embedding_weights, EMBEDDING_MODES),
                               ("vision_weights", vision_weights, VISION_MODES)):
        if value not in modes:
            raise ValueError(f"{name} must be one of {', '.join(modes)}, not {value!r}")
    files = path if isinstance(path, CheckpointFiles) else locate(path, mmproj)
    if files.gguf is not None:
        from .gguf_loader import load_gguf_model

        model = load_gguf_model(files.gguf, files.mmproj, dtype, weights, lm_head_weights, embedding_weights)
    else:
        cfg = load_config(files.folder)
        with torch.device("meta"):
            model = model_class(cfg)(cfg)
        packed = place_packed(model, files.folder, weights)
        rounded = place_rounded(model, files.folder, weights, dtype, packed)
        rounded |= place_head_and_table(model, lm_head_weights, embedding_weights,
                                        lambda ours, mode: rounded_as_read(model, files.folder, ours, mode, dtype), dtype)
        model = materialize(model, dtype)  # storage in dtype at once, not float32 first
        fill_dequantized(model, packed, dtype)
        load_state(model, files.folder, dtype, frozenset(packed) | rounded)
        if weights == "auto" and has_packed_base(files.folder):  # a packed base plus float LoRA factors
            attach_packed_base(model, files.folder, dtype)
    pack_parts(model, vision=vision_weights)  # the head and table were packed as they were read
    model = model.to(device).eval()
    model.decoder.rotary.to(device)
    model.requires_grad_(False)
    release_freed_heap()  # on a GPU: the CPU copies just freed
    return model
