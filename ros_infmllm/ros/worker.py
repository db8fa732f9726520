"""The inference worker: one thread owns the session; callbacks only hand work over.

Frames go into a one-slot "latest frame" mailbox per camera: a busy worker skips stale frames,
never queues them. Questions go into a bounded FIFO: a full queue refuses at once, so the
caller can answer "busy". Questions take priority over frames. An answer covers what each camera
showed at most ``question_frame_age`` seconds before the question: a camera whose last ingested
frame arrived longer ago than that (a low ``frame_rate``, a worker far behind) has its unread frame
taken with the question, and it goes in just before the answer (not held to ``frame_rate``; at most
one per camera per question). A camera streaming into the cache is not made to wait for: ingesting
one more frame would add a whole frame's ingest to the time to the first answer piece for a few
tens of milliseconds of freshness. ``question_frame_age`` = 0 takes every unread frame.
If given a warm-up, the worker runs it first (state "warming up"); frames and questions that
arrive meanwhile wait in the mailbox and the queue and are handled once it is "ready". A
question to a vision model before its first frame is answered "busy: no camera frame ..."
instead of letting the model guess. Failures (a bad frame, a CUDA out-of-memory error mid-step)
are answered ``error: ...``, counted and logged; the session has put the cache back as it was
before the failed step. No ROS here: the node wires callbacks to publishers, and the tests
drive this class directly too.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


NO_FRAME_YET = "busy: no camera frame has arrived yet; ask again once the camera streams"


def release_device_memory(exc: BaseException) -> None:
    """After a CUDA out-of-memory error, hand the allocator's cached blocks back, so the next step
    (which the session left with the cache as before the failed one) has room to run."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class WorkerCounters:
    """What diagnostics report. Latencies are in milliseconds; -1 until measured."""

    frames_received: int = 0
    frames_ingested: int = 0
    frames_dropped: int = 0
    frames_rejected: int = 0
    queries_received: int = 0
    queries_answered: int = 0
    queries_refused: int = 0
    queries_failed: int = 0
    last_ingest_ms: float = -1.0
    last_first_token_ms: float = -1.0
    last_answer_ms: float = -1.0
    last_frame_age_ms: float = -1.0  # camera stamp to ingest start, for frames with a stamp
    max_frame_age_ms: float = -1.0
    last_error: str = ""


@dataclass
class Query:
    id: int
    text: str
    received: float = field(default_factory=time.monotonic)
    # the unread frame of each camera when the question came: ingested before it is answered
    frames: dict[str, tuple[np.ndarray, float | None, float]] = field(default_factory=dict)


