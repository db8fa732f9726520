"""Questions about a synthetic stream, with exact answers from its ground truth.

Current-scene questions (what is in view, colour of a named shape, count, position) look at the
last scene; memory questions (first object seen, did you see X, what came before X) look at the
whole stream's history of first sightings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .world import COLOURS, POSITIONS, SHAPES, Scene, Thing

NUMBERS = ("zero", "one", "two", "three")
CURRENT_TYPES = ("in_view", "colour", "count", "position")
MEMORY_TYPES = ("first_seen", "did_you_see", "before")


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str

    @property
    def is_memory(self) -> bool:
        return self.kind in MEMORY_TYPES


def describe(things: list[Thing]) -> str:
    """'nothing', 'a red circle', 'a red circle and a blue star', 'a red circle , a blue star and ...'."""
    names = [f"a {t.name}" for t in things]
    if not names:
        return "nothing"
    if len(names) == 1:
        return names[0]
    return " , ".join(names[:-1]) + " and " + names[-1]


@dataclass
class History:
    """First sightings of each (shape, colour) in stream order."""

    first_seen: list[tuple[str, str]] = field(default_factory=list)

    def observe(self, scene: Scene) -> None:
        for thing in scene.ordered():
            key = (thing.shape, thing.colour)
            if key not in self.first_seen:
                self.first_seen.append(key)


def pick_unique_shape(things: list[Thing], rng: np.random.Generator) -> Thing | None:
    """A thing whose shape no other thing in view has (so "the star" names it), or None."""
    shapes = [t.shape for t in things]
    unique = [t for t in things if shapes.count(t.shape) == 1]
    return unique[rng.integers(len(unique))] if unique else None


def pick_seen_or_not(seen: list[tuple[str, str]], rng: np.random.Generator) -> tuple[tuple[str, str], bool]:
    """Half the time (when anything was seen) a (shape, colour) seen so far, else one never seen."""
    if seen and rng.random() < 0.5:
        return seen[rng.integers(len(seen))], True
    unseen = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in seen]
    return unseen[rng.integers(len(unseen))], False


def current_question(kind: str, scene: Scene, rng: np.random.Generator) -> QA | None:
    """A question about ``scene``; None when this kind has no well-posed question for it."""
    things = scene.ordered()
    if kind == "in_view":
        return QA(kind, "what is in view ?", describe(things))
    if kind == "count":
        return QA(kind, "how many objects are there ?", NUMBERS[len(things)])
    if kind == "colour":
        thing = pick_unique_shape(things, rng)
        return None if thing is None else QA(kind, f"what colour is the {thing.shape} ?", thing.colour)
    if kind == "position":
        if not things:
            return None
        thing = things[rng.integers(len(things))]
        return QA(kind, f"where is the {thing.name} ?", thing.position)
    raise ValueError(f"unknown question kind {kind!r}")


def memory_question(kind: str, history: History, rng: np.random.Generator) -> QA | None:
    """A question about everything seen so far."""
    seen = history.first_seen
    if kind == "first_seen":
        if not seen:
            return None
        shape, colour = seen[0]
        return QA(kind, "what was the first object you saw ?", f"a {colour} {shape}")
    if kind == "did_you_see":
        (shape, colour), was_seen = pick_seen_or_not(seen, rng)
        return QA(kind, f"did you see a {colour} {shape} ?", "yes" if was_seen else "no")
    if kind == "before":
        if len(seen) < 2:
            return None
        i = int(rng.integers(1, len(seen)))
        shape, colour = seen[i]
        before_shape, before_colour = seen[i - 1]
        return QA(kind, f"what did you see before the {colour} {shape} ?", f"a {before_colour} {before_shape}")
    raise ValueError(f"unknown question kind {kind!r}")


def vocabulary() -> list[str]:
    """Every word a question or answer can use (the demo tokenizer's vocabulary)."""
    words = set()
    words.update(SHAPES, COLOURS, POSITIONS, NUMBERS)
    for text in ("what is in view ?", "how many objects are there ?", "what colour is the", "where is the",
                 "what was the first object you saw ?", "did you see a", "what did you see before the",
                 "yes no nothing a and ,"):
        words.update(text.split())
    return sorted(words)
