"""Eviction policies on a cache with planted attention patterns."""
from __future__ import annotations

import pytest
import torch

from ros_infmllm.cache import (BoundedKVCache, H2OConfig, H2OPolicy, InfMLLMConfig, InfMLLMPolicy, StreamingLLMPolicy,
                               make_policy)
from ros_infmllm.errors import CacheFullError
from ros_infmllm.rope import Rotary

LAYERS, HEADS, DIM = 2, 2, 4


def _full_cache(capacity: int = 64, pinned: int = 0) -> BoundedKVCache:
    cache = BoundedKVCache(LAYERS, HEADS, capacity, DIM, Rotary(DIM, 10000.0))
    if pinned:
        cache.append(torch.randn(LAYERS, HEADS, pinned, DIM), torch.randn(LAYERS, HEADS, pinned, DIM), pinned=True)
    rest = capacity - pinned
    cache.append(torch.randn(LAYERS, HEADS, rest, DIM), torch.randn(LAYERS, HEADS, rest, DIM))
    return cache


def _attention(capacity: int, peaks: dict[int, float], base: float = 1.0) -> torch.Tensor:
    """Mass ``[layers, heads, capacity]`` with ``base`` everywhere and extra weight at the peaks."""
    mass = torch.full((LAYERS, HEADS, capacity), base)
    for slot, weight in peaks.items():
        mass[..., slot] += weight
    return mass


def _kept(policy, cache: BoundedKVCache, keep: int) -> set[int]:
    chosen = policy.select(cache, keep)
    assert chosen.shape == (LAYERS, HEADS, keep)
    return set(chosen[0, 0].tolist())


def test_streamingllm_keeps_exactly_sinks_and_window() -> None:
    cache = _full_cache(32)
    kept = _kept(StreamingLLMPolicy(), cache, 20)
    assert kept == set(range(4)) | set(range(16, 32))


def test_inf_mllm_keeps_planted_saddles_and_recent_tokens() -> None:
    cache = _full_cache(64)
    policy = InfMLLMPolicy(InfMLLMConfig(recent_fraction=0.25, retrieval_window=4, pool=3, attention_bias=0.5))
    policy.bind(cache)
    for _ in range(4):
        policy.observe(cache, _attention(64, {10: 40.0, 30: 40.0}, base=0.1), queries=1)
    kept = _kept(policy, cache, 16 + 8)
    recent = set(range(48, 64))
    saddles = {9, 10, 11, 29, 30, 31}
    assert recent | saddles <= kept
    # The two remaining slots go to the newest non-recent tokens (the bias), not to old ones.
    assert kept - recent - saddles == {46, 47}


def test_attention_bias_moves_kept_set_toward_newer_tokens() -> None:
    cache = _full_cache(64)
    # Two equal-looking saddles, the older one slightly stronger.
    mass = _attention(64, {5: 11.0, 40: 10.0}, base=0.1)

    def kept_saddle(bias: float) -> set[int]:
        policy = InfMLLMPolicy(InfMLLMConfig(recent_fraction=0.25, retrieval_window=1, pool=1, attention_bias=bias))
        policy.bind(cache)
        policy.observe(cache, mass, queries=1)
        return _kept(policy, cache, 17) - set(range(48, 64))

    assert kept_saddle(0.0) == {5}
    assert kept_saddle(5.0) == {40}


def test_inf_mllm_follows_shifted_attention_where_h2o_stays() -> None:
    """Old queries attended slot 5; the latest ones attend slot 40 (the conversation moved on)."""
    cache = _full_cache(64)
    infmllm = InfMLLMPolicy(InfMLLMConfig(recent_fraction=0.25, retrieval_window=4, pool=1, attention_bias=0.0))
    h2o = H2OPolicy(H2OConfig(recent_fraction=0.25))
    for policy in (infmllm, h2o):
        policy.bind(cache)
    for step in range(40):
        mass = _attention(64, {5: 10.0} if step < 36 else {40: 10.0}, base=0.01)
        for policy in (infmllm, h2o):
            policy.observe(cache, mass, queries=1)
    recent = set(range(48, 64))
    assert _kept(infmllm, cache, 17) - recent == {40}
    assert _kept(h2o, cache, 17) - recent == {5}


