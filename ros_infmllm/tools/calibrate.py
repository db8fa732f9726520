"""``infmllm_calibrate``: calibrated weight quantization of a checkpoint's decoder projections (GPTQ
or AWQ, done by llm-compressor), written as a compressed-tensors folder that ``load_model`` reads
packed (``model/compressed_checkpoint.py``; node parameter ``weights: auto``).

Why: round-to-nearest places each weight on the 4-bit grid alone; GPTQ rounds a layer's columns
one after another and moves the error of each onto the columns not yet rounded, weighted by the
layer's inputs over sample data; AWQ first scales the channels that carry large inputs so that
their weights round finer. Calibration runs the model over samples and solves layer by layer
(the demo VLM, a 135M decoder, on a 2-core CPU: GPTQ 345 s for 64 episodes; AWQ, which searches
each pair's channel scales over a grid, 1,530 s for 32), so it is done once, offline; a robot
loads the result.

What is packed: the decoder blocks' seven projections (our kernels' layout; int4 in groups of 32
by default, scales kept in float16 as the kernels read them). The LM head, embeddings, vision tower
and projector stay as they are in the checkpoint (pack them at load with ``lm_head_weights`` etc.).

Text models (``--text FILE``): samples are windows of the file's tokens. The demo VLM:
``python -m ros_infmllm.demo.calibrate_vlm`` (frames and questions from the training world).
llm-compressor and its dependencies are in the package's ``calibrate`` extra.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import CheckpointError

METHODS = ("gptq", "awq")
# files of the source folder the calibrated one does not take: its weights and their index, its
# config (written anew with the quantization config), and a packed GGUF base (packed_lora.py),
# which would make ``weights: auto`` load the base instead of the calibrated codes
NOT_COPIED = ("config.json", "model.safetensors.index.json", "packed_base.json", "recipe.yaml")

TOKEN_ROWS = ("input_ids", "attention_mask")
Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


def block_projections(model: torch.nn.Module, source: Path) -> tuple[list[str], list[str]]:
    """The transformers model's linear layers split into (decoder block projections, all others),
    by our checkpoint layout's names: only the first are quantized."""
    from ..model.checkpoint import config_layout, canonical_name
    from ..model.config import load_config
    from ..model.quantized import is_block_projection

    layout = config_layout(load_config(source))
    targets, others = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            ours = canonical_name(name + ".weight", layout)
            is_block = ours is not None and is_block_projection(ours.removesuffix(".weight"))
            (targets if is_block else others).append(name)
    if not targets:
        raise CheckpointError(f"{source}: no decoder block projections found to quantize")
    return targets, others


# AWQ's smoothing pairs in a LLaMA / Qwen2 block: (the layer whose output is scaled down, the
# projections it feeds, whose input channels are scaled up to match), llm-compressor's defaults
AWQ_PAIRS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ("self_attn.v_proj", ("self_attn.o_proj",)),
             ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
             ("mlp.up_proj", ("mlp.down_proj",)))


def awq_mappings(targets: Sequence[str]) -> list:
    """AWQ's smoothing pairs scoped to the decoder's blocks (``targets``: their projections'
    transformers names). llm-compressor's defaults match by name ends anywhere in the model, so
    in a VLM the vision tower's ``v_proj`` (whose output goes to ``out_proj``, not an ``o_proj``)
    opens a pair that never closes and swallows the decoder's ("AWQ needs to match a single
    smoothlayer for each mapping"); anchored at the decoder's own ``layers.N.`` they cannot."""
    import re

    from llmcompressor.modifiers.transform.awq import AWQMapping

    prefixes = {name.rsplit(".layers.", 1)[0] for name in targets if ".layers." in name}
    if len(prefixes) != 1:
        raise CheckpointError(f"the decoder's projections sit under {sorted(prefixes) or 'no layers.N'}; "
                              "AWQ needs them under one")
    stem = rf"re:^{re.escape(prefixes.pop())}\.layers\.\d+\."
    return [AWQMapping(stem + re.escape(smooth) + "$", [stem + re.escape(b) + "$" for b in balance])
            for smooth, balance in AWQ_PAIRS]


