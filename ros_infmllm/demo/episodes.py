"""Training and evaluation episodes: a stream of frames with questions and answers between them,
laid out exactly as the session's ``demo`` template writes them into the cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .chat_questions import (CHAT_CURRENT_TYPES, CHAT_MEMORY_TYPES, StreamHistory, chat_current_question,
                             chat_memory_question)
from .questions import CURRENT_TYPES, MEMORY_TYPES, QA, History, current_question, memory_question
from .world import BUSY_TABLE, TABLE, WorldSpec, scene_stream

# The demo template (ros_infmllm.session.templates.PRESETS["demo"]) as token strings.
FRAME_MARK, QUERY_MARK, ANSWER_MARK, EOS, IMAGE, PAD, UNK = "<frame>", "<q>", "<a>", "<eos>", "<image>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, UNK, EOS, IMAGE, FRAME_MARK, QUERY_MARK, ANSWER_MARK)


@dataclass(frozen=True)
class QuestionSet:
    """A world and the questions asked about it: the tiny model's terse set or the VLM's chat set."""

    world: WorldSpec
    current_types: tuple[str, ...]
    memory_types: tuple[str, ...]
    current: Callable[[str, Any, np.random.Generator], QA | None]
    memory: Callable[[str, Any, np.random.Generator], QA | None]
    history: Callable[[], Any]
    frame_size: int


TERSE = QuestionSet(TABLE, CURRENT_TYPES, MEMORY_TYPES, current_question, memory_question, History, 64)
CHAT = QuestionSet(BUSY_TABLE, CHAT_CURRENT_TYPES, CHAT_MEMORY_TYPES, chat_current_question, chat_memory_question,
                   StreamHistory, 128)


@dataclass
class Episode:
    """Frames (HxWx3 uint8) and events in stream order: ("frame", index) or ("qa", QA)."""

    frames: list[np.ndarray]
    events: list[tuple[str, object]]
    labels: list[np.ndarray] | None = None  # per-pixel thing classes of each frame, if asked for


def make_episode(seed: int, frames: int, question_rate: float = 0.35, memory_share: float = 0.35,
                 size: int | None = None, questions: QuestionSet = TERSE, with_labels: bool = False) -> Episode:
    """A seeded stream of ``frames`` frames with questions after random frames, and one at the end."""
    rng = np.random.default_rng(seed + 1_000_003)
    per_scene = int(rng.integers(1, 4))
    size = size or questions.frame_size
    stream = list(scene_stream(seed, (frames + per_scene - 1) // per_scene, per_scene, size, size,
                               questions.world, with_labels))[:frames]
    history = questions.history()
    images, events = [], []
    for i, frame in enumerate(stream):
        images.append(frame.image)
        events.append(("frame", i))
        history.observe(frame.scene)
        if rng.random() < question_rate or i == len(stream) - 1:
            qa = None
            for _ in range(4):  # some kinds have no question for some scenes
                if rng.random() < memory_share:
                    kinds = questions.memory_types
                    qa = questions.memory(kinds[rng.integers(len(kinds))], history, rng)
                else:
                    kinds = questions.current_types
                    qa = questions.current(kinds[rng.integers(len(kinds))], frame.scene, rng)
                if qa is not None:
                    break
            if qa is not None:
                events.append(("qa", qa))
    return Episode(images, events, [f.labels for f in stream] if with_labels else None)


def episode_words(episode: Episode, image_tokens: int) -> tuple[list[str], list[bool]]:
    """Token strings of the episode and, per token, whether it is an answer token (trained on)."""
    words: list[str] = []
    target: list[bool] = []
    for kind, item in episode.events:
        if kind == "frame":
            block = [FRAME_MARK] + [IMAGE] * image_tokens
            words += block
            target += [False] * len(block)
        else:
            qa: QA = item
            prompt = [QUERY_MARK] + qa.question.split() + [ANSWER_MARK]
            answer = qa.answer.split() + [EOS]
            words += prompt + answer
            target += [False] * len(prompt) + [True] * len(answer)
    return words, target


def episode_ids(episode: Episode, tokenizer, template, image_token: int, image_tokens: int,
                system: str) -> tuple[list[int], list[bool], list[str]]:
    """The token ids a ``StreamingSession`` with ``template`` writes for the episode (system prompt,
    frames, questions, then each answer followed by its stop token, as a greedy answer that
    stopped leaves it in the cache), whether each id is an answer token (trained on), and the
    question kind of each answer in order."""
    from ..session.templates import template_ids

    stop = tokenizer.token_to_id(template.stop[0])
    ids = template_ids(tokenizer, template.system.replace("{system}", system))
    target = [False] * len(ids)
    frame = template_ids(tokenizer, template.frame, image_token, image_tokens)
    kinds = []
    for kind, item in episode.events:
        if kind == "frame":
            block, answer = frame, []
        else:
            block = template_ids(tokenizer, template.query.replace("{query}", item.question))
            answer = tokenizer.encode(item.answer, add_special_tokens=False).ids + [stop]
            kinds.append(item.kind)
        ids += block + answer
        target += [False] * len(block) + [True] * len(answer)
    return ids, target, kinds
