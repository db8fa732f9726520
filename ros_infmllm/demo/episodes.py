"""Training and evaluation episodes: a stream of frames with questions and answers between them,
laid out exactly as the session's ``demo`` template writes them into the cache."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .questions import CURRENT_TYPES, MEMORY_TYPES, QA, History, current_question, memory_question
from .world import scene_stream

# The demo template (ros_infmllm.session.templates.PRESETS["demo"]) as token strings.
FRAME_MARK, QUERY_MARK, ANSWER_MARK, EOS, IMAGE, PAD, UNK = "<frame>", "<q>", "<a>", "<eos>", "<image>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, UNK, EOS, IMAGE, FRAME_MARK, QUERY_MARK, ANSWER_MARK)


@dataclass
class Episode:
    """Frames (HxWx3 uint8) and events in stream order: ("frame", index) or ("qa", QA)."""

    frames: list[np.ndarray]
    events: list[tuple[str, object]]


def make_episode(seed: int, frames: int, question_rate: float = 0.35, memory_share: float = 0.35,
                 size: int = 64) -> Episode:
    """A seeded stream of ``frames`` frames with questions after random frames, and one at the end."""
    rng = np.random.default_rng(seed + 1_000_003)
    per_scene = int(rng.integers(1, 4))
    stream = list(scene_stream(seed, (frames + per_scene - 1) // per_scene, per_scene, size, size))[:frames]
    history = History()
    images, events = [], []
    for i, frame in enumerate(stream):
        images.append(frame.image)
        events.append(("frame", i))
        history.observe(frame.scene)
        if rng.random() < question_rate or i == len(stream) - 1:
            qa = None
            for _ in range(4):  # some kinds have no question for some scenes
                if rng.random() < memory_share:
                    qa = memory_question(MEMORY_TYPES[rng.integers(len(MEMORY_TYPES))], history, rng)
                else:
                    qa = current_question(CURRENT_TYPES[rng.integers(len(CURRENT_TYPES))], frame.scene, rng)
                if qa is not None:
                    break
            if qa is not None:
                events.append(("qa", qa))
    return Episode(images, events)


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