def recipe(method: str, bits: int, group: int, ignore: Sequence[str], targets: Sequence[str] = ()) -> list:
    """llm-compressor modifiers: GPTQ with symmetric groups (codes centred on 8, as GGUF's Q4_0),
    or AWQ's channel scaling (pairs scoped to ``targets``' blocks, ``awq_mappings``) then
    round-to-nearest with asymmetric groups (its usual scheme)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if bits not in (4, 8) or (bits == 8 and method == "awq"):
        raise ValueError("bits: 4 (GPTQ or AWQ) or 8 (GPTQ)")
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=method == "gptq", strategy="group",
                               group_size=group, scale_dtype=torch.float16, actorder="static" if method == "gptq" else None)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=groups, ignore=list(ignore))]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # AWQ scales the channels (by the architecture's mappings of norms to the layers they feed), then
    # the groups are rounded to nearest
    return [AWQModifier(duo_scaling="both", mappings=awq_mappings(targets)),
            QuantizationModifier(config_groups=groups, ignore=list(ignore))]


@contextlib.contextmanager
def host_memory_unpinned() -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins its cached activations in host memory before each grid
    search, which torch refuses on a machine without a GPU ("Cannot access accelerator device");
    pinning only speeds copies to a GPU, so without one it is skipped, for this call only."""
    if torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = pin


def calibrate(source: Path, out: Path, samples: list[dict], collate: Collate, method: str = "gptq", bits: int = 4,
              group: int = 32, model_class=None, processor=None, note: dict | None = None) -> dict:
    """Quantize ``source``'s decoder projections with ``method`` over ``samples`` (each a dict that
    ``collate([sample])`` turns into the model's inputs) and write the folder ``out``. Returns
    what ``calibrated_from.json`` records."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if out.exists():
        raise FileExistsError(f"{out} exists; the calibrated folder is written anew")
    if not samples:
        raise ValueError("calibration needs at least one sample")
    model_class = model_class or AutoModelForCausalLM
    started = time.monotonic()
    model = model_class.from_pretrained(source, dtype=torch.float32).eval()
    source_dtype = stored_dtype(source)
    targets, others = block_projections(model, source)
    processor = processor or PreTrainedTokenizerFast(tokenizer_file=str(source / "tokenizer.json"))
    with host_memory_unpinned():
        oneshot(model=model, dataset=Dataset.from_list(samples), recipe=recipe(method, bits, group, others, targets),
                processor=processor, data_collator=collate, num_calibration_samples=len(samples),
                pipeline="sequential")
    # what is not quantized goes back to the source's dtype (a bf16 checkpoint stays half the size);
    # the quantized layers keep float32 weights until save packs them with their float16 scales
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is None:
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(source_dtype)
    model.save_pretrained(out, save_compressed=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in NOT_COPIED \
                and not (out / item.name).exists():
            shutil.copy(item, out / item.name)
    record = {"source": str(source), "method": method, "bits": bits, "group": group, "samples": len(samples),
              "quantized_layers": len(targets), "seconds": round(time.monotonic() - started, 1),
              "library": f"llmcompressor {_version('llmcompressor')}, compressed-tensors {_version('compressed-tensors')}",
              **(note or {})}
    (out / "calibrated_from.json").write_text(json.dumps(record, indent=1))
    return record


def stored_dtype(source: Path) -> torch.dtype:
    """The floating dtype of the source folder's first floating tensor (its checkpoint's dtype)."""
    from safetensors import safe_open

    from ..model.checkpoint import weight_files

    for file in weight_files(source):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                if tensor.get_dtype() in ("BF16", "F16", "F32"):
                    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[tensor.get_dtype()]
    return torch.float32


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def text_samples(tokenizer_file: Path, text: str, count: int, tokens: int) -> list[dict]:
    """``count`` windows of ``tokens`` tokens taken evenly from ``text``."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    if len(ids) < tokens:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {tokens}")
    starts = torch.linspace(0, len(ids) - tokens, count).long().tolist()
    return [{"input_ids": ids[s:s + tokens], "attention_mask": [1] * tokens} for s in starts]


def collate_one(batch: list[dict]) -> dict[str, torch.Tensor]:
    """One sample per step (samples differ in length; nothing is padded): token rows gain the
    batch dimension, other inputs (a VLM's frames, already ``[frames, ...]``) stay as they are."""
    if len(batch) != 1:
        raise ValueError("calibration batches hold one sample")
    return {key: torch.tensor([value] if key in TOKEN_ROWS else value) for key, value in batch[0].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infmllm_calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face checkpoint folder (text model)")
    parser.add_argument("--out", type=Path, required=True, help="the calibrated folder to write (must not exist)")
    parser.add_argument("--text", type=Path, required=True, help="calibration text (UTF-8), not the text you evaluate on")
    parser.add_argument("--method", choices=METHODS, default="gptq")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--group", type=int, default=32, help="inputs per scale (our kernels: 32 or 64)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sample")
    args = parser.parse_args(argv)
    try:
        samples = text_samples(args.model / "tokenizer.json", args.text.read_text(encoding="utf-8"),
                               args.samples, args.tokens)
        record = calibrate(args.model, args.out, samples, collate_one, args.method, args.bits, args.group,
                           note={"text": str(args.text), "tokens_per_sample": args.tokens})
    except (OSError, ValueError, CheckpointError) as exc:
        print(f"infmllm_calibrate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
