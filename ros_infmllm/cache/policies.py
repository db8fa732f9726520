"""Eviction policies: given the cache and its attention statistics, which slots to keep.

A policy decides; the cache moves (gather, re-rotation, statistics). Every policy keeps pinned
slots. Selection is per (layer, KV head), every head keeping the same count.

Hyper-parameters are named config fields. Where a value comes from a paper, the docstring says
where; where the paper text was not available to us, it says that the value is our choice.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import CacheFullError
from .kv_cache import BoundedKVCache

ALL_QUERIES = 1 << 30  # attention window meaning "every query of the step"
DROPPED_RANK = -1e30  # a dropped slot: below every live one, above every empty one


def _recent_count(cache: BoundedKVCache, fraction: float) -> int:
    return int(cache.capacity * fraction)


def keep_top(cache: BoundedKVCache, scores: torch.Tensor, must_keep: torch.Tensor, keep: int) -> torch.Tensor:
    """Ascending slot indices ``[layers, kv_heads, keep]``: every ``must_keep`` slot, then the
    highest ``scores`` among the other live slots (ties go to the newer slot); slots that a staged
    drop took out of a layer fill that layer's rest (there they stay masked), before empty ones."""
    valid = cache.valid()
    live = cache.live()
    forced = must_keep & live
    if cache.checks and int(forced.sum(-1).max()) > keep:
        raise CacheFullError(f"{int(forced.sum(-1).max())} slots must be kept (pinned + recent) "
                             f"but only {keep} may stay: raise the capacity or lower the pinned/recent counts")
    ranked = scores.float() + cache.slot_index.float() * 1e-9  # stable tie-break toward recent slots
    ranked = ranked.masked_fill(forced, float("inf")).masked_fill(~live, DROPPED_RANK)
    ranked = ranked.masked_fill(~valid, float("-inf"))
    chosen = ranked.topk(keep, dim=-1).indices
    del ranked  # before the sort's two outputs: an eviction's selection sets a 7B model's memory peak
    return chosen.sort(dim=-1).values


class EvictionPolicy(ABC):
    """Base class. ``attention_window``: how many of each step's last queries the policy needs
    attention mass from (0: none, so backends can skip computing it)."""

    name: ClassVar[str]
    attention_window: int = 0
    evicts: bool = True

    def bind(self, cache: BoundedKVCache) -> None:
        """Register the per-slot statistics this policy keeps (called once per cache)."""

    def observe(self, cache: BoundedKVCache, mass: torch.Tensor, queries: int) -> None:
        """Take one step's attention mass ``[layers, kv_heads, capacity]`` from its last ``queries``
        queries (already folded onto slots, new tokens included)."""

    @abstractmethod
    def select(self, cache: BoundedKVCache, keep: int) -> torch.Tensor:
        """Slots to keep, ``[layers, kv_heads, keep]`` ascending."""

    def minimum_kept(self, cache: BoundedKVCache) -> int:
        """Slots this policy always keeps besides pinned ones (so the session can validate sizes)."""
        return 0

    def set_frame_tokens(self, tokens: int) -> None:
        """The session says how many tokens one frame puts in the cache (0: a text-only model)."""


class FullPolicy(EvictionPolicy):
    """No eviction: the baseline that grows until the capacity, then refuses clearly."""

    name = "full"
    evicts = False

    def select(self, cache: BoundedKVCache, keep: int) -> torch.Tensor:
        raise CacheFullError(f"policy 'full' never evicts and the cache is full ({cache.length}/{cache.capacity} "
                             f"tokens): use a larger capacity or an evicting policy")