def test_selection_differs_per_head() -> None:
    cache = _full_cache(64)
    policy = InfMLLMPolicy(InfMLLMConfig(recent_fraction=0.25, retrieval_window=1, pool=1, attention_bias=0.0))
    policy.bind(cache)
    mass = torch.full((LAYERS, HEADS, 64), 0.1)
    mass[0, 0, 7] = mass[0, 1, 21] = mass[1, 0, 33] = mass[1, 1, 2] = 50.0
    policy.observe(cache, mass, queries=1)
    chosen = policy.select(cache, 17)
    assert [int(chosen[l, h, 0]) for l in range(2) for h in range(2)] == [7, 21, 33, 2]


def _mixed_cache(kinds: str) -> BoundedKVCache:
    """One slot per character: ``t`` a text token, ``v`` a frame's token, in stream order."""
    cache = BoundedKVCache(LAYERS, HEADS, len(kinds), DIM, Rotary(DIM, 10000.0))
    for kind in kinds:
        cache.append(torch.randn(LAYERS, HEADS, 1, DIM), torch.randn(LAYERS, HEADS, 1, DIM), visual=kind == "v")
    return cache


def test_h2o_kinds_on_text_alone_keeps_what_streamingllm_keeps() -> None:
    cache = _mixed_cache("t" * 64)
    policy = make_policy("h2o-kinds")
    policy.bind(cache)
    policy.observe(cache, _attention(64, {10: 50.0, 20: 50.0}), queries=1)  # heavy hitters H2O would keep
    for keep in (36, 40, 50):
        assert _kept(policy, cache, keep) == _kept(StreamingLLMPolicy(), cache, keep)
    h2o = make_policy("h2o")
    h2o.bind(cache)
    assert {10, 20} <= _kept(h2o, cache, 40)


def test_h2o_kinds_on_frames_alone_keeps_sinks_window_and_heavy_hitters() -> None:
    cache = _mixed_cache("v" * 64)
    policy = make_policy("h2o-kinds")
    policy.bind(cache)
    policy.observe(cache, _attention(64, {10: 50.0, 20: 40.0, 30: 30.0}), queries=1)
    assert _kept(policy, cache, 4 + 32 + 2) == set(range(4)) | set(range(32, 64)) | {10, 20}


def test_h2o_kinds_splits_the_room_as_the_recent_window_splits_text_and_frames() -> None:
    """The window (slots 24..47) holds 6 text tokens of 24: a quarter of the room beyond sinks and
    window (2 of 8) goes to the newest older text, whatever its attention, the rest to the frames'
    heavy hitters."""
    cache = _mixed_cache("v" * 4 + "t" * 8 + "v" * 12 + "t" * 6 + "v" * 18)
    policy = make_policy("h2o-kinds")
    policy.bind(cache)
    peaks = {5: 90.0, 6: 90.0, 13: 9.0, 15: 8.0, 17: 7.0, 19: 6.0, 21: 5.0, 23: 4.0}
    policy.observe(cache, _attention(48, peaks), queries=1)
    kept = _kept(policy, cache, 4 + 24 + 8)
    assert kept - set(range(4)) - set(range(24, 48)) == {10, 11} | {13, 15, 17, 19, 21, 23}
    # A share one kind cannot fill goes to the other: no older text, so frames take the whole room.
    frames_only_older = _mixed_cache("v" * 24 + "t" * 8 + "v" * 16)
    policy.bind(frames_only_older)
    policy.observe(frames_only_older, _attention(48, {5: 9.0}), queries=1)
    assert len(_kept(policy, frames_only_older, 36) - set(range(4)) - set(range(24, 48))) == 8


@pytest.mark.parametrize("name", ["streamingllm", "h2o", "inf-mllm", "inf-mllm-paper", "inf-mllm-lt", "look-m",
                                  "h2o-kinds"])
def test_pinned_slots_survive_every_policy(name: str) -> None:
    cache = _full_cache(64, pinned=6)
    policy = make_policy(name)
    policy.bind(cache)
    if policy.attention_window:
        policy.observe(cache, _attention(64, {50: 30.0}, base=0.0), queries=1)
    chosen = policy.select(cache, 40)
    assert set(range(6)) <= set(chosen[1, 1].tolist())


