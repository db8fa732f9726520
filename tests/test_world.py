"""The synthetic world and its questions: seeded, consistent with the ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from ros_infmllm.demo.questions import (CURRENT_TYPES, History, current_question, describe, memory_question,
                                        vocabulary)
from ros_infmllm.demo.world import COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, Scene, Thing, render, scene_stream


def test_world_has_the_required_variety() -> None:
    assert len(SHAPES) >= 5 and len(COLOURS) >= 6
    assert set(POSITIONS) == {"left", "right", "top", "bottom", "centre"}


def test_streams_are_seeded_and_change_over_time() -> None:
    a = list(scene_stream(7, 30, 2))
    b = list(scene_stream(7, 30, 2))
    assert all(np.array_equal(x.image, y.image) and x.scene == y.scene for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, list(scene_stream(8, 1))[0].image)
    events = {f.event for f in a}
    assert {"enter", "leave", "move"} <= events
    for frame in a:
        assert len(frame.scene.things) <= MAX_OBJECTS
        assert len({t.position for t in frame.scene.things}) == len(frame.scene.things)
        assert frame.image.shape == (64, 64, 3) and frame.image.dtype == np.uint8


def test_render_puts_the_colour_where_the_position_says() -> None:
    rng = np.random.default_rng(0)
    image = render(Scene((Thing("square", "blue", "left"),)), rng, 96, 96).astype(int)
    blue = (image[..., 2] - image[..., 0] > 80)
    ys, xs = np.nonzero(blue)
    assert xs.mean() < 96 * 0.35 and abs(ys.mean() - 48) < 10


def test_current_questions_answer_from_the_scene() -> None:
    rng = np.random.default_rng(0)
    scene = Scene((Thing("star", "yellow", "right"), Thing("circle", "red", "left")))
    assert current_question("in_view", scene, rng).answer == "a red circle and a yellow star"
    assert current_question("count", scene, rng).answer == "two"
    colour = current_question("colour", scene, rng)
    assert colour.answer == {"star": "yellow", "circle": "red"}[colour.question.split()[-2]]
    position = current_question("position", scene, rng)
    assert position.answer == {"yellow star": "right", "red circle": "left"}[" ".join(position.question.split()[3:5])]
    assert current_question("in_view", Scene(), rng).answer == "nothing"
    assert current_question("position", Scene(), rng) is None


def test_memory_questions_answer_from_the_history() -> None:
    history = History()
    history.observe(Scene((Thing("star", "yellow", "right"),)))
    history.observe(Scene((Thing("circle", "red", "left"), Thing("star", "yellow", "right"))))
    rng = np.random.default_rng(1)
    assert memory_question("first_seen", history, rng).answer == "a yellow star"
    before = memory_question("before", history, rng)
    assert before.question == "what did you see before the red circle ?" and before.answer == "a yellow star"
    for _ in range(20):
        qa = memory_question("did_you_see", history, rng)
        seen = any(f"{c} {s}" in qa.question for s, c in history.first_seen)
        assert qa.answer == ("yes" if seen else "no")


@pytest.mark.parametrize("kind", CURRENT_TYPES)
def test_every_question_and_answer_word_is_in_the_vocabulary(kind: str) -> None:
    words = set(vocabulary())
    rng = np.random.default_rng(2)
    history = History()
    for frame in scene_stream(3, 40):
        history.observe(frame.scene)
        for qa in (current_question(kind, frame.scene, rng), memory_question("before", history, rng),
                   memory_question("did_you_see", history, rng), memory_question("first_seen", history, rng)):
            if qa is not None:
                assert set(qa.question.split()) | set(qa.answer.split()) <= words
    assert describe([]) == "nothing"
