"""The inference worker's scheduling, on a stand-in session that records what it was given.

The session here is a test double (named so): scheduling is what is under test, and the real
session is exercised by the node tests."""
from __future__ import annotations

import threading
import time

import numpy as np

from ros_infmllm.ros.worker import InferenceWorker


class RecordingSessionDouble:
    """Records calls; frames take ``delay`` seconds so the worker can be caught busy."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.events: list[tuple[str, object]] = []
        self.gate = threading.Event()
        self.gate.set()

    def ingest_frame(self, rgb, stamp=None) -> None:
        self.gate.wait()
        time.sleep(self.delay)
        self.events.append(("frame", stamp))

    def ask(self, text: str):
        if not text:
            raise ValueError("query is empty")
        self.events.append(("query", text))
        yield "an "
        yield "answer"


def _frame() -> np.ndarray:
    return np.zeros((4, 4, 3), np.uint8)


def test_busy_worker_keeps_only_the_latest_frame_per_camera() -> None:
    session = RecordingSessionDouble()
    session.gate.clear()
    worker = InferenceWorker(session, lambda q, t: None, frame_rate=1000.0)
    worker.start()
    worker.submit_frame("cam", _frame(), 1.0)
    time.sleep(0.1)  # the worker is now blocked inside frame 1
    for stamp in (2.0, 3.0, 4.0):
        worker.submit_frame("cam", _frame(), stamp)
    session.gate.set()
    assert worker.wait_idle(5.0)
    worker.stop()
    assert [e for e in session.events if e[0] == "frame"] == [("frame", 1.0), ("frame", 4.0)]
    assert worker.counters.frames_dropped == 2 and worker.counters.frames_ingested == 2


def test_full_query_queue_refuses_at_once() -> None:
    session = RecordingSessionDouble()
    session.gate.clear()
    answers: list[str] = []
    worker = InferenceWorker(session, lambda q, t: answers.append(t), max_pending_queries=2, frame_rate=1000.0)
    worker.start()
    worker.submit_frame("cam", _frame(), 1.0)
    time.sleep(0.1)
    accepted = [worker.submit_query(f"q{i}") for i in range(5)]
    assert [a is not None for a in accepted] == [True, True, False, False, False]
    session.gate.set()
    assert worker.wait_idle(5.0)
    worker.stop()
    assert answers == ["an answer", "an answer"] and worker.counters.queries_refused == 3


def test_questions_go_after_earlier_frames_before_later_ones_and_errors_are_answered() -> None:
    session = RecordingSessionDouble()
    session.gate.clear()
    answers: list[str] = []
    worker = InferenceWorker(session, lambda q, t: answers.append(t), frame_rate=1000.0)
    worker.start()
    worker.submit_frame("cam", _frame(), 1.0)
    time.sleep(0.1)  # the worker is blocked inside frame 1
    worker.submit_frame("cam2", _frame(), 2.0)  # seen before the questions were asked: goes in first
    time.sleep(0.01)
    worker.submit_query("")
    worker.submit_query("what?")
    time.sleep(0.01)
    worker.submit_frame("cam3", _frame(), 3.0)  # arrived after them: waits for both answers
    session.gate.set()
    assert worker.wait_idle(5.0)
    worker.stop()
    assert session.events == [("frame", 1.0), ("frame", 2.0), ("query", "what?"), ("frame", 3.0)]
    assert answers == ["error: query is empty", "an answer"]


def test_frame_rate_caps_ingestion() -> None:
    session = RecordingSessionDouble()
    worker = InferenceWorker(session, lambda q, t: None, frame_rate=5.0)
    worker.start()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        worker.submit_frame("cam", _frame())
        time.sleep(0.005)
    worker.stop()
    assert 4 <= worker.counters.frames_ingested <= 7


def test_warm_up_runs_first_and_what_arrives_meanwhile_waits() -> None:
    session = RecordingSessionDouble()
    released = threading.Event()
    ready: list[tuple] = []

    def warm_up() -> float:
        session.events.append(("warm-up", None))
        released.wait(5.0)
        return 0.25

    answers: list[str] = []
    worker = InferenceWorker(session, lambda q, t: answers.append(t), frame_rate=1000.0, warm_up=warm_up,
                             on_ready=lambda seconds, error: ready.append((seconds, error)))
    worker.start()
    time.sleep(0.05)
    assert worker.state == "warming up"
    worker.submit_frame("cam", _frame(), 1.0)
    worker.submit_query("what?")
    time.sleep(0.05)
    assert session.events == [("warm-up", None)] and answers == []  # nothing runs during warm-up
    released.set()
    assert worker.wait_idle(5.0)
    worker.stop()
    assert worker.state == "ready" and worker.warm_up_s == 0.25 and ready == [(0.25, "")]
    assert session.events == [("warm-up", None), ("frame", 1.0), ("query", "what?")] and answers == ["an answer"]


def test_a_failed_warm_up_is_reported_and_the_worker_still_serves() -> None:
    session = RecordingSessionDouble()
    errors: list[str] = []
    ready: list[tuple] = []

    def warm_up() -> float:
        raise RuntimeError("CUDA out of memory")

    answers: list[str] = []
    worker = InferenceWorker(session, lambda q, t: answers.append(t), warm_up=warm_up, log_error=errors.append,
                             on_ready=lambda seconds, error: ready.append((seconds, error)))
    worker.start()
    worker.submit_query("what?")
    assert worker.wait_idle(5.0)
    worker.stop()
    assert worker.state == "ready" and answers == ["an answer"]
    assert errors == ["warm-up failed: CUDA out of memory"] and ready == [(None, "warm-up failed: CUDA out of memory")]
    assert worker.warm_up_error == "warm-up failed: CUDA out of memory"  # kept for the diagnostics


def test_a_question_keeps_the_frame_it_was_asked_about_when_newer_ones_arrive() -> None:
    """The worker is far behind: frames keep coming while a question waits. The frame that was
    unread when the question came goes in before the answer, newer ones after it."""
    session = RecordingSessionDouble()
    session.gate.clear()
    worker = InferenceWorker(session, lambda q, t: None, frame_rate=1000.0)
    worker.start()
    worker.submit_frame("cam", _frame(), 1.0)
    time.sleep(0.1)  # blocked inside frame 1
    worker.submit_frame("cam", _frame(), 2.0)
    worker.submit_query("what is in view?")  # asked while frame 2 was the newest
    for stamp in (3.0, 4.0):
        worker.submit_frame("cam", _frame(), stamp)  # frame 3 is replaced by frame 4 unread
    session.gate.set()
    assert worker.wait_idle(5.0)
    worker.stop()
    assert session.events == [("frame", 1.0), ("frame", 2.0), ("query", "what is in view?"), ("frame", 4.0)]
    assert worker.counters.frames_dropped == 1 and worker.counters.frames_ingested == 3


def _question_behind_a_streaming_camera(question_frame_age: float, pause: float) -> list[tuple[str, object]]:
    """Frame 1 is in the cache, frame 2 is being ingested, frame 3 is unread when the question
    comes ``pause`` seconds after frame 1 went in; returns the session's order of work."""
    session = RecordingSessionDouble()
    worker = InferenceWorker(session, lambda q, t: None, frame_rate=1000.0, question_frame_age=question_frame_age)
    worker.start()
    worker.submit_frame("cam", _frame(), 1.0)
    assert worker.wait_idle(5.0)
    session.gate.clear()
    worker.submit_frame("cam", _frame(), 2.0)
    time.sleep(pause)  # blocked inside frame 2
    worker.submit_frame("cam", _frame(), 3.0)
    worker.submit_query("what is in view?")
    session.gate.set()
    assert worker.wait_idle(5.0)
    worker.stop()
    return session.events


def test_a_question_does_not_wait_for_a_frame_of_a_camera_already_streaming_into_the_cache() -> None:
    """Frame 1 came moments ago, within question_frame_age: the question goes before unread frame 3."""
    events = _question_behind_a_streaming_camera(question_frame_age=10.0, pause=0.1)
    assert events == [("frame", 1.0), ("frame", 2.0), ("query", "what is in view?"), ("frame", 3.0)]


def test_a_question_takes_the_unread_frame_when_the_cache_is_older_than_question_frame_age() -> None:
    for age, pause in ((0.0, 0.1), (0.05, 0.2)):  # 0: always; else when frame 1 is older than the bound
        events = _question_behind_a_streaming_camera(question_frame_age=age, pause=pause)
        assert events == [("frame", 1.0), ("frame", 2.0), ("frame", 3.0), ("query", "what is in view?")], age
