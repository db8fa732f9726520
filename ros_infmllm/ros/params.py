"""The node's parameters: one table with defaults, ranges, choices and descriptions.

The table is declared on the node with descriptors (so `ros2 param describe` shows ranges), is
validated once at start (a message naming the parameter and the bad value), and is the source
of truth the tests compare ``config/infmllm.yaml`` against.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ..backends import BACKENDS
from ..cache import DEFAULT_POLICY, POLICIES
from ..cache.kv_codes import KV_CACHE_DTYPES
from ..model.quantized import HEAD_MODES, WEIGHT_MODES
from ..model.quantized_embedding import EMBEDDING_MODES
from ..model.quantized_vision import VISION_MODES
from ..model.staged_drop import check_boundaries, parse_drop_layers


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    low: float | None = None      # inclusive range for numbers
    high: float | None = None
    choices: tuple[str, ...] = ()
    runtime: bool = False          # may change while running (parameter callback)


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("model_path", "", "Checkpoint: a Hugging Face folder (LLaVA or text-only), a .gguf file, or a folder "
                                "with one text .gguf and an mmproj*.gguf. 'demo-vlm': the demo VLM (SmolLM2 + trained tower, "
                                "assembled in the cache on first use). Empty: the tiny bundled test model."),
    ParamSpec("mmproj_path", "", "llama.cpp mmproj .gguf (vision tower + projector) for a .gguf model_path."),
    ParamSpec("warm_up", True, "Before taking frames and questions, run each kind of step once (on a GPU: compile "
                               "and capture CUDA graphs); what arrives meanwhile waits and is handled after."),
    ParamSpec("image_topics", ["/camera/image_raw"],
              "Camera topics; names ending in /compressed are sensor_msgs/CompressedImage."),
    ParamSpec("backend", "torch", "How the model runs: torch, or the exported graphs in engine_dir through "
              "onnxruntime or tensorrt.", choices=BACKENDS),
    ParamSpec("engine_dir", "", "Folder written by infmllm_export (onnxruntime and tensorrt backends)."),
    ParamSpec("device", "cpu", "Torch device: cpu, cuda or cuda:N."),
    ParamSpec("dtype", "auto", "Weights and cache precision; auto: float32 on the CPU, bfloat16 on a GPU (float16 "
              "where it lacks bfloat16), or the export's precision.",
              choices=("auto", "float32", "bfloat16", "float16")),
    ParamSpec("weights", "float", "Decoder projection weights: float (in dtype), int8 or int4 (packed, groups of 32; "
              "GGUF Q8_0/Q4_0/Q4_1/Q4_K/Q6_K and calibrated codes of that width kept as stored, Q6_K as int8 in "
              "groups of 16; the rest rounded as read), auto (a GGUF's own Q8_0/Q4_0/Q4_1/Q4_K/Q6_K blocks "
              "packed, a GPTQ/AWQ folder's codes as calibrated (infmllm_calibrate), the rest float; the demo "
              "VLM: SmolLM2's Q4_1 blocks plus float LoRA factors). Packed weights run "
              "on backend torch (GPU decode reads them packed, Triton); "
              "exported backends hold the weights they were exported with (infmllm_export --weights), so there: "
              "float, auto or the export's mode; docs/quantized_weights.md.",
              choices=WEIGHT_MODES),
    ParamSpec("lm_head_weights", "float", "LM head weights: float (in dtype), int8 or int4 (packed as it is read: a "
              "GGUF head of that width keeps its blocks, any other is rounded to nearest; a tied embedding table "
              "stays float unless embedding_weights packs it too). A large vocabulary's head is a large share of a "
              "packed model's bytes per token. Needs backend torch.", choices=HEAD_MODES),
    ParamSpec("embedding_weights", "float", "Token embedding table: float (in dtype), int8 or int4 (packed as it is "
              "read, as lm_head_weights is; lookups dequantize the rows they gather). Memory, not speed: a 7B model's table is "
              "0.24 GiB in bf16. A tied table reads the packed LM head's codes, so it needs lm_head_weights packed. "
              "Needs backend torch.", choices=EMBEDDING_MODES),
    ParamSpec("vision_weights", "float", "Vision tower and projector linear layers: float (in dtype), int8 or int4 "
              "(packed, rounded from their floats; each frame's encode dequantizes them layer by layer). Memory: "
              "the SigLIP so400m tower with a 7B LLaVA projector is 0.81 GiB in bf16. Needs backend torch.",
              choices=VISION_MODES),
    ParamSpec("policy", DEFAULT_POLICY, "KV cache eviction policy (h2o-kinds: H2O for frames, StreamingLLM for text; "
              "best measured on video memory and on text, docs/inf_mllm.md).",
              choices=tuple(POLICIES)),
    ParamSpec("capacity", 4096, "KV cache slots (tokens) per layer and KV head: the memory bound.", 16, 1 << 20),
    ParamSpec("kv_cache_dtype", "model", "KV cache storage: model (the dtype above) or int8 (codes with a scale "
              "per token and KV head: half a bf16 cache's bytes, read packed by the GPU decode kernel). Needs "
              "backend torch.", choices=KV_CACHE_DTYPES),
    ParamSpec("max_chunk", 256, "Most tokens per prefill step.", 1, 1 << 16),
    ParamSpec("slack_fraction", 0.125, "Share of the capacity freed beyond the incoming chunk per eviction.",
              0.0, 0.9),
    ParamSpec("template", "auto", "Prompt template: auto, chat (the checkpoint's chat template), qwen2, vicuna, demo."),
    ParamSpec("system_prompt", "", "System prompt, pinned in the cache. Empty: the template's default."),
    ParamSpec("max_new_tokens", 64, "Answer length limit in tokens.", 1, 4096, runtime=True),
    ParamSpec("max_query_chars", 2000, "Longer questions are refused.", 1, 1 << 20),
    ParamSpec("max_query_tokens", 256, "Questions with more tokens are refused.", 1, 1 << 16),
    ParamSpec("max_pending_queries", 4, "Questions waiting beyond this are answered 'busy'.", 1, 1024, runtime=True),
    ParamSpec("frame_rate", 1.0, "Most frames ingested per second, all cameras together.", 0.01, 1000.0,
              runtime=True),
    ParamSpec("question_frame_age", 0.25, "Seconds: a question first ingests a camera's unread frame when that "
              "camera's last ingested frame is older than this; 0: always (fresher answers, slower first piece).",
              0.0, 3600.0, runtime=True),
    ParamSpec("temperature", 0.0, "Sampling temperature; 0 is greedy.", 0.0, 10.0, runtime=True),
    ParamSpec("top_p", 1.0, "Nucleus sampling mass.", 0.01, 1.0, runtime=True),
    ParamSpec("seed", 0, "Sampling seed.", 0, 2**31 - 1),
    ParamSpec("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", 0.05, 60.0),
    ParamSpec("camera_timeout", 5.0, "Seconds without a frame after which /diagnostics warns that a camera is "
                                     "silent (frames are taken again as soon as it restarts).", 0.1, 3600.0,
              runtime=True),
    ParamSpec("inf_mllm.recent_fraction", 0.25, "Inf-MLLM: share of the capacity kept as recent tokens.", 0.0, 0.9),
    ParamSpec("inf_mllm.retrieval_window", 32, "Inf-MLLM: latest queries that score cached tokens.", 1, 4096),
    ParamSpec("inf_mllm.pool", 5, "Inf-MLLM: odd width of the local-sum pooling.", 1, 255),
    ParamSpec("inf_mllm.attention_bias", 1.0, "Inf-MLLM: weight of the bias toward newer tokens.", 0.0, 1000.0),
    ParamSpec("inf_mllm_lt.long_term_weight", 4.0, "Inf-MLLM-LT (also reads inf_mllm.*): weight of the decayed "
                                                  "long-term attention score.", 0.0, 1000.0),
    ParamSpec("inf_mllm_lt.long_term_half_life", 2048, "Inf-MLLM-LT: queries after which attention counts half "
                                                       "in the long-term score (-1: no decay, a sum as H2O's).",
              -1, 1 << 30),
    ParamSpec("inf_mllm_lt.stretch", -1, "Inf-MLLM-LT: tokens per stretch of the stream that keeps one "
                                         "representative (-1: one frame; 0: off).", -1, 1 << 20),
    ParamSpec("inf_mllm_lt.representative_fraction", 0.25, "Inf-MLLM-LT: most of the capacity representatives take.",
              0.0, 0.9),
    ParamSpec("h2o.recent_fraction", 0.5, "H2O and h2o-kinds: share of the capacity kept as recent tokens.", 0.0, 0.9),
    ParamSpec("streamingllm.sinks", 4, "StreamingLLM and h2o-kinds: attention-sink tokens kept from the stream start.",
              0, 1024),
    ParamSpec("look_m.recent_fraction", 0.5, "LOOK-M: share of the capacity kept as recent tokens.", 0.0, 0.9),
    ParamSpec("look_m.merge", True, "LOOK-M: merge evicted visual entries into their most similar kept entry "
                                    "(false: text-prior eviction alone)."),
    ParamSpec("visual_tokens.pool", 1, "Average each frame's visual tokens over pool x pool grid cells before the "
                                       "decoder (1: off; 2: a quarter of the cache slots per frame).", 1, 4),
    ParamSpec("vision.min_pixels", 0, "Dynamic-resolution towers (Qwen2-VL, Qwen2.5-VL): fewest pixels a frame is "
                                      "resized to (0: the checkpoint's preprocessor_config.json).", 0, 1 << 26),
    ParamSpec("vision.max_pixels", 0, "Dynamic-resolution towers: most pixels a frame is resized to; visual tokens "
                                      "per frame = pixels / 28^2 (0: the checkpoint's).", 0, 1 << 26),
    ParamSpec("vision.image_splitting", False, "SmolVLM (Idefics3) only: each frame as tiles plus its global image, "
                                               "as transformers' processor splits images (a 640x480 frame: 13 images' "
                                               "tokens); off: the global image alone."),
    ParamSpec("visual_tokens.drop_layers", "", "Staged visual-token drop during a frame's prefill (after "
              "PyramidDrop): comma-separated decoder layers where a stage begins, e.g. '8,16,24'; 'auto': four "
              "equal stages; empty: off. Deeper layers keep fewer of each frame's tokens and so hold more "
              "frames; off by default: on the demo VLM it breaks current-scene answers (torch backend only; "
              "docs/visual_tokens.md)."),
    ParamSpec("visual_tokens.drop_keep", 0.5, "Share of a frame's visual tokens still in play that each stage "
                                              "boundary keeps (PyramidDrop's lambda).", 0.05, 0.95),
    ParamSpec("visual_tokens.merge", False, "At each eviction, average evicted visual entries into their most similar "
                                            "kept entry instead of dropping them (LOOK-M's merging, with any policy; "
                                            "no gain on the tiny model, docs/visual_tokens.md)."),
)
SPECS = {spec.name: spec for spec in PARAMS}


def validate(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the parameter when ``value`` is out of its range or choices."""
    spec = SPECS[name]
    if spec.choices and value not in spec.choices:
        raise ValueError(f"parameter {name}={value!r} is not one of {', '.join(spec.choices)}")
    if spec.low is not None and not spec.low <= value <= spec.high:
        raise ValueError(f"parameter {name}={value!r} is outside [{spec.low}, {spec.high}]")
    if name == "inf_mllm.pool" and value % 2 == 0:
        raise ValueError(f"parameter {name}={value!r} must be odd")
    if name == "image_topics" and (not value or any(not str(t).strip() for t in value)):
        raise ValueError(f"parameter {name}={value!r} needs at least one non-empty topic")
    if name == "visual_tokens.drop_layers":
        drop_layers(value)
    if name == "device" and not (value == "cpu" or str(value).startswith("cuda")):
        raise ValueError(f"parameter {name}={value!r} is not cpu, cuda or cuda:N")


def policy_options(values: dict[str, Any]) -> dict[str, Any]:
    """The options of the chosen policy, from the parameters under its prefixes."""
    prefixes = {"inf-mllm": ("inf_mllm.",), "inf-mllm-lt": ("inf_mllm.", "inf_mllm_lt."), "h2o": ("h2o.",),
                "streamingllm": ("streamingllm.",), "look-m": ("look_m.",),
                "h2o-kinds": ("h2o.", "streamingllm.")}.get(values["policy"], ())
    return {name[len(prefix):]: value for prefix in prefixes for name, value in values.items()
            if name.startswith(prefix)}


def drop_layers(text: str) -> tuple[int, ...] | str:
    """``visual_tokens.drop_layers`` as the session takes it: ``()`` (off), ``"auto"`` or layer indices."""
    try:
        layers = parse_drop_layers(str(text))
        if isinstance(layers, tuple) and layers:
            check_boundaries(layers, sys.maxsize)  # the model's depth is checked when the session is built
    except ValueError:
        raise ValueError(f"parameter visual_tokens.drop_layers={text!r} must be empty, 'auto' or strictly "
                         f"ascending comma-separated layer numbers >= 1 such as '8,16,24'") from None
    return layers
