"""The streaming session: frames and questions in, answers out, over one bounded KV cache.

Everything goes through ``feed``: tokens (with a frame's visual tokens in place of its image
placeholders) are embedded, split into prefill chunks of at most ``max_chunk`` tokens, and each
chunk runs one backend step after the policy has made room for it. Answers are generated one
token at a time through the same path, so they stay in the cache and later questions can refer
to them. One thread owns a session; nothing here locks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from ..backends import TorchBackend, make_backend
from ..cache import DEFAULT_POLICY, BoundedKVCache, EvictionPolicy, make_policy
from ..cache.kv_codes import check_kv_cache_dtype
from ..errors import CacheFullError
from ..export.manifest import Manifest
from ..model import CausalLM, load_model, locate
from ..model.checkpoint_text import chat_template, load_tokenizer
from ..model.quantized import held_weights
from .chat_template import template_from_chat
from .preprocess import REFERENCE_FRAME, ImagePreprocessor, TiledPreprocessor, preprocessor_for, preprocessor_for_folder
from .sampling import SamplingConfig, sample_next
from .templates import PromptTemplate, image_wrap_ids, split_image_ids, template_for, template_ids
from .visual_tokens import pool_tokens, pooled_count
from ..model.staged_drop import StagedDrop, check_boundaries, even_boundaries, parse_drop_layers, stage_counts


@dataclass(frozen=True)
class SessionConfig:
    """Sizes are in tokens.

    capacity: cache slots per (layer, KV head): the memory bound.
    max_chunk: most tokens per prefill step (a frame larger than this takes several steps).
    slack_fraction: share of the capacity freed beyond the incoming chunk at each eviction, so
        evictions are rare and their cost is amortised.
    max_new_tokens: default answer length limit.
    max_query_chars / max_query_tokens: questions longer than these are refused.
    check_evictions: validate every eviction's kept slots (one host sync per eviction).
    visual_pool: average each frame's visual tokens over pool x pool grid cells before the
        decoder (1: off); see visual_tokens.py.
    min_pixels / max_pixels: pixel budget of each frame for a dynamic-resolution tower (Qwen2-VL,
        Qwen2.5-VL), which sets its visual tokens: pixels / (patch * merge)^2; 0: the checkpoint's.
    image_splitting: SmolVLM (Idefics3) only: each frame as tiles plus its global image, as
        transformers' processor splits an image (off: the global image alone, a fixed token count).
    merge_evicted: at each eviction, average the evicted visual slots into their most similar
        kept slot instead of dropping them (LOOK-M; ``BoundedKVCache.merge_evicted``); a policy
        may ask for it too (``look-m`` does).
    drop_layers / drop_keep: staged visual-token drop during a frame's prefill (after PyramidDrop,
        model/staged_drop.py): at each of these layers (ascending; empty: off; ``"auto"``:
        PyramidDrop's four equal stages) a share ``drop_keep`` of the frame's visual tokens still
        in play goes on, the rest are dropped from that layer down (torch backend only).
    kv_cache_dtype: how the cache stores keys and values: ``"model"`` (the model's dtype) or
        ``"int8"`` (int8 codes with a scale per token and KV head, half a bf16 cache's bytes;
        cache/kv_codes.py; torch backend only).
    """

    capacity: int = 4096
    max_chunk: int = 256
    slack_fraction: float = 0.125
    template: str = "auto"
    system_prompt: str | None = None
    max_new_tokens: int = 64
    max_query_chars: int = 2000
    max_query_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    visual_pool: int = 1
    # Pixels per frame of a dynamic-resolution tower (Qwen2-VL): each frame is resized into
    # [min_pixels, max_pixels]; 0 takes the checkpoint's preprocessor_config.json.
    min_pixels: int = 0
    max_pixels: int = 0
    image_splitting: bool = False
    merge_evicted: bool = False
    drop_layers: tuple[int, ...] | str = ()
    drop_keep: float = 0.5
    check_evictions: bool = True
    kv_cache_dtype: str = "model"

    def __post_init__(self) -> None:
        for name in ("capacity", "max_chunk", "max_new_tokens", "max_query_chars", "max_query_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the checkpoint's), got {getattr(self, name)}")
        if not 0 <= self.slack_fraction < 1:
            raise ValueError(f"slack_fraction must be in [0, 1), got {self.slack_fraction}")
        object.__setattr__(self, "drop_layers", parse_drop_layers(self.drop_layers))
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.drop_layers:
            stage_counts(1, 1, self.drop_keep)  # a bad keep ratio fails here

    @property
    def slack(self) -> int:
        return int(self.capacity * self.slack_fraction)


@dataclass
class SessionStats:
    """Counters for diagnostics."""

    frames_ingested: int = 0
    text_tokens_fed: int = 0
    queries_answered: int = 0
    tokens_generated: int = 0


def default_dtype(device: str) -> torch.dtype:
    """The precision when none is asked for: float32 on the CPU (exact; its kernels gain nothing
    from halves), bfloat16 on a GPU (half the bytes each decoded token reads, and the type the fused
    Triton decode kernels are tuned for), float16 on a GPU without bfloat16."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def checkpoint_template(files, model_type: str, name: str = "auto") -> PromptTemplate:
    """The template a session uses for a checkpoint: preset ``name``, where ``auto`` and ``chat``
    resolve against the checkpoint's own chat template (see templates.template_for)."""
    chat = chat_template(files)
    return template_for(name, files.folder, model_type, template_from_chat(chat) if chat is not None else None)


class StreamingSession:
    """A model, a tokenizer, a bounded cache and an eviction policy, driven by frames and questions."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, policy: EvictionPolicy,
                 config: SessionConfig = SessionConfig(), template: PromptTemplate | None = None,
                 preprocessor: ImagePreprocessor | None = None, backend: Any = None) -> None:
        self.model, self.tokenizer, self.policy, self.config = model, tokenizer, policy, config
        self.template = template or template_for("qwen2")
        self.preprocessor = preprocessor or (preprocessor_for_folder(None, model.cfg.vision, config.min_pixels,
                                                                     config.max_pixels, config.image_splitting)
                                             if model.has_vision else None)
        self.backend = backend or TorchBackend(model)
        self.runner = self.backend.graph_runner()  # this session's captured steps (CUDA) or plain calls
        text = model.cfg.text
        self.cache = BoundedKVCache(text.num_layers, text.num_kv_heads, config.capacity, text.head_dim,
                                    model.decoder.rotary, model.dtype, model.device, config.kv_cache_dtype)
        self.cache.checks = config.check_evictions
        if self.cache.quantized:
            self._require_torch_backend("kv_cache_dtype int8", "an exported step graph takes the cache in the "
                                        "model's dtype")
        policy.bind(self.cache)
        self.stats = SessionStats()
        self.frames_in_stream = 0  # since the stream began (a reset begins a new one); stats count all
        self.last_frame_stamp: float | None = None
        self._frame_ids: dict[tuple, torch.Tensor] = {}  # per visual token count (and tile grid, when split)
        self._frame_offsets: dict[tuple[int, int], torch.Tensor] = {}  # M-RoPE offsets per frame grid
        self._image_wrap = image_wrap_ids(tokenizer, model.cfg)
        self._drop_plans: dict[bytes, tuple[int, StagedDrop]] = {}  # per chunk layout of visual tokens
        self.drop_layers: tuple[int, ...] = ()  # the stage boundaries in use (config's, "auto" resolved)
        if config.drop_layers:
            self._check_staged_drop()
        self.generator = torch.Generator().manual_seed(config.sampling.seed)
        # greedy decoding: each step's choice stays on the device and feeds the next step (see tokens())
        self._next_token = torch.zeros(1, dtype=torch.long, device=model.device)
        on_cuda = model.device.type == "cuda"
        self._token_readback = torch.zeros(1, dtype=torch.long, pin_memory=on_cuda)
        self._token_ready = torch.cuda.Event() if on_cuda else None
        self.stop_ids = {i for i in (tokenizer.token_to_id(s) for s in self.template.stop) if i is not None}
        self.stop_ids.update(model.cfg.eos_token_ids)
        if model.has_vision:
            if model.dynamic_resolution and config.visual_pool != 1:
                raise ValueError(f"visual_pool {config.visual_pool}: {type(model).__name__} merges its patches in its "
                                 f"own tower (pixels per frame set its tokens); pooling is for fixed-size towers")
        # a bad visual_pool, or a tokenizer without a split frame's markers, fails here, not at a frame
        policy.set_frame_tokens(len(self.frame_ids()) if model.has_vision else 0)
        self._check_sizes(len(self._system_ids()))
        self._write_system_prompt()

    @classmethod
    def from_pretrained(cls, path: str | Path, policy: str = DEFAULT_POLICY, policy_options: dict | None = None,
                        device: str = "cpu", dtype: torch.dtype | None = None, backend: str = "torch",
                        engine_dir: str | Path | None = None, mmproj: str | Path | None = None,
                        weights: str = "float", lm_head_weights: str = "float", embedding_weights: str = "float",
                        vision_weights: str = "float", **config: Any) -> "StreamingSession":
        """Load a checkpoint and start a session: a Hugging Face folder (config.json, safetensors,
        tokenizer.json), a text GGUF file, or a text GGUF with its ``mmproj`` GGUF (see
        ``ros_infmllm.model.locate``). Text-only models take text and questions, not frames.

        ``backend`` torch runs the model's modules; onnxruntime and tensorrt run the graphs that
        ``infmllm_export`` wrote to ``engine_dir`` (same capacity, dtype from its manifest when
        ``dtype`` is None) while embeddings, cache and policy stay here. With the torch backend a
        ``dtype`` of None is ``default_dtype(device)``: float32 on the CPU, bfloat16 on a GPU.

        ``weights``: the decoder blocks' projections in ``dtype`` (``float``) or packed ``int8`` /
        ``int4`` (``auto``: a GGUF's own Q8_0 / Q4_0 / Q4_1 blocks; see ``ros_infmllm.model.quantized``);
        on exported backends the graphs hold the weights they were exported with (``infmllm_export
        --weights``), so ``weights`` there is ``float`` / ``auto`` or the export's own mode.
        ``lm_head_weights``: the LM head likewise (``float``, ``int8``, ``int4``; torch backend only).
        ``embedding_weights``: the token table likewise (torch backend only; a tied table needs the
        head packed, whose codes it then reads). ``vision_weights``: the tower's and projector's linear
        layers likewise (``float``, ``int8``, ``int4``; torch backend only).
        """
        files = locate(path, mmproj)
        if files.gguf is not None and backend != "torch":
            raise ValueError(f"backend {backend!r} runs graphs exported from Hugging Face folders; "
                             f"{files.name} is a GGUF model: use backend 'torch'")
        policy_obj = make_policy(policy, **(policy_options or {}))
        session_config = SessionConfig(**config)
        manifest = Manifest.load(engine_dir) if backend != "torch" and engine_dir else None  # read once
        if backend != "torch":
            exported = manifest.weights if manifest is not None else "float"
            packed_parts = {"lm_head_weights": lm_head_weights, "embedding_weights": embedding_weights,
                            "vision_weights": vision_weights}
            if weights not in ("float", "auto", exported) or set(packed_parts.values()) != {"float"}:
                named = " / ".join(f"{k} {v!r}" for k, v in {"weights": weights, **packed_parts}.items())
                raise ValueError(f"{named}: the {backend} graphs hold the weights they were exported with "
                                 f"({exported}; LM head, embeddings and vision float): export with infmllm_export "
                                 f"--weights, or use the torch backend")
            weights = "float"  # the host model serves embeddings only; the graphs hold the projections
        if dtype is None:
            dtype = manifest.dtype if manifest is not None else default_dtype(device)
        tokenizer = load_tokenizer(files)  # before the weights: a missing tokenizer fails fast
        model = load_model(files, device=device, dtype=dtype, weights=weights, lm_head_weights=lm_head_weights,
                           embedding_weights=embedding_weights, vision_weights=vision_weights)
        runner = make_backend(backend, model, files.folder, engine_dir, manifest)
        if backend != "torch":
            runner.check_session(session_config.capacity, session_config.max_chunk, dtype)
        template = checkpoint_template(files, model.cfg.text.model_type, session_config.template)
        preprocessor = preprocessor_for(files, model, session_config.min_pixels, session_config.max_pixels,
                                        session_config.image_splitting)
        return cls(model, tokenizer, policy_obj, session_config, template, preprocessor, runner)

    def _check_staged_drop(self) -> None:
        layers = self.model.cfg.text.num_layers
        requested = self.config.drop_layers
        self.drop_layers = check_boundaries(even_boundaries(layers) if requested == "auto" else requested, layers)
        if not self.model.has_vision:
            raise ValueError("drop_layers: staged visual-token drop needs a vision model (this one is text-only)")
        self._require_torch_backend("drop_layers: staged visual-token drop", "exported graphs have one mask for "
                                    "every layer")

    @cached_property
    def held_weights(self) -> dict[str, str]:
        """What the weights are held as (``quantized.held_weights``), for a node to report: on an
        exported backend the graphs hold the projections, as their manifest names them. Read once:
        a session's model does not change, and the node reports it at every diagnostics tick."""
        held = held_weights(self.model.decoder)
        manifest = getattr(self.backend, "manifest", None)
        return held if manifest is None else {**held, "weights": manifest.weights}

    def _require_torch_backend(self, what: str, why: str) -> None:
        """Refuse a feature the exported graphs cannot run, naming the backend and ``why``."""
        if not isinstance(self.backend, TorchBackend):
            raise ValueError(f"{what} runs on the torch backend only, not "
                             f"{getattr(self.backend, 'name', type(self.backend).__name__)} ({why})")

    def _drop_plan(self, ids: torch.Tensor) -> tuple[int, StagedDrop] | None:
        """The staged drop of one frame chunk (its image placeholders may be dropped, never its last
        token, which ranks them), made once per layout; None where nothing can be dropped."""
        if not self.drop_layers:
            return None
        droppable = ids == self.model.cfg.image_token_index
        droppable[-1] = False
        visual = int(droppable.sum())
        if visual < 2:
            return None
        key = droppable.numpy().tobytes()
        if key not in self._drop_plans:
            kept = stage_counts(visual, len(self.drop_layers), self.config.drop_keep)
            plan = StagedDrop(self.drop_layers, kept, droppable.to(self.model.device))
            self._drop_plans[key] = (len(self._drop_plans), plan)
        return self._drop_plans[key]

    # ---- sizes -------------------------------------------------------------------------------
    def _check_sizes(self, pinned: int) -> None:
        cfg = self.config
        needed = pinned + self.policy.minimum_kept(self.cache) + max(cfg.max_chunk, cfg.slack)
        if self.policy.evicts and needed > cfg.capacity:
            raise ValueError(f"capacity {cfg.capacity} is too small: pinned system prompt ({pinned}) + the "
                             f"policy's kept tokens ({self.policy.minimum_kept(self.cache)}) + "
                             f"max(max_chunk, slack) ({max(cfg.max_chunk, cfg.slack)}) = {needed}")

    def _make_room(self, count: int, capture: bool = True) -> None:
        if count <= self.cache.free:
            return
        if not self.policy.evicts:
            raise CacheFullError(f"cache full ({self.cache.length}/{self.cache.capacity} tokens) and policy "
                                 f"'{self.policy.name}' does not evict")
        self._evict_to(self._keep_for(count), capture)

    def _keep_for(self, count: int) -> int:
        """Tokens an eviction keeps to make room for a step of ``count`` tokens."""
        return self.cache.capacity - max(count, self.config.slack)

    def _evict_to(self, keep: int, capture: bool = True) -> None:
        """The eviction is captured only with a captured step: its graph is keyed by the tokens
        kept, and an eager step's size (a question's last chunk) need not recur, so warm-up could
        not have captured it."""
        if self.cache.checks:  # validated: host syncs, so never captured
            self.cache.compact(self.policy.select(self.cache, keep), self.merges)
            return
        self.runner(("evict", keep), partial(self._evict, keep), (), capture)
        self.cache.shrink(keep)

    @property
    def merges(self) -> bool:
        """Whether evictions merge evicted visual slots into kept ones (config or policy)."""
        return self.config.merge_evicted or getattr(self.policy, "merges", False)

    def _evict(self, keep: int) -> None:
        """The device side of an eviction: the policy's choice, gathered to the front."""
        self.cache.move(self.policy.select(self.cache, keep), self.merges)

    # ---- the one path into the cache -----------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _template_ids(self, text: str, image_tokens: int = 0) -> list[int]:
        return template_ids(self.tokenizer, text, self.model.cfg.image_token_index, image_tokens, self._image_wrap)

    @torch.inference_mode()
    def feed(self, ids: torch.Tensor, image_features: torch.Tensor | None = None, pinned: bool = False,
             all_logits: bool = False, position_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Append tokens ``ids[T]`` (image placeholders filled from ``image_features``) to the cache.
        ``position_offsets`` ``[3, T]``: M-RoPE positions relative to the tokens' slots (a frame of
        a Qwen2-VL model, see ``frame_inputs``); None: positions are the slots.

        Returns the logits of the last token ``[vocab]``, or of every token ``[T, vocab]``.
        Refuses with ``CacheFullError`` before touching the cache if a non-evicting policy would overflow.
        If a step fails, the chunks this call had already added are removed before the error is
        raised (unless an eviction ran during the call: then what the policy kept stays); the
        attention statistics the policy took from those chunks are not taken back.
        Text is embedded inside the step (one id in, one graph replay per decoded token on CUDA);
        a frame's embeddings are merged first and its chunks stepped from them.
        """
        if not self.policy.evicts and ids.shape[0] > self.cache.free:
            raise CacheFullError(f"{ids.shape[0]} tokens do not fit: {self.cache.length}/{self.cache.capacity} "
                                 f"used and policy '{self.policy.name}' does not evict")
        cache = self.cache
        before = (cache.length, cache.total_seen, cache.evictions)
        try:
            return self._feed_chunks(ids.cpu(), image_features, pinned, all_logits, position_offsets)
        except Exception:
            # A failed step (out of memory, a backend error) writes nothing; the chunks of this
            # feed that did go in are taken out again, so a frame or a question is in the cache
            # whole or not at all. An eviction already made for it cannot be undone.
            if cache.evictions == before[2]:
                cache.truncate(before[0], before[1])  # also puts back device counts a step moved
            raise

    def _feed_chunks(self, ids: torch.Tensor, image_features: torch.Tensor | None, pinned: bool,
                     all_logits: bool, offsets: torch.Tensor | None = None) -> torch.Tensor:
        has_images = image_features is not None or bool((ids == self.model.cfg.image_token_index).any())
        source = self.model.embed_tokens(ids, image_features) if has_images else ids
        if offsets is not None:
            offsets = offsets.to(self.model.device, non_blocking=True)
        logits = []
        for start in range(0, ids.shape[0], self.config.max_chunk):
            chunk = source[start:start + self.config.max_chunk]
            count = chunk.shape[0]
            # Captured: decode tokens and frame chunks (their sizes recur); questions run eagerly.
            capture = not (pinned or all_logits) and (has_images or count == 1)
            self._make_room(count, capture)
            key = ("frame" if has_images else "text", count, pinned, all_logits)
            key += ("mrope",) if offsets is not None else ()
            plan = self._drop_plan(ids[start:start + count]) if has_images else None
            key += ("drop", plan[0]) if plan is not None else ()
            step = partial(self._step, from_ids=not has_images, pinned=pinned, all_logits=all_logits,
                           drop=plan[1] if plan is not None else None)
            inputs = (chunk,) if offsets is None else (chunk, offsets[:, start:start + count])
            logits.append(self.runner(key, step, inputs, capture))
            self.cache.commit(count)
        return torch.cat(logits) if all_logits else logits[-1][-1].clone()

    def _step(self, chunk: torch.Tensor, offsets: torch.Tensor | None = None, *, from_ids: bool, pinned: bool,
              all_logits: bool, drop: StagedDrop | None = None) -> torch.Tensor:
        """One chunk on the device: embed (text), decoder step, the policy's observation, cache
        write. Reads the fill level from the cache's device copies only, so it can be captured.
        ``offsets`` ``[3, count]``: M-RoPE positions relative to the chunk's slots; ``drop``: this
        frame chunk's staged visual-token drop."""
        cache, window = self.cache, self.policy.attention_window
        embeds = self.model.decoder.embed_tokens(chunk.to(self.model.device)) if from_ids else chunk
        count = embeds.shape[0]
        positions = cache.positions(count) if offsets is None else cache.positions(count) + offsets
        # with staged drops each layer masks its own dropped slots; otherwise one mask serves all
        valid = cache.layer_valid() if self.drop_layers else cache.valid()
        extra = {"drop": drop} if drop is not None else {}
        if cache.quantized:
            extra["int8_cache"] = cache.int8_cache
        out = self.backend.step(embeds, cache.k, cache.v, valid, positions, window, all_logits, **extra)
        if out.attn_mass is not None:
            self.policy.observe(cache, cache.fold_new_tokens(out.attn_mass), min(window, count))
        dropped = ~out.kept if out.kept is not None else None
        cache.write(out.new_k, out.new_v, pinned, visual=not from_ids, dropped=dropped)  # a frame's chunk: visual
        return out.logits

    def _step_next_token(self) -> torch.Tensor:
        """A greedy decode step fed from the device: it embeds the token the previous step chose
        and writes its own choice in that token's place, so no host round trip sits between steps."""
        logits = self._step(self._next_token, from_ids=True, pinned=False, all_logits=False)
        self._next_token.copy_(logits[-1].argmax().view(1))
        return logits

    def _feed_next_token(self) -> None:
        self._make_room(1)
        self.runner(("next", 1, False, False), self._step_next_token, ())
        self.cache.commit(1)

    def _start_reading_next_token(self) -> None:
        """Queue the copy of the device's chosen token to the host (before the step that overwrites it)."""
        self._token_readback.copy_(self._next_token, non_blocking=self._token_ready is not None)
        if self._token_ready is not None:
            self._token_ready.record()

    def _next_token_on_host(self) -> int:
        if self._token_ready is not None:
            self._token_ready.synchronize()
        return int(self._token_readback[0])

    @torch.inference_mode()
    def tokens(self, ids: torch.Tensor, limit: int, sampling: SamplingConfig | None = None) -> Iterator[int]:
        """Feed the prompt ``ids``, then generate: yields up to ``limit`` token ids, each already fed
        into the cache when it is yielded. Stop tokens are yielded (and fed) like any other: the
        caller stops consuming at one, and nothing more is fed.

        Greedy (temperature 0) runs pipelined: a step's token is chosen on the device and feeds the
        next step there, which is launched before the host reads the token back. The host's work
        per token (reading it, the caller's text handling and publishing) overlaps the GPU's next
        step instead of leaving the GPU idle; no step is speculative, since the step launched
        for token i only needs token i-1 not to be a stop token, which is known by then.
        """
        sampling = sampling or self.config.sampling
        logits = self.feed(ids)
        greedy = sampling.temperature == 0
        if greedy:
            self._next_token.copy_(logits.argmax().view(1))
        for _ in range(limit):
            if not self.policy.evicts and self.cache.free < 1:
                return
            if greedy:
                self._start_reading_next_token()
                self._feed_next_token()
                token = self._next_token_on_host()
            else:
                token = sample_next(logits, sampling, self.generator)
                logits = self.feed(torch.tensor([token]))
            yield token

    # ---- frames ---------------------------------------------------------------------------------
    def frame_ids(self, tokens: int | None = None, tiles: tuple[int, int] | None = None) -> torch.Tensor:
        """Token ids of one frame in the template, visual tokens as image placeholders (tokenised
        once per layout): ``tokens`` visual tokens (default: ``image_tokens_per_frame``), or with
        image splitting ``tokens`` per image of a frame cut into ``tiles`` (rows, columns; default:
        the reference frame's) plus its global image."""
        if isinstance(self.preprocessor, TiledPreprocessor):
            tiles = tiles if tiles is not None else self.preprocessor.split_grid(*REFERENCE_FRAME)
            if tokens is None:
                tokens = pooled_count(self.model.cfg.num_image_tokens, self.config.visual_pool)
        key = (self.image_tokens_per_frame if tokens is None else tokens, tiles)
        if key not in self._frame_ids:
            image_ids = None if tiles is None or tiles == (0, 0) else split_image_ids(
                self.tokenizer, self.model.cfg.image_token_index, key[0], *tiles)
            ids = template_ids(self.tokenizer, self.template.frame, self.model.cfg.image_token_index, key[0],
                               self._image_wrap, image_ids)
            self._frame_ids[key] = torch.tensor(ids)
        return self._frame_ids[key]

    @torch.inference_mode()
    def frame_inputs(self, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What ``feed`` takes for one frame: its template ids, its visual tokens and, for an M-RoPE
        model, its position offsets (per frame grid: a dynamic-resolution tower's token count
        follows the frame's size)."""
        if self.preprocessor is None:
            raise ValueError("this model is text-only (no vision tower): frames cannot be ingested")
        pixels = self.preprocessor(rgb, self.model.device)  # it validates the frame
        features = pool_tokens(self.backend.encode_images(pixels), self.config.visual_pool)
        if isinstance(self.preprocessor, TiledPreprocessor):  # tiles and global image, one prompt
            ids = self.frame_ids(features.shape[1], self.preprocessor.split_grid(*rgb.shape[:2]))
            return ids, features, None
        ids = self.frame_ids(features.shape[1])
        grid = self.model.frame_grid(pixels)
        if grid is None:
            return ids, features, None
        if grid not in self._frame_offsets:
            self._frame_offsets[grid] = self.model.stream_position_offsets(ids, grid)
        return ids, features, self._frame_offsets[grid]

    @torch.inference_mode()
    def encode_frame(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB ``HxWx3 uint8`` -> visual tokens ``[1, tokens, hidden]`` (preprocess, tower, projector)."""
        return self.frame_inputs(rgb)[1]

    @property
    def image_tokens_per_frame(self) -> int:
        """Visual tokens a frame puts in the cache (after ``visual_pool``); for a dynamic-resolution
        tower or split frames, a frame of the reference size (``REFERENCE_FRAME``)."""
        if isinstance(self.preprocessor, TiledPreprocessor):
            rows, cols = self.preprocessor.split_grid(*REFERENCE_FRAME)
            return (rows * cols + 1) * pooled_count(self.model.cfg.num_image_tokens, self.config.visual_pool)
        return pooled_count(self._reference_tokens(), self.config.visual_pool)

    def _reference_tokens(self) -> int:
        if self.model.dynamic_resolution:
            rows, cols = self.model.frame_grid(torch.empty(1, 3, self.preprocessor.height, self.preprocessor.width,
                                                           device="meta"))
            return rows * cols
        return self.model.cfg.num_image_tokens

    def ingest_frame(self, rgb: np.ndarray, stamp: float | None = None) -> None:
        """Add one camera frame to the stream. Bad frames raise ``ValueError``; the cache is untouched."""
        ids, features, offsets = self.frame_inputs(rgb)
        self.feed(ids, features, position_offsets=offsets)
        self.stats.frames_ingested += 1
        self.frames_in_stream += 1
        self.last_frame_stamp = stamp

    @property
    def awaiting_first_frame(self) -> bool:
        """A vision model that has not seen a frame since the stream began: a question now would
        be answered from no picture at all."""
        return self.preprocessor is not None and self.frames_in_stream == 0

    # ---- text -----------------------------------------------------------------------------------
    def feed_text(self, text: str) -> int:
        """Append text to the stream as it is (no chat template; special tokens written in it, such
        as ``<|im_start|>``, count as theirs), through the same bounded cache and policy as frames.
        Returns the number of tokens fed. Empty text raises ``ValueError``; the cache is untouched."""
        if not isinstance(text, str) or not text:
            raise ValueError("text is empty")
        ids = self._encode(text)
        if not ids:
            raise ValueError("text encodes to no tokens")
        self.feed(torch.tensor(ids))
        self.stats.text_tokens_fed += len(ids)
        return len(ids)

    # ---- questions ------------------------------------------------------------------------------
    def _query_ids(self, text: str) -> torch.Tensor:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("query is empty")
        if len(text) > self.config.max_query_chars:
            raise ValueError(f"query has {len(text)} characters, more than max_query_chars="
                             f"{self.config.max_query_chars}")
        query_ids = self._encode(text.strip())
        if len(query_ids) > self.config.max_query_tokens:
            raise ValueError(f"query has {len(query_ids)} tokens, more than max_query_tokens="
                             f"{self.config.max_query_tokens}")
        return torch.tensor(self._template_ids(self.template.query.replace("{query}", text.strip())))

    def ask(self, text: str, max_new_tokens: int | None = None,
            sampling: SamplingConfig | None = None) -> Iterator[str]:
        """Stream the answer to a question as text pieces. Validation happens at the call, before
        anything enters the cache; generation runs as the iterator is consumed."""
        ids = self._query_ids(text)
        limit = max_new_tokens or self.config.max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
        return self._generate(ids, limit, sampling or self.config.sampling)

    def answer(self, text: str, max_new_tokens: int | None = None, sampling: SamplingConfig | None = None) -> str:
        """The whole answer to a question."""
        return "".join(self.ask(text, max_new_tokens, sampling)).strip()

    def _generate(self, ids: torch.Tensor, limit: int, sampling: SamplingConfig) -> Iterator[str]:
        generated: list[int] = []
        shown = ""
        stopped = failed = False
        try:
            for token in self.tokens(ids, limit, sampling):
                if token in self.stop_ids:
                    stopped = True
                    break
                generated.append(token)
                self.stats.tokens_generated += 1
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                piece, shown = text[len(shown):], text
                if piece:
                    yield piece
        except Exception:
            failed = True  # a failed step: its feed was rolled back; writing a turn end would add to it
            raise
        finally:
            if not stopped and not failed:
                self._close_turn()
            self.stats.queries_answered += 1

    def _close_turn(self) -> None:
        end_ids = self._template_ids(self.template.turn_end)
        if end_ids and (self.policy.evicts or len(end_ids) <= self.cache.free):
            self.feed(torch.tensor(end_ids))

    def _system_ids(self) -> list[int]:
        system = self.config.system_prompt if self.config.system_prompt is not None else self.template.default_system
        return self._encode(self.template.system.replace("{system}", system)) if system else []

    def _write_system_prompt(self) -> None:
        """The system prompt opens every stream, pinned so no policy evicts it."""
        ids = self._system_ids()
        if ids:
            self.feed(torch.tensor(ids), pinned=True)

    # ---- warm-up ----------------------------------------------------------------------------------
    def warm_up(self, evictions: int | None = None, repeats: int | None = None) -> float:
        """Run every kind of step the stream will run before the first real frame or question, so
        that on a GPU torch.compile has compiled and the CUDA graphs are captured (a graph is
        captured at a key's third call): frames (vision tower, each prefill chunk size of a
        frame), questions of two lengths with greedy decode, sampled decode if sampling is
        configured, a one-token step, and for an evicting policy ``evictions`` evictions of each
        size a captured step can need (default: 4 on a GPU, none on the CPU, where nothing
        compiles), each kind of step ``repeats`` times (default: 4 on a GPU, past the capture at
        the third call; once on the CPU). Then the stream
        is reset, whether the warm-up ends or fails: nothing of it stays in the cache, the
        statistics or the sampling generator. Returns the seconds it took."""
        started = time.monotonic()
        on_gpu = self.model.device.type == "cuda"
        evictions = (4 if on_gpu else 0) if evictions is None else evictions
        repeats = (4 if on_gpu else 1) if repeats is None else repeats
        frame = None
        if self.preprocessor is not None:
            frame = np.full((self.preprocessor.height, self.preprocessor.width, 3), 128, np.uint8)
        feed = (lambda: self.ingest_frame(frame)) if frame is not None else (lambda: self.feed_text(" warm up" * 8))
        try:
            with torch.inference_mode():
                for _ in range(repeats):
                    feed()
                greedy = SamplingConfig(0.0, 1.0, self.config.sampling.seed)
                for question in ("What is in view?", "What did you see first, and what came after it?")[:repeats]:
                    self.answer(question, max_new_tokens=4, sampling=greedy)
                    if self.config.sampling.temperature > 0:
                        self.answer(question, max_new_tokens=4)
                one_token = torch.tensor(self._encode(" a")[:1])
                for _ in range(repeats):  # a one-token text step: sampled decode, a question's last chunk
                    self.feed(one_token)
                if self.policy.evicts and evictions:
                    # every eviction a captured step can ask for: one per size of a frame's chunks,
                    # and one for a one-token step (decode, a frame's or a question's last chunk)
                    sizes = {1} if frame is None else {1, *self._chunk_sizes(len(self.frame_ids()))}
                    for keep in sorted({self._keep_for(size) for size in sizes}):
                        for _ in range(evictions):
                            for _ in range(self.cache.capacity):  # a bound: each feed adds tokens
                                if self.cache.length > keep:
                                    break
                                feed()
                            self._evict_to(keep)
        finally:  # also after a failure (an out-of-memory, a failed capture): nothing of it stays
            self.reset()
            self.stats = SessionStats()
            self.generator.manual_seed(self.config.sampling.seed)
        if on_gpu:
            torch.cuda.synchronize(self.model.device)
        return time.monotonic() - started

    def _chunk_sizes(self, count: int) -> set[int]:
        """Sizes of the chunks ``count`` tokens are stepped in."""
        chunk = self.config.max_chunk
        return {min(chunk, count - start) for start in range(0, count, chunk)}

    def reset(self) -> None:
        """Forget the stream (keeps the model and buffers); the system prompt is written again."""
        self.cache.reset()
        self.policy.bind(self.cache)
        self.frames_in_stream = 0
        self.last_frame_stamp = None
        self._write_system_prompt()
