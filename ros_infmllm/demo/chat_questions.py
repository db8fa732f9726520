"""Questions in plain English about a busy-table stream, with exact one-sentence answers: what the
demo VLM (SmolLM2 + a trained vision tower) is trained and evaluated on.

Current-scene questions look at the last frame. Memory questions look at the whole stream: the
order of first sightings, whether something was seen at all, which of two came first, how many
different things were seen, and which thing left the table last. Answers are the sentences the
model is trained to say; `judge` is the rule that scores a reply against one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .questions import QA, History, pick_seen_or_not, pick_unique_shape
from .world import Scene

CHAT_CURRENT_TYPES = ("in_view", "colour", "count", "position")
CHAT_MEMORY_TYPES = ("first_seen", "did_you_see", "before", "which_first", "count_seen", "last_left")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "centre": "in the centre", "top left": "at the top left", "top right": "at the top right",
                 "bottom left": "at the bottom left", "bottom right": "at the bottom right"}


def number(count: int) -> str:
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def listing(names: list[str]) -> str:
    """'a red circle', 'a red circle and a blue star', 'a red circle, a blue star and a green square'."""
    items = [f"a {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class StreamHistory(History):
    """What happened so far: first sightings in order (History), and what left the table, in order."""

    left: list[tuple[str, str]] = field(default_factory=list)
    _last: Scene | None = None

    def observe(self, scene: Scene) -> None:
        super().observe(scene)
        if self._last is not None:
            now = {(t.shape, t.colour) for t in scene.things}
            self.left += [(t.shape, t.colour) for t in self._last.ordered() if (t.shape, t.colour) not in now]
        self._last = scene


def _name(key: tuple[str, str]) -> str:
    shape, colour = key
    return f"{colour} {shape}"


def chat_current_question(kind: str, scene: Scene, rng: np.random.Generator) -> QA | None:
    """A question about ``scene``; None when this kind has no well-posed question for it."""
    things = scene.ordered()
    if kind == "in_view":
        answer = f"I see {listing([t.name for t in things])}." if things else "The table is empty."
        return QA(kind, "What do you see on the table?", answer)
    if kind == "count":
        count = len(things)
        answer = ("There are no objects on the table." if count == 0 else
                  "There is one object on the table." if count == 1 else f"There are {number(count)} objects on the table.")
        return QA(kind, "How many objects are on the table?", answer)
    if kind == "colour":
        thing = pick_unique_shape(things, rng)
        return None if thing is None else QA(kind, f"What colour is the {thing.shape}?",
                                             f"The {thing.shape} is {thing.colour}.")
    if kind == "position":
        if not things:
            return None
        thing = things[rng.integers(len(things))]
        return QA(kind, f"Where is the {thing.name}?", f"The {thing.name} is {PLACE_PHRASES[thing.position]}.")
    raise ValueError(f"unknown question kind {kind!r}")


def chat_memory_question(kind: str, history: StreamHistory, rng: np.random.Generator) -> QA | None:
    """A question about everything seen so far; None when this kind has none for this history."""
    seen = history.first_seen
    if kind == "first_seen":
        if not seen:
            return None
        return QA(kind, "What was the first object you saw?", f"The first object I saw was a {_name(seen[0])}.")
    if kind == "did_you_see":
        key, was_seen = pick_seen_or_not(seen, rng)
        answer = f"Yes, I have seen a {_name(key)}." if was_seen else f"No, I have not seen a {_name(key)}."
        return QA(kind, f"Have you seen a {_name(key)}?", answer)
    if kind == "before":
        if len(seen) < 2:
            return None
        i = int(rng.integers(1, len(seen)))
        return QA(kind, f"What did you see just before the {_name(seen[i])}?",
                  f"Just before the {_name(seen[i])} I saw a {_name(seen[i - 1])}.")
    if kind == "which_first":
        if len(seen) < 2:
            return None
        i, j = sorted(rng.choice(len(seen), 2, replace=False).tolist())
        a, b = (seen[i], seen[j]) if rng.random() < 0.5 else (seen[j], seen[i])
        return QA(kind, f"Which did you see first, the {_name(a)} or the {_name(b)}?",
                  f"I saw the {_name(seen[i])} first.")
    if kind == "count_seen":
        if not seen:
            return None
        count = len(seen)
        answer = "I have seen one object." if count == 1 else f"I have seen {number(count)} different objects."
        return QA(kind, "How many different objects have you seen?", answer)
    if kind == "last_left":
        if not history.left:
            return None
        return QA(kind, "What was the last object to leave the table?",
                  f"The last object to leave was the {_name(history.left[-1])}.")
    raise ValueError(f"unknown question kind {kind!r}")


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def judge(reply: str, answer: str) -> bool:
    """The scoring rule: a reply is right when it is the reference sentence, up to case,
    punctuation and spacing (so 'I see a red circle' == 'I see a red circle.')."""
    return normalise(reply) == normalise(answer)