@dataclass(frozen=True)
class StreamingLLMConfig:
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks + a recent window.

    sinks: the first tokens of the stream kept as attention sinks; 4 is the paper's default
        (Sec. 3.2: four initial tokens suffice).
    """

    sinks: int = 4


class StreamingLLMPolicy(EvictionPolicy):
    """Keep the sinks and the most recent tokens; the window is whatever the budget leaves."""

    name = "streamingllm"

    def __init__(self, config: StreamingLLMConfig = StreamingLLMConfig()) -> None:
        self.config = config

    def select(self, cache: BoundedKVCache, keep: int) -> torch.Tensor:
        sinks = cache.origin < self.config.sinks
        recency = cache.slot_index.float().expand(cache.k.shape[:3])
        return keep_top(cache, recency, cache.pinned | sinks, keep)

    def minimum_kept(self, cache: BoundedKVCache) -> int:
        return self.config.sinks


@dataclass(frozen=True)
class H2OConfig:
    """H2O (Zhang et al., 2023, arXiv 2306.14048): heavy hitters by accumulated attention + recent.

    recent_fraction: share of the capacity kept as the recent window; the paper splits its budget
        evenly between recent tokens and heavy hitters (Sec. 5), hence 0.5.
    """

    recent_fraction: float = 0.5


class H2OPolicy(EvictionPolicy):
    """Accumulates the attention every query ever paid to each slot; keeps the recent window and
    the slots with the largest sums. Old tokens have been attended by more queries, which is
    why H2O favours them; Inf-MLLM's windowed score is the contrast."""

    name = "h2o"
    attention_window = ALL_QUERIES

    def __init__(self, config: H2OConfig = H2OConfig()) -> None:
        self.config = config

    def bind(self, cache: BoundedKVCache) -> None:
        self.accumulated = cache.register_stat("h2o_accumulated", torch.float32)

    def observe(self, cache: BoundedKVCache, mass: torch.Tensor, queries: int) -> None:
        self.accumulated += mass

    def scores(self, cache: BoundedKVCache) -> torch.Tensor:
        """What ranks the slots outside the recent window: the accumulated attention."""
        return self.accumulated

    def select(self, cache: BoundedKVCache, keep: int) -> torch.Tensor:
        recent = cache.slot_index >= cache.length_t - _recent_count(cache, self.config.recent_fraction)
        return keep_top(cache, self.scores(cache), cache.pinned | recent, keep)

    def minimum_kept(self, cache: BoundedKVCache) -> int:
        return _recent_count(cache, self.config.recent_fraction)


@dataclass(frozen=True)
class H2OKindsConfig:
    """``h2o-kinds`` (ours): H2O for what was seen, StreamingLLM for what was said.

    recent_fraction: share of the capacity kept as the recent window (H2O's even split, Sec. 5 of
        arXiv 2306.14048).
    sinks: the stream's first tokens, always kept (StreamingLLM's four attention sinks, Sec. 3.2 of
        arXiv 2309.17453): a text-only stream then keeps exactly what StreamingLLM keeps.
    """

    recent_fraction: float = 0.5
    sinks: int = 4


