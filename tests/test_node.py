"""The infmllm node with real rclpy and DDS: in-process driving, malformed input, parameters."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from ros_infmllm.export import export_onnx
from ros_infmllm.ros.conversion import rgb_to_image_fields
from ros_infmllm.ros.entry import spinning
from ros_infmllm.ros.node import InfMLLMNode
from ros_infmllm.ros.worker import NO_FRAME_YET

RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


class Probe:
    """A test node that publishes frames and questions and collects what the node publishes."""

    def __init__(self, namespace: str = "/infmllm") -> None:
        self.node = rclpy.create_node("probe")
        self.answers: list[str] = []
        self.pieces: list[str] = []
        self.diagnostics: list[DiagnosticArray] = []
        self.node.create_subscription(String, f"{namespace}/answer", lambda m: self.answers.append(m.data), RELIABLE)
        self.node.create_subscription(String, f"{namespace}/answer_stream", lambda m: self.pieces.append(m.data),
                                      RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.images = self.node.create_publisher(Image, "/camera/image_raw", RELIABLE)
        self.compressed = self.node.create_publisher(CompressedImage, "/camera/image_raw/compressed", RELIABLE)
        self.queries = self.node.create_publisher(String, f"{namespace}/query", RELIABLE)

    def ask(self, text: str) -> None:
        self.queries.publish(String(data=text))

    def wait_answers(self, count: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.answers) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.answers) >= count, f"only {len(self.answers)} of {count} answers: {self.answers}"
        return self.answers


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)


@pytest.fixture()
def running(ros_context, tiny_model_dir: Path):
    """The node (tiny random model) and a probe, spun by one executor in a background thread."""
    overrides = [Parameter("model_path", value=str(tiny_model_dir)), Parameter("capacity", value=256),
                 Parameter("max_chunk", value=32), Parameter("template", value="demo"),
                 Parameter("frame_rate", value=100.0), Parameter("max_new_tokens", value=4),
                 Parameter("max_query_chars", value=1000), Parameter("diagnostics_period", value=0.2),
                 Parameter("image_topics", value=["/camera/image_raw", "/camera/image_raw/compressed"])]
    node = InfMLLMNode(parameter_overrides=overrides)
    probe = Probe()
    with spinning(node, probe.node, executor=MultiThreadedExecutor()):
        deadline = time.monotonic() + 10
        while node.count_subscribers("/infmllm/answer") == 0 or probe.queries.get_subscription_count() == 0:
            assert time.monotonic() < deadline, "DDS discovery did not complete"
            time.sleep(0.05)
        yield node, probe
    node.destroy_node()
    probe.node.destroy_node()


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_frames_in_answers_out(running) -> None:
    node, probe = running
    for i, encoding in enumerate(["rgb8", "bgr8", "mono8", "rgba8", "bgra8"]):
        probe.images.publish(Image(**rgb_to_image_fields(_rgb(i), encoding)))
        _wait(lambda: node.worker.counters.frames_ingested >= i + 1)
    ok, jpeg = cv2.imencode(".jpg", _rgb(9))
    probe.compressed.publish(CompressedImage(format="jpeg", data=jpeg.tobytes()))
    _wait(lambda: node.worker.counters.frames_ingested >= 6)
    probe.ask("what is in view ?")
    answer = probe.wait_answers(1)[0]
    assert answer and not answer.startswith(("error", "busy"))
    _wait(lambda: "" in probe.pieces)
    assert "".join(probe.pieces).strip() == answer  # the streamed pieces make up the answer
    _wait(lambda: any(float(kv.value) > 0 for d in probe.diagnostics for s in d.status for kv in s.values
                      if kv.key == "queries_answered"))
    values = {kv.key: kv.value for kv in probe.diagnostics[-1].status[0].values}
    assert int(values["frames_ingested"]) == 6 and int(values["cache_fill"]) > 0
    assert int(values["cache_capacity"]) == 256
    assert values["state"] == "ready" and float(values["warm_up_s"]) > 0  # warm-up is on by default
    assert (values["held_weights"], values["held_lm_head_weights"], values["held_embedding_weights"]) == \
        ("float", "float", "float")  # what the load chose, reported


def test_malformed_input_is_refused_and_the_node_keeps_answering(running) -> None:
    node, probe = running
    probe.images.publish(Image(**rgb_to_image_fields(_rgb(0))))
    _wait(lambda: node.worker.counters.frames_ingested == 1)
    cache = node.session.cache
    before = (cache.length, cache.total_seen)
    bad_images = [
        Image(height=30, width=40, encoding="rgb8", step=60, data=bytes(30 * 120)),     # step < width*channels
        Image(height=30, width=40, encoding="rgb8", step=120, data=bytes(100)),         # data < height*step
        Image(height=0, width=0, encoding="rgb8", step=0, data=b""),                   # zero size
        Image(height=20000, width=20000, encoding="rgb8", step=60000, data=bytes(16)),  # huge header, tiny data
        Image(height=30, width=40, encoding="yuv422", step=80, data=bytes(2400)),       # unknown encoding
    ]
    for msg in bad_images:
        probe.images.publish(msg)
    probe.compressed.publish(CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0 not really a jpeg"))
    _wait(lambda: node.worker.counters.frames_rejected == 6)
    assert (cache.length, cache.total_seen) == before  # nothing in the cache was lost or added
    probe.ask("")
    probe.ask("x" * 1_000_000)
    probe.ask("what is in view ?")
    answers = probe.wait_answers(3)
    assert answers[0] == "error: query is empty"
    assert answers[1].startswith("error: query has 1000000 characters")
    assert not answers[2].startswith(("error", "busy"))
    assert node.worker.counters.last_error


def test_query_flood_beyond_the_queue_is_answered_busy(running) -> None:
    node, probe = running
    probe.images.publish(Image(**rgb_to_image_fields(_rgb(0))))
    _wait(lambda: node.worker.counters.frames_ingested == 1)
    node.set_parameters([Parameter("max_pending_queries", value=1)])
    for i in range(25):
        probe.ask(f"what is in view ? {i}")
    answers = probe.wait_answers(25)
    busy = [a for a in answers if a.startswith("busy")]
    assert busy and len(busy) < 25
    assert node.worker.counters.queries_refused == len(busy)
    probe.ask("what is in view ?")
    assert not probe.wait_answers(26)[-1].startswith(("busy", "error"))


def test_runtime_parameters_are_validated(running) -> None:
    node, _ = running
    assert node.set_parameters([Parameter("frame_rate", value=2.5)])[0].successful
    assert node.worker.frame_rate == 2.5
    result = node.set_parameters([Parameter("frame_rate", value=-1.0)])[0]
    assert not result.successful
    assert not node.set_parameters([Parameter("capacity", value=128)])[0].successful  # read-only
    assert node.set_parameters([Parameter("max_new_tokens", value=2)])[0].successful
    assert node.session.config.max_new_tokens == 2


def test_a_node_with_an_int8_cache_answers(ros_context, tiny_model_dir: Path) -> None:
    """``kv_cache_dtype: int8`` reaches the session: the cache holds int8 codes, frames go in and a
    question over DDS is answered."""
    overrides = [Parameter("model_path", value=str(tiny_model_dir)), Parameter("capacity", value=96),
                 Parameter("max_chunk", value=32), Parameter("template", value="demo"),
                 Parameter("frame_rate", value=100.0), Parameter("max_new_tokens", value=4),
                 Parameter("kv_cache_dtype", value="int8"), Parameter("warm_up", value=False)]
    node = InfMLLMNode(parameter_overrides=overrides)
    probe = Probe()
    try:
        assert node.session.cache.k.dtype == torch.int8 and node.session.cache.quantized
        with spinning(node, probe.node, executor=MultiThreadedExecutor()):
            _wait(lambda: probe.images.get_subscription_count() > 0 and probe.queries.get_subscription_count() > 0)
            for i in range(40):  # past the 96-slot capacity: evictions move int8 rows
                probe.images.publish(Image(**rgb_to_image_fields(_rgb(i), "rgb8")))
                _wait(lambda: node.worker.counters.frames_ingested >= i + 1)
                if node.session.cache.evictions > 1:
                    break
            assert node.session.cache.evictions > 1
            probe.ask("what is in view ?")
            answer = probe.wait_answers(1)[0]
            assert answer and not answer.startswith(("error", "busy"))
    finally:
        node.destroy_node()
        probe.node.destroy_node()


@pytest.mark.parametrize("args, message", [
    (["-p", "policy:=lru"], "parameter policy='lru' is not one of"),
    (["-p", "inf_mllm.pool:=4"], "must be odd"),
    (["-p", "kv_cache_dtype:=fp8"], "parameter kv_cache_dtype='fp8' is not one of model, int8"),
    (["-p", "model_path:=/nonexistent/model"], "model folder not found"),
    (["-p", "backend:=onnxruntime"], "backend onnxruntime needs engine_dir"),
    (["-p", "backend:=onnxruntime", "-p", "engine_dir:=/nonexistent/engines"], "no manifest"),
    (["-p", "backend:=tensorrt", "-p", "engine_dir:=ENGINES"], "no engine for graph"),
])
def test_bad_configuration_exits_non_zero_with_a_clear_message(tiny_model_dir: Path, tmp_path: Path,
                                                                args: list[str], message: str) -> None:
    base = ["-p", f"model_path:={tiny_model_dir}"] if "model_path" not in args[1] else []
    if "engine_dir:=ENGINES" in args:  # an ONNX-only export of this model: no engines in it
        export_onnx(tiny_model_dir, tmp_path, capacity=256, max_chunk=32)
        args = [a.replace("ENGINES", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", "ros_infmllm.ros.node", "--ros-args", *base, *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr + result.stdout


def test_a_question_before_any_frame_is_answered_busy_then_answered_after_one(running) -> None:
    node, probe = running
    probe.ask("what is in view ?")
    assert probe.wait_answers(1)[0] == NO_FRAME_YET
    probe.images.publish(Image(**rgb_to_image_fields(_rgb(1))))
    _wait(lambda: node.worker.counters.frames_ingested == 1)
    probe.ask("what is in view ?")
    assert not probe.wait_answers(2)[1].startswith(("busy", "error"))


def test_an_out_of_memory_step_is_answered_error_and_the_cache_is_kept(running) -> None:
    """A fault injected into the backend (a CUDA out-of-memory error raised on the CPU, where no
    real one can happen) fails one question; the next one is answered from the same cache."""
    node, probe = running
    probe.images.publish(Image(**rgb_to_image_fields(_rgb(2))))
    _wait(lambda: node.worker.counters.frames_ingested == 1)
    cache = node.session.cache
    before = (cache.length, cache.total_seen, cache.k.clone())
    backend, real_step = node.session.backend, node.session.backend.step

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    backend.step = out_of_memory
    try:
        probe.ask("what is in view ?")
        answer = probe.wait_answers(1)[0]
    finally:
        backend.step = real_step
    assert answer.startswith("error: CUDA out of memory")
    assert (cache.length, cache.total_seen) == before[:2] and torch.equal(cache.k, before[2])
    _wait(lambda: any(kv.key == "last_error" and "out of memory" in kv.value
                      for d in probe.diagnostics for s in d.status for kv in s.values))
    assert node.worker.counters.queries_failed == 1
    probe.ask("what is in view ?")
    assert not probe.wait_answers(2)[1].startswith(("busy", "error"))


def test_a_camera_that_stops_is_reported_and_taken_again_when_it_restarts(running) -> None:
    node, probe = running
    assert node.set_parameters([Parameter("camera_timeout", value=0.5)])[0].successful
    probe.images.publish(Image(**rgb_to_image_fields(_rgb(3))))
    _wait(lambda: node.worker.counters.frames_ingested == 1)

    def latest() -> tuple[int, str]:
        status = probe.diagnostics[-1].status[0] if probe.diagnostics else None
        return (status.level, status.message) if status is not None else (-1, "")

    _wait(lambda: "/camera/image_raw for" in latest()[1])  # stopped
    level, message = latest()
    assert level == DiagnosticStatus.WARN and "/camera/image_raw/compressed yet" in message
    deadline = time.monotonic() + 10.0
    while "/camera/image_raw for" in latest()[1]:  # restarts: streams until no longer reported
        assert time.monotonic() < deadline, "the restarted camera is still reported silent"
        probe.images.publish(Image(**rgb_to_image_fields(_rgb(4))))
        time.sleep(0.1)
    assert node.worker.counters.frames_ingested >= 2  # and its frames are taken again