class InferenceWorker:
    """Runs ``session.ingest_frame`` and ``session.ask`` on its own thread.

    on_piece(query, piece) is called for each answer piece, on_answer(query, text) once per
    question (with an ``error: ...`` text when the question was refused by the session).
    """

    def __init__(self, session: Any, on_answer: Callable[[Query, str], None],
                 on_piece: Callable[[Query, str], None] | None = None, max_pending_queries: int = 4,
                 frame_rate: float = 1.0, log_error: Callable[[str], None] | None = None,
                 question_frame_age: float = 0.25,
                 warm_up: Callable[[], float] | None = None,
                 on_ready: Callable[[float | None, str], None] | None = None) -> None:
        self.session = session
        self.warm_up, self.on_ready = warm_up, on_ready
        self.state = "warming up" if warm_up is not None else "ready"
        self.warm_up_s: float | None = None
        self.warm_up_error = ""  # why warm-up failed, if it did (the stream then starts empty all the same)
        self.on_answer, self.on_piece = on_answer, on_piece
        self.log_error = log_error or (lambda text: None)
        self.max_pending_queries = max_pending_queries
        self.frame_rate = frame_rate
        self.question_frame_age = question_frame_age
        self._ingested_received: dict[str, float] = {}  # per camera: when its last ingested frame came
        self.counters = WorkerCounters()
        self._frames: dict[str, tuple[np.ndarray, float | None, float]] = {}  # rgb, stamp, received
        self._queries: collections.deque[Query] = collections.deque()
        self._ids = itertools.count(1)
        self._order: list[str] = []
        self._next_camera = 0
        self._last_ingest = float("-inf")
        self._wake = threading.Condition()
        self._stop = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="infmllm-worker", daemon=True)

    # ---- called from ROS callbacks (any thread): never block on inference -------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit_frame(self, camera: str, rgb: np.ndarray, stamp: float | None = None) -> None:
        """Put the newest frame of a camera in its mailbox (an unread older one is dropped)."""
        with self._wake:
            self.counters.frames_received += 1
            if camera in self._frames:
                self.counters.frames_dropped += 1
            elif camera not in self._order:
                self._order.append(camera)
            self._frames[camera] = (rgb, stamp, time.monotonic())
            self._wake.notify()

    def reject_frame(self, reason: str) -> None:
        """Count a frame the node could not convert."""
        with self._wake:
            self.counters.frames_received += 1
            self.counters.frames_rejected += 1
            self.counters.last_error = reason

    def submit_query(self, text: str) -> Query | None:
        """Queue a question; None if the queue is full (the caller answers busy)."""
        with self._wake:
            self.counters.queries_received += 1
            if len(self._queries) >= self.max_pending_queries:
                self.counters.queries_refused += 1
                return None
            now = time.monotonic()
            stale = {camera: frame for camera, frame in self._frames.items()
                     if now - self._ingested_received.get(camera, float("-inf")) > self.question_frame_age}
            for camera in stale:  # these go in before the answer; fresher cameras keep their turn
                del self._frames[camera]
            query = Query(next(self._ids), text, frames=stale)
            self._queries.append(query)
            self._wake.notify()
            return query

    @property
    def pending_queries(self) -> int:
        with self._wake:
            return len(self._queries)

    @property
    def busy(self) -> bool:
        return self._busy

    def wait_idle(self, timeout: float) -> bool:
        """Block until no question or frame is waiting and nothing runs (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._wake:
                if not self._queries and not self._frames and not self._busy and self.state == "ready":
                    return True
            time.sleep(0.01)
        return False

    # ---- the worker thread -----------------------------------------------------------------
    def _next_job(self) -> tuple[str, Any] | None:
        """Called with the lock held: a question first (with the frames it holds), else a frame if
        the rate allows, else None."""
        if self._queries:
            return "query", self._queries.popleft()
        if self._frames and time.monotonic() - self._last_ingest >= 1.0 / self.frame_rate:
            for _ in range(len(self._order)):
                camera = self._order[self._next_camera % len(self._order)]
                self._next_camera += 1
                if camera in self._frames:
                    return "frame", (camera, self._frames.pop(camera))
        return None

    def _wait_time(self) -> float | None:
        if self._frames:
            return max(0.0, self._last_ingest + 1.0 / self.frame_rate - time.monotonic())
        return None

    def _warm_up(self) -> None:
        """Run the warm-up (if any), then become ready; a failed warm-up is reported, not fatal."""
        error = ""
        if self.warm_up is not None:
            try:
                self.warm_up_s = self.warm_up()
            except Exception as exc:  # e.g. out of memory: the stream may still run, eagerly
                error = f"warm-up failed: {exc}"
                self.warm_up_error = error
                self.counters.last_error = error
                self.log_error(error)
        with self._wake:
            self.state = "ready"
        if self.on_ready is not None:
            self.on_ready(self.warm_up_s, error)

    def _run(self) -> None:
        self._warm_up()
        while True:
            with self._wake:
                job = self._next_job()
                while job is None and not self._stop:
                    self._wake.wait(self._wait_time())
                    job = self._next_job()
                if self._stop:
                    return
                self._busy = True
            try:
                if job[0] == "query":
                    self._answer(job[1])
                else:
                    self._ingest(*job[1])
            finally:
                self._busy = False

    def _ingest(self, camera: str, frame: tuple[np.ndarray, float | None, float]) -> None:
        started = time.monotonic()
        self._last_ingest = started
        if frame[1]:  # the camera's stamp (wall clock): how old the frame is as it goes in
            age = (time.time() - frame[1]) * 1000
            self.counters.last_frame_age_ms = age
            self.counters.max_frame_age_ms = max(self.counters.max_frame_age_ms, age)
        try:
            self.session.ingest_frame(frame[0], frame[1])
        except Exception as exc:  # a bad frame or a full cache must not kill the worker
            release_device_memory(exc)
            self.counters.frames_rejected += 1
            self.counters.last_error = f"frame from {camera} not ingested: {exc}"
            self.log_error(self.counters.last_error)
            return
        self.counters.frames_ingested += 1
        with self._wake:
            self._ingested_received[camera] = frame[2]
        self.counters.last_ingest_ms = (time.monotonic() - started) * 1000

    def _answer(self, query: Query) -> None:
        for camera, frame in query.frames.items():  # what the cameras showed when it was asked
            self._ingest(camera, frame)
        started = time.monotonic()
        pieces: list[str] = []
        if getattr(self.session, "awaiting_first_frame", False):
            self.counters.queries_refused += 1
            self.on_answer(query, NO_FRAME_YET)
            return
        try:
            for piece in self.session.ask(query.text):
                if not pieces:
                    self.counters.last_first_token_ms = (time.monotonic() - started) * 1000
                pieces.append(piece)
                if self.on_piece:
                    self.on_piece(query, piece)
        except Exception as exc:  # refused question (empty, too long) or a failure mid-answer
            release_device_memory(exc)
            self.counters.queries_failed += 1
            self.counters.last_error = f"query {query.id} failed: {exc}"
            self.log_error(self.counters.last_error)
            self.on_answer(query, f"error: {exc}")
            return
        self.counters.queries_answered += 1
        self.counters.last_answer_ms = (time.monotonic() - started) * 1000
        self.on_answer(query, "".join(pieces).strip())