def test_too_many_forced_slots_is_a_clear_error() -> None:
    cache = _full_cache(64, pinned=30)
    policy = make_policy("inf-mllm", recent_fraction=0.5)
    policy.bind(cache)
    with pytest.raises(CacheFullError, match="must be kept"):
        policy.select(cache, 40)


def test_full_policy_refuses_to_evict() -> None:
    with pytest.raises(CacheFullError, match="never evicts"):
        make_policy("full").select(_full_cache(16), 8)


@pytest.mark.parametrize("name, options, message", [
    ("lru", {}, "unknown eviction policy 'lru'"),
    ("inf-mllm", {"window": 3}, "no option"),
    ("full", {"sinks": 4}, "takes no options"),
    ("inf-mllm", {"pool": 4}, "odd"),
    ("inf-mllm-lt", {"long_term_half_life": 0}, ">= 1"),
    ("inf-mllm-lt", {"representative_fraction": 1.0}, "representative_fraction"),
])
def test_make_policy_rejects_bad_names_and_options(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy(name, **options)


def test_inf_mllm_window_sums_the_newest_steps_until_r_queries() -> None:
    """Steps of 7, 3, 40, 2 and 1 queries with r = 8: a step reports its last min(q, r) queries; the
    newest (1 and 2 queries) count whole, the 40-query step (8 reported) for the 5 queries still
    missing (5/8 of its mass), older steps not at all."""
    cache = _full_cache()
    policy = InfMLLMPolicy(InfMLLMConfig(retrieval_window=8))
    policy.bind(cache)
    masses = [torch.rand(LAYERS, HEADS, 64) for _ in range(5)]
    for mass, queries in zip(masses, [7, 3, 40, 2, 1]):
        policy.observe(cache, mass, queries)
    total, covered = policy.window_mass()
    expected = masses[4] + masses[3] + masses[2] * (5 / 8)
    assert int(covered) == 8 and torch.allclose(total, expected)
    for step in range(10):  # around the ring: only the newest steps count
        policy.observe(cache, masses[step % 5], 1)
    total, covered = policy.window_mass()
    assert int(covered) == 8 and torch.allclose(total, sum(masses[s % 5] for s in range(2, 10)))


def test_inf_mllm_paper_keeps_the_prompt_and_the_keys_it_attended_most() -> None:
    """Figure 3: the new prompt's (last step's) tokens stay; of the rest, the keys with the highest
    average attention from the prompt's queries stay, the lowest go; no recency preference."""
    cache = _full_cache(64)
    policy = make_policy("inf-mllm-paper")
    policy.bind(cache)
    policy.observe(cache, _attention(64, {3: 9.0, 20: 5.0}, base=0.01), queries=8)  # an older prompt
    cache.stats["paper_window_mass"].zero_(), policy.queries.zero_()  # as if an eviction had run since
    policy.observe(cache, _attention(64, {2: 30.0, 17: 20.0, 33: 10.0}, base=0.01), queries=8)  # the new prompt
    kept = _kept(policy, cache, 8 + 3)
    assert kept == set(range(56, 64)) | {2, 17, 33}


def test_inf_mllm_paper_starts_a_new_window_after_each_eviction() -> None:
    cache = _full_cache(64)
    policy = make_policy("inf-mllm-paper")
    policy.bind(cache)
    policy.observe(cache, _attention(64, {5: 50.0}, base=0.01), queries=4)
    assert _kept(policy, cache, 4 + 1) == {5, 60, 61, 62, 63}
    assert float(policy.queries) == 0 and float(cache.stats["paper_window_mass"].abs().sum()) == 0
    policy.observe(cache, _attention(64, {9: 50.0}, base=0.01), queries=2)
    assert _kept(policy, cache, 2 + 1) == {9, 62, 63}  # slot 5's old attention no longer counts


def test_inf_mllm_lt_keeps_a_representative_of_every_stretch() -> None:
    """Attention only on two slots of one stretch: plain inf-mllm spends the rest on the newest
    tokens (its bias) and forgets the oldest stretches; inf-mllm-lt keeps one slot of each."""
    peaks = {10: 40.0, 12: 40.0}
    kept = {}
    for name, options in (("inf-mllm", {}), ("inf-mllm-lt", {"stretch": 8, "long_term_weight": 0.0})):
        cache = _full_cache(64)
        policy = make_policy(name, retrieval_window=4, pool=1, **options)
        policy.bind(cache)
        for _ in range(4):
            policy.observe(cache, _attention(64, peaks, base=0.1), queries=1)
        kept[name] = _kept(policy, cache, 16 + 8)
    stretches = [set(range(start, start + 8)) for start in range(0, 48, 8)]
    assert {10, 12} <= kept["inf-mllm-lt"] and set(range(48, 64)) <= kept["inf-mllm-lt"]
    assert all(kept["inf-mllm-lt"] & stretch for stretch in stretches)
    assert not all(kept["inf-mllm"] & stretch for stretch in stretches)


def test_inf_mllm_lt_widens_stretches_to_stay_within_its_share() -> None:
    cache = _full_cache(64)
    policy = make_policy("inf-mllm-lt", stretch=8, representative_fraction=4 / 64)  # at most 4 stretches
    policy.bind(cache)
    evictable = cache.valid() & (cache.slot_index < 48)
    chosen = policy.representatives(cache, torch.rand(LAYERS, HEADS, 64), evictable.expand(LAYERS, HEADS, 64))
    assert chosen.sum(-1).tolist() == [[3, 3], [3, 3]]  # slots 0-47 span 3 of the 16-token stretches


def test_inf_mllm_lt_remembers_what_drew_attention_long_ago_then_forgets_it() -> None:
    """Slot 5 drew attention for a while, then the window moved to slot 40 (and a little to 20).
    The windowed score alone has forgotten slot 5; the long-term score keeps it, until its
    half-life has passed many times and slot 20's steady share outweighs it."""
    def kept_after(name: str, later_steps: int) -> set[int]:
        cache = _full_cache(64)
        policy = make_policy(name, retrieval_window=4, pool=1, attention_bias=0.0,
                             **({"stretch": 0, "long_term_half_life": 64} if name == "inf-mllm-lt" else {}))
        policy.bind(cache)
        for _ in range(64):
            policy.observe(cache, _attention(64, {5: 20.0}, base=0.1), queries=1)
        for _ in range(later_steps):
            policy.observe(cache, _attention(64, {40: 20.0, 20: 1.0}, base=0.1), queries=1)
        return _kept(policy, cache, 16 + 2)

    assert 5 not in kept_after("inf-mllm", 8)
    assert {5, 40} <= kept_after("inf-mllm-lt", 8)
    assert kept_after("inf-mllm-lt", 64 * 12) - set(range(48, 64)) == {20, 40}


def test_inf_mllm_lt_without_decay_sums_attention_as_h2o_does() -> None:
    """long_term_half_life=-1: the long-term score is the sum of every step's attention, so slot 5,
    attended early and hard, outlasts slot 20's steady trickle however long the stream runs."""
    cache = _full_cache(64)
    policy = make_policy("inf-mllm-lt", retrieval_window=4, pool=1, attention_bias=0.0, stretch=0,
                         long_term_half_life=-1)
    policy.bind(cache)
    for _ in range(64):
        policy.observe(cache, _attention(64, {5: 20.0}, base=0.1), queries=1)
    early = policy.long_term[..., 5].clone()
    for _ in range(64 * 12):
        policy.observe(cache, _attention(64, {40: 20.0, 20: 1.0}, base=0.1), queries=1)
    assert torch.all(policy.long_term[..., 5] >= early)  # nothing decays
    # two slots beside the recent window: slot 5's early sum beats slot 20's trickle (with a
    # half-life of 64 queries the same stream keeps 20 and 40: the test above)
    assert _kept(policy, cache, 16 + 2) - set(range(48, 64)) == {5, 40}


def test_inf_mllm_lt_stretches_are_one_frame_unless_set(tiny_model_dir) -> None:
    from ros_infmllm.session import StreamingSession

    session = StreamingSession.from_pretrained(tiny_model_dir, policy="inf-mllm-lt", capacity=256, max_chunk=16)
    assert session.policy.stretch == len(session.frame_ids()) > 0
    assert make_policy("inf-mllm-lt", stretch=8).stretch == 8 and make_policy("inf-mllm-lt", stretch=0).stretch == 0
    assert make_policy("inf-mllm-lt").stretch == 64  # no session yet (or a text-only model)