class H2OKindsPolicy(H2OPolicy):
    """Per-kind budgets, ours (docs/inf_mllm.md). Measured on SmolLM2 and the demo VLM, text and
    frames want different memories: on plain text the newest tokens predict the next one best
    (StreamingLLM is within 1.2% of recomputation, H2O 11% behind), while questions about what the
    camera saw need H2O's heavy hitters (first object seen at 20x: 95% vs 10%).

    So, outside the pinned slots, the sinks and the recent window, the room left is split between
    text and frame tokens in the proportion the recent window holds them (a stream that has just
    been talked about keeps more of its talk); text slots take their share newest first, frame slots
    theirs by accumulated attention, and a share one kind cannot fill goes to the other. A text-only
    stream is StreamingLLM exactly; a stream of frames alone is H2O with sinks pinned. No parameter
    beyond H2O's and StreamingLLM's own, so nothing here was tuned."""

    name = "h2o-kinds"

    def __init__(self, config: H2OKindsConfig = H2OKindsConfig()) -> None:
        self.config = config

    def select(self, cache: BoundedKVCache, keep: int) -> torch.Tensor:
        # the shares' ranks and orders (four [layers, kv_heads, capacity] int64 / float tensors) are
        # freed before keep_top runs: on a 7B model they were 0.17 GiB of the streaming peak
        # (benchmarks/results/memory_peak_int4_after_h200.md)
        must_keep, rank = self._shares(cache, keep)
        return keep_top(cache, rank, must_keep, keep)

    def _shares(self, cache: BoundedKVCache, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``select`` keeps for sure (pinned, sinks, recent, each kind's share) and the rank
        the rest compete by."""
        live = cache.live()
        recent = cache.slot_index >= cache.length_t - _recent_count(cache, self.config.recent_fraction)
        forced = (cache.pinned | (cache.origin < self.config.sinks) | recent) & live
        candidates = live & ~forced
        text = candidates & ~cache.visual
        seen = candidates & cache.visual
        window = recent & live & ~cache.pinned
        window_text = (window & ~cache.visual).sum(-1)
        room = (keep - forced.sum(-1)).clamp(min=0)  # [layers, kv_heads]
        text_share = room * window_text // window.sum(-1).clamp(min=1)
        text_rank = text.flip(-1).cumsum(-1).flip(-1) - 1  # 0 = the newest text candidate
        by_mass = (self.accumulated + cache.slot_index * 1e-9).masked_fill(~seen, float("-inf"))
        order = by_mass.argsort(dim=-1, descending=True)
        del by_mass
        seen_rank = torch.empty_like(order).scatter_(-1, order, cache.slot_index.expand_as(order))
        del order
        in_share = (text & (text_rank < text_share.unsqueeze(-1))) | \
                   (seen & (seen_rank < (room - text_share).unsqueeze(-1)))
        # Past its share a kind competes only for what the other kind could not fill, in its own order.
        return forced | in_share, -torch.where(text, text_rank, seen_rank).float()

    def minimum_kept(self, cache: BoundedKVCache) -> int:
        return _recent_count(cache, self.config.recent_fraction) + self.config.sinks


@dataclass(frozen=True)
class LookMConfig:
    """LOOK-M (Wan et al., 2024, arXiv 2406.18139) as a streaming policy: text-prior eviction and
    merging of the evicted visual entries.

    recent_fraction: share of the capacity kept as the recent window, as H2O's (our choice: LOOK-M
        also keeps a recent window; its size here follows H2O's even split).
    merge: average evicted visual entries into their most similar kept entry (LOOK-M's merging);
        False drops them (text-prior eviction alone).
    """

    recent_fraction: float = 0.5
    merge: bool = True


class LookMPolicy(H2OPolicy):
    """H2O's accumulated attention, text first: every text slot ranks above every visual slot (the
    prompt and the conversation are what a question is about; frames are many and redundant), the
    visual slots by their accumulated attention; evicted visual entries merged (``merges``)."""

    name = "look-m"

    def __init__(self, config: LookMConfig = LookMConfig()) -> None:
        self.config = config

    @property
    def merges(self) -> bool:
        return self.config.merge

    def scores(self, cache: BoundedKVCache) -> torch.Tensor:
        above_any = self.accumulated.amax() + 1.0  # a text slot outranks every visual one, text by its own score
        return self.accumulated + (~cache.visual).float() * above_any


@dataclass(frozen=True)
class InfMLLMConfig:
    """Inf-MLLM (Ning et al., 2024, arXiv 2409.09086, Sec. 4): recent tokens + attention saddles.

    The full paper text was not reachable from our tools when this was written; the structure
    below follows its abstract and method summary (recent + relevant tokens, a local-sum score
    over a retrieval window of recent queries, an attention bias toward newer tokens). The
    numeric defaults are our choices, recorded in docs/inf_mllm.md, to be checked against the paper.

    recent_fraction: share of the capacity always kept as the most recent tokens (R = C * f).
    retrieval_window: r, how many of the latest queries score the cached tokens.
    pool: width of the 1-D sum pooling that spreads a saddle's score to its neighbours (odd).
    attention_bias: weight of the recency bias: a slot at relative age a (0 newest, 1 oldest)
        gets ``attention_bias * (1 - a)`` added to its score, where scores are in units of
        uniform attention (1.0 = the mass every token would get if attention were flat).
    """

    recent_fraction: float = 0.25
    retrieval_window: int = 32
    pool: int = 5
    attention_bias: float = 1.0


class InfMLLMPolicy(EvictionPolicy):
    """Keeps pinned + recent slots and the top slots by windowed, pooled, biased attention.

    The retrieval window is held as a ring of per-step masses (each step contributes its last
    ``min(q, r)`` queries); the newest entries are summed until r queries are covered, the
    oldest entry scaled to the share still needed. The ring position and the query counts live
    on the device, so observing a step needs no host state (a captured step replays it).
    """

    name = "inf-mllm"

    def __init__(self, config: InfMLLMConfig = InfMLLMConfig()) -> None:
        if config.pool < 1 or config.pool % 2 == 0:
            raise ValueError(f"inf-mllm pool must be a positive odd width, got {config.pool}")
        if config.retrieval_window < 1:
            raise ValueError(f"inf-mllm retrieval_window must be >= 1, got {config.retrieval_window}")
        self.config = config
        self.attention_window = config.retrieval_window

    def bind(self, cache: BoundedKVCache) -> None:
        """Binding the same cache again (a session reset) zeroes the state in place: captured
        steps keep pointing at these tensors."""
        window = self.config.retrieval_window
        self.ring = cache.register_stat("infmllm_window", torch.float32, (window,))
        if getattr(self, "_cache", None) is cache:
            self.counts.zero_()
            self.head.zero_()
            return
        self._cache = cache
        self.counts = torch.zeros(window, dtype=torch.float32, device=cache.device)  # queries per ring entry
        self.head = torch.zeros((), dtype=torch.int64, device=cache.device)          # the newest entry
        self.ages = torch.arange(window, device=cache.device)

    def observe(self, cache: BoundedKVCache, mass: torch.Tensor, queries: int) -> None:
        self.head.add_(1).remainder_(len(self.counts))
        self.ring.index_copy_(0, self.head.view(1), mass.unsqueeze(0))
        self.counts.index_fill_(0, self.head.view(1), float(min(queries, self.config.retrieval_window)))

    def window_mass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the last r queries per slot ``[layers, kv_heads, capacity]``, and how many queries."""
        window = self.config.retrieval_window
        newest_first = (self.head - self.ages).remainder(window)
        counts = self.counts[newest_first]
        before = counts.cumsum(0) - counts  # queries covered by newer entries
        share = torch.minimum(counts, (window - before).clamp_min(0))
        weights = torch.zeros_like(self.counts).index_copy_(0, newest_first, share / counts.clamp_min(1))
        return torch.einsum("r,rlhc->lhc", weights, self.ring), share.sum()

    def scores(self, cache: BoundedKVCache) -> torch.Tensor:
        """Saddle score per slot: pooled window attention (uniform = 1) plus the recency bias."""
        mass, _ = self.window_mass()
        n = cache.length_t.clamp_min(1)
        # Each row sums the softmax rows of the window's queries and the group's query heads;
        # normalised to a distribution and scaled by n, flat attention scores 1 per slot.
        score = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12) * n
        width = self.config.pool
        layers, heads, capacity = score.shape
        pooled = F.avg_pool1d(score.view(-1, 1, capacity), width, stride=1, padding=width // 2,
                              count_include_pad=True).view(layers, heads, capacity) * width
        age = 1.0 - cache.slot_index.float() / (n - 1).clamp_min(1)  # 1 oldest .. 0 newest
        return pooled + self.config.attention_bias * (1.0 - age)

    def forced(self, cache: BoundedKVCache) -> torch.Tensor:
        """Slots kept whatever their score: pinned and the most recent ``capacity * recent_fraction``."""
        return cache.pinned | (cache.slot_index >= cache.length_t - _recent_count(cache, self.config.recent_fraction))

    def select(self, cache: BoundedKVCache, keep: int) -> torch.Tensor:
        return keep_top(cache, self.scores(cache), self.forced(cache), keep)

    def minimum_kept(self, cache: BoundedKVCache) -> int:
        return _recent_count(cache, self.config.recent_fraction)


@dataclass(frozen=True)
class InfMLLMLongTermConfig(InfMLLMConfig):
    """Inf-MLLM-LT: ours (not in the paper). Inf-MLLM's windowed saddles answer for the present;
    two additions answer for the distant past, where H2O's accumulated score measured better
    (benchmarks/results/demo_eval_tiny.md, demo_eval.md):

    long_term_weight: weight of a long-term score added to the saddle score: each slot's
        attention in units of uniform attention, averaged over the stream with exponential decay
        (an H2O-like memory that forgets, so early tokens do not win by age alone).
    long_term_half_life: queries after which a step's attention counts half in the long-term score;
        -1: no decay, the long-term score is then the sum of every step's attention (in units of
        uniform attention), as H2O accumulates it.
    stretch: tokens per stretch of the stream; the best-scoring slot of every stretch is kept
        before any other evictable slot, so no stretch is wholly forgotten. -1 (default): one
        frame's tokens, as the session reports them (64 for a text-only model); 0: off.
    representative_fraction: at most this share of the capacity goes to representatives; when the
        stream holds more stretches, they are widened so the count stays within it.
    """

    long_term_weight: float = 4.0
    long_term_half_life: int = 2048
    stretch: int = -1
    representative_fraction: float = 0.25


class InfMLLMLongTermPolicy(InfMLLMPolicy):
    """Inf-MLLM's saddle score plus a decayed long-term score, and one representative per stretch."""

    name = "inf-mllm-lt"
    REPRESENTATIVE_BONUS = 1e6  # ranks representatives above every other evictable slot
    TEXT_STRETCH = 64           # stretch=-1 on a text-only model

    def __init__(self, config: InfMLLMLongTermConfig = InfMLLMLongTermConfig()) -> None:
        super().__init__(config)
        if config.long_term_half_life < 1 and config.long_term_half_life != -1:
            raise ValueError(f"inf-mllm-lt long_term_half_life must be >= 1, or -1 (no decay), got "
                             f"{config.long_term_half_life}")
        if config.stretch < -1 or not 0.0 <= config.representative_fraction < 1.0:
            raise ValueError("inf-mllm-lt stretch must be >= -1 and representative_fraction in [0, 1)")
        self.frame_tokens = 0

    def set_frame_tokens(self, tokens: int) -> None:
        self.frame_tokens = tokens

    @property
    def stretch(self) -> int:
        """Tokens per stretch: the configured count, or one frame's for -1."""
        if self.config.stretch >= 0:
            return self.config.stretch
        return self.frame_tokens or self.TEXT_STRETCH

    def bind(self, cache: BoundedKVCache) -> None:
        super().bind(cache)
        self.long_term = cache.register_stat("infmllm_long_term", torch.float32)
        self.long_term.zero_()  # a reset binds again: zero in place (captured steps keep the tensor)

    def observe(self, cache: BoundedKVCache, mass: torch.Tensor, queries: int) -> None:
        super().observe(cache, mass, queries)
        n = cache.length_t.clamp_min(1)
        uniform = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12) * n
        if self.config.long_term_half_life == -1:  # a sum, as H2O accumulates
            self.long_term.add_(uniform)
            return
        keep = 0.5 ** (queries / self.config.long_term_half_life)  # host float: a captured step replays it
        self.long_term.mul_(keep).add_(uniform, alpha=1.0 - keep)

    def scores(self, cache: BoundedKVCache) -> torch.Tensor:
        return super().scores(cache) + self.config.long_term_weight * self.long_term

    def representatives(self, cache: BoundedKVCache, scores: torch.Tensor, evictable: torch.Tensor) -> torch.Tensor:
        """Per (layer, head), the best evictable slot of each stretch of stream positions. Slots
        hold ascending origins, so a stretch is a run of slots; runs are numbered by a cumulative
        sum (static shapes: capturable in a CUDA graph)."""
        allowed = max(1, int(cache.capacity * self.config.representative_fraction))
        width = torch.clamp_min((cache.seen_t + allowed - 1) // allowed, self.stretch)
        stretch = torch.where(evictable, cache.origin // width, torch.full_like(cache.origin, -1))
        starts = torch.ones_like(stretch, dtype=torch.bool)
        starts[..., 1:] = stretch[..., 1:] != stretch[..., :-1]
        run = starts.long().cumsum(-1) - 1
        ranked = scores.masked_fill(~evictable, float("-inf"))
        best = torch.full_like(ranked, float("-inf")).scatter_reduce(-1, run, ranked, "amax")
        return evictable & (ranked >= best.gather(-1, run))

    def select(self, cache: BoundedKVCache, keep: int) -> torch.Tensor:
        forced = self.forced(cache)
        scores = self.scores(cache)
        if self.stretch:
            evictable = cache.live() & ~forced
            scores = scores + self.REPRESENTATIVE_BONUS * self.representatives(cache, scores, evictable)
        return keep_top(cache, scores, forced, keep)


class InfMLLMPaperPolicy(EvictionPolicy):
    """Inf-MLLM as its Figure 3 draws it (arXiv 2409.09086; ../shared/papers/, DESIGN.md): the
    incoming prompt is prefilled against the whole cache (which holds the budget plus the prompt:
    the session evicts only when the next chunk does not fit), every query of that prompt is the
    retrieval window, each cached key's attention is summed and averaged over those queries, and
    the lowest-scoring keys are evicted while the prompt's own tokens stay. No recent window, no
    pooling, no recency bias: exactly what the figure shows, nothing the summaries add.

    "The prompt" is everything fed since the last eviction (a chunk, a question, an answer's
    tokens); its tokens are the newest step's. The sum and the query count live on the device.
    """

    name = "inf-mllm-paper"
    attention_window = ALL_QUERIES

    def bind(self, cache: BoundedKVCache) -> None:
        self.mass = cache.register_stat("paper_window_mass", torch.float32)
        if getattr(self, "_cache", None) is cache:  # a session reset: zero in place for captured steps
            self.queries.zero_()
            self.last.zero_()
            return
        self._cache = cache
        self.queries = torch.zeros((), dtype=torch.float32, device=cache.device)  # since the last eviction
        self.last = torch.zeros((), dtype=torch.int64, device=cache.device)       # the newest step's tokens

    def observe(self, cache: BoundedKVCache, mass: torch.Tensor, queries: int) -> None:
        self.mass += mass
        self.queries += queries
        self.last.fill_(queries)

    def scores(self) -> torch.Tensor:
        """Each slot's attention averaged over the window's queries (sum / query count)."""
        return self.mass / self.queries.clamp_min(1)

    def select(self, cache: BoundedKVCache, keep: int) -> torch.Tensor:
        prompt = cache.slot_index >= cache.length_t - self.last
        kept = keep_top(cache, self.scores(), cache.pinned | prompt, keep)
        self.mass.zero_()  # the next window starts after this eviction
        self.queries.zero_()
        return kept


POLICIES: dict[str, tuple[type[EvictionPolicy], type | None]] = {
    "full": (FullPolicy, None),
    "streamingllm": (StreamingLLMPolicy, StreamingLLMConfig),
    "h2o": (H2OPolicy, H2OConfig),
    "inf-mllm": (InfMLLMPolicy, InfMLLMConfig),
    "inf-mllm-paper": (InfMLLMPaperPolicy, None),
    "inf-mllm-lt": (InfMLLMLongTermPolicy, InfMLLMLongTermConfig),
    "look-m": (LookMPolicy, LookMConfig),
    "h2o-kinds": (H2OKindsPolicy, H2OKindsConfig),
}
# The policy that measured best overall (docs/inf_mllm.md): h2o-kinds answers the demo VLM's
# questions about the past as h2o does, the best of all at every stream length
# (benchmarks/results/demo_eval_kinds_h200.md), keeps on plain text exactly what streamingllm keeps,
# the best there (stream_perplexity_kinds_cpu.md), and decodes within 1.3% of streamingllm
# (bench_gpu_kinds_h200.md); the saddle policies do not beat it.
DEFAULT_POLICY = "h2o-kinds"


def make_policy(name: str, **options: Any) -> EvictionPolicy:
    """Build a policy by name with config fields as keyword options; unknown names or options
    raise ``ValueError`` listing what is accepted."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r} (choose from {', '.join(POLICIES)})")
    policy_cls, config_cls = POLICIES[name]
    if config_cls is None:
        if options:
            raise ValueError(f"policy {name!r} takes no options, got {sorted(options)}")
        return policy_cls()
    accepted = {f.name for f in fields(config_cls)}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {sorted(unknown)} (accepted: {sorted(accepted)})")
    return policy_cls(config_cls(**options))
