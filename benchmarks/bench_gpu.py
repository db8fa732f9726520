"""GPU benchmark: constant-latency streaming decode against the memory roofline and transformers.

One run measures, for random-weight models of real shapes in bf16, batch 1 (LLaVA layouts with a
SigLIP-so400m tower; a Qwen2.5-VL-3B and a SmolVLM2-2.2B shape, whose frames are 640x480 camera
frames):
- the device's copy bandwidth (bytes read + written / time) and each model's decode roofline
  = (decoder weight bytes + cache bytes read per token) / that bandwidth;
- decode ms/token (p50, p99) at cache capacity 4096 after 4K, 64K and 1M tokens were streamed
  into a StreamingSession (mostly frames through the vision tower and chunked prefill, with
  questions and answers between them), for the policies inf-mllm and streamingllm;
- time to first answer token after the stream, frame ingest latency (preprocess + tower +
  projector + prefill of one frame), eviction cost per call and amortised per token, peak GPU
  memory along the stream;
- the same decoder in transformers (``generate``, the same weights) at 4K and 32K context with
  its default dynamic cache, and at 32K with its static cache (which it compiles with
  torch.compile on CUDA): decode tokens/s and peak memory.

Writes ``benchmarks/results/bench_gpu.{json,md}`` and ``bench_gpu.png``; prints a short table.
``python benchmarks/bench_gpu.py`` on the GPU machine; ``--smoke`` runs tiny shapes on the CPU
(used by the tests to keep this script working; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_gpu_report import summarise, write_markdown, write_plot
from launch_tuning import tuning_for_run
from session_variants import session_variant
from ros_infmllm.cache import make_policy
from ros_infmllm.cache.kv_codes import KV_CACHE_DTYPES
from ros_infmllm.model.checkpoint import model_class, pack_parts
from ros_infmllm.model.config import load_config
from ros_infmllm.model.llava import LlavaModel
from ros_infmllm.model.materialize import materialize
from ros_infmllm.model.quantized import HEAD_MODES, QuantizedLinear, quantize_decoder
from ros_infmllm.model.quantized_embedding import QuantizedEmbedding
from ros_infmllm.session import SessionConfig, StreamingSession, template_for
from ros_infmllm.session.preprocess import preprocessor_for_folder

RESULTS = Path(__file__).resolve().parent / "results"
SPECIALS = ["<unk>", "<pad>", "<eos>", "<image>", "<frame>", "<q>", "<a>"]
SO400M_384 = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
              "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
QWEN2 = {"model_type": "qwen2", "vocab_size": 151936, "rope_theta": 1000000.0, "hidden_act": "silu",
         "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
SHAPES = {
    "qwen2-0.5b": {"text": {**QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                            "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
                   "vision": SO400M_384},
    "qwen2-1.5b": {"text": {**QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                            "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
                   "vision": SO400M_384},
    "llama2-7b": {"text": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
                           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                           "num_key_value_heads": 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                           "hidden_act": "silu", "max_position_embeddings": 32768, "tie_word_embeddings": False},
                  "vision": SO400M_384},
}
# Issue 17's families (other layouts than LLaVA; other scripts that read SHAPES stay on the LLaVA three).
FAMILY_SHAPES = {
    # Qwen/Qwen2.5-VL-3B-Instruct's config.json: window attention in the tower, M-RoPE decoder.
    "qwen2.5-vl-3b": {"layout": "qwen2_5_vl", "frame": (480, 640),
                      "text": {**QWEN2, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                               "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True,
                               "max_position_embeddings": 128000},
                      "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                 "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                                 "temporal_patch_size": 2, "window_size": 112, "hidden_act": "silu",
                                 "fullatt_block_indexes": [7, 15, 23, 31]}},
    # HuggingFaceTB/SmolVLM2-2.2B-Instruct's config.json: SigLIP-so400m at 384 px, 3x3 pixel shuffle.
    "smolvlm2-2.2b": {"layout": "idefics3", "frame": (480, 640), "scale_factor": 3,
                      "text": {"model_type": "llama", "vocab_size": 49280, "hidden_size": 2048,
                               "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                               "num_key_value_heads": 32, "rope_theta": 273768.0, "rms_norm_eps": 1e-5,
                               "hidden_act": "silu", "max_position_embeddings": 16384, "tie_word_embeddings": False},
                      "vision": {**SO400M_384, "model_type": "idefics3_vision"}},
}
SMOKE_SHAPES = {
    "tiny-qwen2": {"text": {**QWEN2, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "tie_word_embeddings": True},
                   "vision": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}},
}
SMOKE_FAMILY_SHAPES = {
    "tiny-qwen2.5-vl": {"layout": "qwen2_5_vl", "frame": (48, 64),
                        "text": {**QWEN2, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "tie_word_embeddings": True},
                        "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                                   "out_hidden_size": 64, "patch_size": 8, "spatial_merge_size": 2,
                                   "temporal_patch_size": 2, "window_size": 32, "hidden_act": "silu",
                                   "fullatt_block_indexes": [1]}},
    "tiny-smolvlm": {"layout": "idefics3", "frame": (48, 64), "scale_factor": 2,
                     "text": {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                              "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                              "max_position_embeddings": 4096, "tie_word_embeddings": False},
                     "vision": {"model_type": "idefics3_vision", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}},
}
# The marker tokens each layout writes around a frame's visual tokens (words of the benchmark's tokenizer).
LAYOUT_MARKERS = {"llava": (), "idefics3": ("<fake_token_around_image>", "<global-img>"),
                  "qwen2_5_vl": ("<|vision_start|>", "<|vision_end|>")}
POLICIES = ("h2o-kinds", "inf-mllm", "streamingllm")  # the node's default first: the targets are its


# ---- models -------------------------------------------------------------------------------------
def write_checkpoint_config(folder: Path, shape: dict) -> Path:
    """The layout's config.json (no weights): the shapes are all the benchmark needs."""
    layout, image = shape.get("layout", "llava"), SPECIALS.index("<image>")
    config = {"model_type": layout, "text_config": shape["text"], "vision_config": shape["vision"],
              "tie_word_embeddings": shape["text"]["tie_word_embeddings"]}
    if layout == "llava":
        config.update(image_token_index=image, vision_feature_layer=-1, vision_feature_select_strategy="full",
                      projector_hidden_act="gelu")
    elif layout == "idefics3":
        config.update(image_token_id=image, scale_factor=shape["scale_factor"])
    else:  # Qwen2.5-VL: M-RoPE sections of a 128-wide head, as the published models have them
        head = shape["text"]["hidden_size"] // shape["text"]["num_attention_heads"]
        section = [head // 8, 3 * head // 16, 3 * head // 16]
        config.update(image_token_id=image, text_config={**shape["text"], "rope_scaling": {
            "type": "mrope", "mrope_section": section}})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def random_model(folder: Path, device: str, dtype: torch.dtype, seed: int = 0) -> LlavaModel:
    """Our model (the config's layout) with random weights (std 0.02; norms 1, biases 0)."""
    cfg = load_config(folder)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model = materialize(model, dtype, device)  # in dtype at once, no float32 copy first
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name or ".ln_" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    if cfg.text.tie_word_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    model.decoder.rotary.to(device)
    return model.eval().requires_grad_(False)


def word_tokenizer(vocab_size: int, words: list[str] | tuple[str, ...] = ()):
    """Word-level tokenizer over the whole vocabulary: the specials, then ``words``, then ``w0``,
    ``w1``, ... up to ``vocab_size`` (every id decodes to a word; decoding joins words with spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = SPECIALS + list(words)
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def decoder_bytes_per_token(model: LlavaModel) -> int:
    """Weight bytes one decode step reads: every decoder matrix (packed ones as packed), and the
    embedding table only where it is the LM head; a gathered embedding row is negligible."""
    unique = {id(p): p for p in model.decoder.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    total += sum(m.packed_bytes() for m in model.decoder.modules() if isinstance(m, QuantizedLinear))
    embed, head = model.decoder.embed_tokens, model.decoder.lm_head
    if isinstance(embed, QuantizedEmbedding):  # packed: read per token only where it is the head's table
        total -= 0 if embed.table is head else embed.table.packed_bytes()
    elif not model.cfg.text.tie_word_embeddings or isinstance(head, QuantizedLinear):  # a float table the head
        total -= embed.weight.numel() * embed.weight.element_size()  # does not read (untied, or packed apart)
    return total


def cache_bytes(model: LlavaModel, capacity: int, kv_cache: str = "model") -> int:
    """K/V bytes a decode step reads at full capacity (``cache_row_bytes`` per row)."""
    text = model.cfg.text
    return 2 * text.num_layers * text.num_kv_heads * capacity * cache_row_bytes(text.head_dim, model.dtype, kv_cache)


def cache_row_bytes(head_dim: int, dtype: torch.dtype, kv_cache: str = "model") -> int:
    """Bytes of one cached key or value row: in ``dtype``, or int8 codes with a float32 scale
    (cache/kv_codes.py)."""
    return head_dim + 4 if kv_cache == "int8" else head_dim * dtype.itemsize


# ---- timing helpers -----------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def copy_bandwidth(device: str, megabytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy (median of 20)."""
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for i in range(25):
        sync(device)
        started = time.perf_counter()
        target.copy_(source)
        sync(device)
        if i >= 5:
            times.append(time.perf_counter() - started)
    return 2 * source.numel() / statistics.median(times)


def peak_memory(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


# ---- one session ------------------------------------------------------------------------------------
class StreamDriver:
    """Feeds a session a stream of frames with a question every ``question_every`` frames, and
    times its evictions (a sync around each; none elsewhere)."""

    def __init__(self, session: StreamingSession, device: str, frame: tuple[int, int], question_every: int = 40) -> None:
        self.session, self.device, self.question_every = session, device, question_every
        self.rng = np.random.default_rng(0)
        self.frames = [self.rng.integers(0, 256, (*frame, 3), dtype=np.uint8) for _ in range(8)]
        self.vocab = session.tokenizer.get_vocab_size()
        self.eviction_ms: list[float] = []
        self.frame_count = 0
        original = session._make_room

        def timed_make_room(count: int, capture: bool = True) -> None:
            if count <= session.cache.free:
                return
            sync(device)
            started = time.perf_counter()
            original(count, capture)
            sync(device)
            self.eviction_ms.append(1e3 * (time.perf_counter() - started))

        session._make_room = timed_make_room

    def question_ids(self, words: int = 12) -> torch.Tensor:
        text = " ".join(f"w{i}" for i in self.rng.integers(0, self.vocab - len(SPECIALS), words))
        return self.session._query_ids(text)

    def decode(self, count: int) -> tuple[float, list[float]]:
        """Ask a question; the time to its first answer token, then the interval at which each of
        the next ``count`` greedy tokens reaches the host (the session's ``tokens``: each step
        chosen and fed on the device, launched before the host reads the previous token)."""
        sync(self.device)
        started = time.perf_counter()
        tokens = self.session.tokens(self.question_ids(), count + 1)
        next(tokens)
        last = time.perf_counter()
        first, steps = 1e3 * (last - started), []
        for _ in tokens:
            now = time.perf_counter()
            steps.append(1e3 * (now - last))
            last = now
        return first, steps

    def stream_to(self, total_tokens: int) -> None:
        while self.session.cache.total_seen < total_tokens:
            self.session.ingest_frame(self.frames[self.frame_count % len(self.frames)])
            self.frame_count += 1
            if self.frame_count % self.question_every == 0:
                self.decode(8)

    def ingest_latency(self, frames: int) -> list[float]:
        times = []
        for i in range(frames):
            sync(self.device)
            started = time.perf_counter()
            self.session.ingest_frame(self.frames[i % len(self.frames)])
            sync(self.device)
            times.append(1e3 * (time.perf_counter() - started))
        return times


def camera_frame(model: LlavaModel, shape: dict | None = None) -> tuple[int, int]:
    """The frames streamed: the shape's camera frame, else the tower's own square size."""
    if shape and "frame" in shape:
        return tuple(shape["frame"])
    return model.cfg.vision.image_size, model.cfg.vision.image_size


def bench_policy(model: LlavaModel, tokenizer, folder: Path, policy: str, args, device: str,
                 shape: dict | None = None) -> dict:
    name, variant = session_variant(policy)  # e.g. h2o+pyramid, h2o+pool2, h2o+merge
    if "weights" in variant or "vision_weights" in variant or "kv_cache_dtype" in variant:
        raise SystemExit(f"{policy}: packed weights and cache are --weights / --vision-weights / --kv-cache here, "
                         f"not a policy suffix")
    config = SessionConfig(capacity=args.capacity, max_chunk=args.max_chunk, template="demo", max_new_tokens=8,
                           check_evictions=False, kv_cache_dtype=args.kv_cache, **variant)
    session = StreamingSession(model, tokenizer, make_policy(name), config, template_for("demo"),
                               preprocessor_for_folder(folder, model.cfg.vision))
    driver = StreamDriver(session, device, camera_frame(model, shape))
    driver.stream_to(args.capacity // 2)  # warm-up: kernels, CUDA graphs of the recurring chunk sizes
    driver.decode(16)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    checkpoints = []
    for target in args.stream_tokens:
        driver.stream_to(target)
        first, steps = driver.decode(args.decode_tokens)
        checkpoints.append({"streamed_tokens": session.cache.total_seen, "decode_p50_ms": percentile(steps, 50),
                            "decode_p99_ms": percentile(steps, 99), "decode_mean_ms": float(np.mean(steps)),
                            "first_token_ms": first, "peak_memory_bytes": peak_memory(device),
                            "cache_length": session.cache.length, "seconds": round(time.perf_counter() - started, 1)})
        print(f"  {policy:12s} {session.cache.total_seen:>8d} tokens: decode p50 {checkpoints[-1]['decode_p50_ms']:.3f} "
              f"ms, p99 {checkpoints[-1]['decode_p99_ms']:.3f} ms, first token {first:.1f} ms "
              f"({checkpoints[-1]['seconds']} s)", flush=True)
    seen = session.cache.total_seen
    ingest = driver.ingest_latency(args.ingest_frames)
    tokens_per_frame = (session.cache.total_seen - seen) // max(args.ingest_frames, 1)  # all frames one size
    cache = session.cache
    freed = cache.evicted_tokens / max(cache.evictions, 1)
    eviction_ms = statistics.median(driver.eviction_ms) if driver.eviction_ms else float("nan")
    return {"policy": policy, "checkpoints": checkpoints, "frames": driver.frame_count,
            "frame_size": list(driver.frames[0].shape[:2]), "tokens_per_frame": tokens_per_frame,
            "ingest_p50_ms": percentile(ingest, 50), "ingest_p99_ms": percentile(ingest, 99),
            "evictions": cache.evictions, "eviction_p50_ms": eviction_ms,
            "eviction_p99_ms": percentile(driver.eviction_ms, 99), "tokens_freed_per_eviction": freed,
            "eviction_amortised_ms_per_token": eviction_ms / freed if freed else float("nan"),
            "captured_graphs": sorted(str(k) for k in session.runner.graphs)}


# ---- transformers ---------------------------------------------------------------------------------
def transformers_decoder(model: LlavaModel, shape: dict, device: str):
    """The same decoder as a transformers CausalLM holding a copy of our random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(shape["text"])
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in model.decoder.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m and m != "lm_head.weight"]:
        raise RuntimeError(f"weight names differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval().requires_grad_(False)


def bench_transformers(hf, contexts: list[int], new_tokens: int, device: str, static: bool = False) -> list[dict]:
    """Decode tokens/s of ``generate`` (greedy) after a context of random tokens:
    (time for prefill + N tokens - time for prefill + 1 token) / (N - 1).

    ``static``: a StaticCache sized for the context, which makes transformers compile its decode
    forward (torch.compile, CUDA graphs) on CUDA; one untimed call compiles first. Otherwise its
    default dynamic cache, eager."""
    from transformers import StaticCache

    rows = []
    vocab = hf.config.vocab_size
    for context in contexts:
        ids = torch.randint(len(SPECIALS), vocab, (1, context), device=device,
                            generator=torch.Generator(device=device).manual_seed(context))
        cache = StaticCache(config=hf.config, max_cache_len=context + new_tokens) if static else None
        timings = {}
        try:
            for count in ((new_tokens,) if static else ()) + (1, new_tokens):  # static: compile first
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                started = time.perf_counter()
                with torch.inference_mode():
                    if cache is not None:
                        cache.reset()  # its tensors are inference tensors
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                                min_new_tokens=count, do_sample=False, pad_token_id=0, past_key_values=cache)
                sync(device)
                timings[count] = time.perf_counter() - started
            per_token = (timings[new_tokens] - timings[1]) / (new_tokens - 1)
            rows.append({"context": context, "cache": "static" if static else "dynamic",
                         "compiled": static and device.startswith("cuda"), "decode_ms": 1e3 * per_token,
                         "tokens_per_s": 1 / per_token, "peak_memory_bytes": peak_memory(device)})
        except torch.OutOfMemoryError:
            rows.append({"context": context, "cache": "static" if static else "dynamic",
                         "error": "out of GPU memory"})
        except Exception as error:  # noqa: BLE001 - the compiled path may not run here; report why
            if not static:
                raise
            rows.append({"context": context, "cache": "static", "error": f"{type(error).__name__}: {error}"[:200]})
        print(f"  transformers {rows[-1]['cache']} {context:>6d} context: {rows[-1]}", flush=True)
        del ids, cache
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def shape_tokenizer(model, shape: dict):
    """The word tokenizer of a shape's vocabulary, with the marker tokens its layout writes around a frame."""
    return word_tokenizer(model.cfg.text.vocab_size, LAYOUT_MARKERS[shape.get("layout", "llava")])


def q4_k_m_mix(decoder) -> None:
    """The layers a llama.cpp Q4_K_M file keeps in Q6_K, packed as we read Q6_K (int8, groups of
    16): v and down in the first and last eighth of the blocks and every third block between
    (llama.cpp's ``use_more_bits``); ``quantize_decoder`` then packs the rest in int4, as Q4_K is."""
    count = len(decoder.layers)
    for index, block in enumerate(decoder.layers):
        if index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2:
            for parent, name in ((block.self_attn, "v_proj"), (block.mlp, "down_proj")):
                layer = getattr(parent, name)
                setattr(parent, name, QuantizedLinear.from_float(layer.weight, layer.bias, "int8", group=16))


def pack_random_model(model, weights: str, lm_head: str = "float", embeddings: str = "float",
                      vision: str = "float") -> None:
    """The random model's packed parts, rounded from its floats: the decoder projections under
    ``weights`` (``float``, ``int8``, ``int4``, ``q4_0``: int4 without offsets, or ``q4_k_m``), then
    the head, table and tower."""
    if weights == "q4_k_m":
        q4_k_m_mix(model.decoder)
    if weights != "float":
        quantize_decoder(model.decoder, "int8" if weights == "int8" else "int4", offsets=weights != "q4_0")
    pack_parts(model, lm_head, embeddings, vision)


# ---- one model --------------------------------------------------------------------------------------
def bench_model(name: str, shape: dict, args, device: str, bandwidth: float) -> dict:
    print(f"{name}:", flush=True)
    folder = write_checkpoint_config(Path(tempfile.mkdtemp()) / name, shape)
    model = random_model(folder, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pack_random_model(model, args.weights, args.lm_head, args.embeddings, args.vision_weights)
    tokenizer = shape_tokenizer(model, shape)
    weights, cache = decoder_bytes_per_token(model), cache_bytes(model, args.capacity, args.kv_cache)
    roofline_ms = 1e3 * (weights + cache) / bandwidth
    result = {"model": name, "decoder_weight_bytes": weights, "cache_bytes": cache, "roofline_ms": roofline_ms,
              "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
              "layout": shape.get("layout", "llava"), "policies": {}}
    for policy in args.policies:
        result["policies"][policy] = bench_policy(model, tokenizer, folder, policy, args, device, shape)
    result["image_tokens"] = next(iter(result["policies"].values()))["tokens_per_frame"]  # template included
    if not args.skip_transformers:
        hf = transformers_decoder(model, shape, device)
        result["transformers"] = bench_transformers(hf, args.hf_contexts, args.hf_new_tokens, device)
        result["transformers"] += bench_transformers(hf, args.hf_static_contexts, args.hf_new_tokens, device, True)
        del hf
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help=f"default: {', '.join(SHAPES)} (also: {', '.join(FAMILY_SHAPES)}); "
                                                      f"with --smoke tiny-qwen2 (also: {', '.join(SMOKE_FAMILY_SHAPES)})")
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--max-chunk", type=int, default=1024,
                        help="prefill chunk: 1024 takes a SigLIP-384 frame (729 visual tokens) in one step")
    parser.add_argument("--stream-tokens", type=int, nargs="+", default=[4096, 65536, 1 << 20])
    parser.add_argument("--decode-tokens", type=int, default=256, help="timed decode steps per checkpoint")
    parser.add_argument("--ingest-frames", type=int, default=20)
    parser.add_argument("--hf-contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--hf-static-contexts", type=int, nargs="*", default=[32768],
                        help="contexts for transformers' static cache + torch.compile path")
    parser.add_argument("--hf-new-tokens", type=int, default=33)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--bandwidth-mb", type=int, default=2048)
    parser.add_argument("--weights", choices=("float", "int8", "int4", "q4_0", "q4_k_m"), default="float",
                        help="decoder projections: float (bf16 on a GPU) or packed (groups of 32; int4 with offsets "
                             "as Q4_1, q4_0: int4 codes centred on 8 without offsets); q4_k_m: int4 "
                             "with llama.cpp's Q4_K_M choice of v and down layers in int8 groups of 16 (Q6_K as read)")
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="model",
                        help="the cache's storage for every policy (int8: codes and row scales, read packed by the "
                             "decode kernel; the roofline counts its bytes)")
    parser.add_argument("--lm-head", choices=HEAD_MODES, default="float",
                        help="the LM head: float or packed")
    parser.add_argument("--embeddings", choices=HEAD_MODES, default="float",
                        help="the token table: float or packed (a tied table needs --lm-head packed)")
    parser.add_argument("--vision-weights", choices=HEAD_MODES, default="float",
                        help="the tower's and projector's linear layers: float or packed")
    parser.add_argument("--int4-activations", choices=("float", "int8"), default=None,
                        help="int4 products against float x or x's int8 codes (dp4a, model/matvec_dp4a.py); "
                             "default: the shipped MatvecTuning's")
    parser.add_argument("--matvec", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="the decode matrix-vector op's launch shape for this run, fields of "
                             "decode_linear.MatvecTuning (e.g. int4_block_n=4 int4_block_k=2048); put back at the end")
    parser.add_argument("--prefill-mass", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="the prefill mass op's launch shape and log-sum-exp source for this run, fields of "
                             "prefill_mass.PrefillMassTuning (e.g. block_m=128 lse_from=kernel); put back at the end")
    parser.add_argument("--decode-attention", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="the decode attention op's launch shape for this run, fields of "
                             "decode_attention.DecodeKernelTuning (e.g. programs=1056 min_split=64); put back at the end")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES),
                        help="cache policies timed; the first is the one the targets are reported for; "
                             "eval_demo.py's session suffixes time a visual-token reduction (h2o+pyramid, "
                             "h2o+pool2, h2o+merge)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bench_gpu", help="results file name (without extension)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    args = parser.parse_args(argv)
    shapes = {**SHAPES, **FAMILY_SHAPES}
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        shapes, args.models = {**SMOKE_SHAPES, **SMOKE_FAMILY_SHAPES}, args.models or list(SMOKE_SHAPES)
        args.capacity, args.max_chunk, args.stream_tokens = 128, 32, [160, 400, 1200]
        args.decode_tokens, args.ingest_frames, args.hf_contexts, args.hf_new_tokens = 8, 3, [64, 128], 5
        args.hf_static_contexts = [128]
        args.bandwidth_mb = 16
    args.models = args.models or list(SHAPES)
    unknown = [name for name in args.models if name not in shapes]
    if unknown:
        parser.error(f"unknown model shapes {unknown}: choose from {', '.join(shapes)}")
    from ros_infmllm.model import decode_attention, decode_linear, prefill_mass

    with tuning_for_run(parser, decode_linear.TUNING, args.matvec + (
            [f"int4_activations={args.int4_activations}"] if args.int4_activations else [])), \
            tuning_for_run(parser, prefill_mass.TUNING, args.prefill_mass, "--prefill-mass"), \
            tuning_for_run(parser, decode_attention.TUNING, args.decode_attention, "--decode-attention"):
        return run(args, shapes, device)


def run(args, shapes: dict, device: str) -> int:
    """Every model of ``args.models`` timed at the launch shape now set; results written after each."""
    from ros_infmllm.model import decode_attention, decode_linear, prefill_mass

    started = time.perf_counter()
    bandwidth = copy_bandwidth(device, args.bandwidth_mb)
    import transformers

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor()})",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": "bfloat16" if device == "cuda" else "float32",
              "bandwidth_bytes_per_s": bandwidth, "capacity": args.capacity, "max_chunk": args.max_chunk,
              "ours": args.policies[0], "weights": args.weights, "lm_head": args.lm_head,
              "embeddings": args.embeddings, "vision_weights": args.vision_weights, "kv_cache": args.kv_cache,
              "int4_activations": decode_linear.TUNING.int4_activations,
              "int8_activations": decode_linear.TUNING.int8_activations,
              "matvec_tuning": vars(decode_linear.TUNING).copy(), "matvec_overrides": args.matvec,
              "prefill_mass_tuning": vars(prefill_mass.TUNING).copy(), "prefill_mass_overrides": args.prefill_mass,
              "decode_attention_tuning": vars(decode_attention.TUNING).copy(),
              "decode_attention_overrides": args.decode_attention,
              "models": []}
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s on {report['device']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        report["models"].append(bench_model(name, shapes[name], args, device, bandwidth))
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["summary"] = summarise(report)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))  # after each model: partial runs keep
        write_markdown(report, args.out / f"{args.name}.md")
    write_plot(report, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
