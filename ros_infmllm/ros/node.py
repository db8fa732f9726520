"""The rclpy node ``infmllm``: thin glue between topics and the inference worker.

Callbacks convert messages and hand them to the worker; they never run the model. Bad frames
and questions are logged (throttled) and answered with a reason; the node keeps running.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from ..errors import CheckpointError
from . import params as P
from .conversion import ImageConversionError, compressed_to_rgb, image_to_rgb
from .entry import run_node
from .session_factory import build_session
from .worker import InferenceWorker, Query

NODE_NAME = "infmllm"
QUERY_QOS = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
ANSWER_QOS = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
WARN_THROTTLE_S = 5.0


def _descriptor(spec: P.ParamSpec) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=spec.description, read_only=not spec.runtime)
    if spec.low is not None and isinstance(spec.default, float):
        descriptor.floating_point_range = [FloatingPointRange(from_value=float(spec.low), to_value=float(spec.high))]
    elif spec.low is not None and isinstance(spec.default, int):
        descriptor.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high))]
    if spec.choices:
        descriptor.additional_constraints = f"one of: {', '.join(spec.choices)}"
    return descriptor




class InfMLLMNode(Node):
    """Subscribes to cameras and ``~/query``; publishes ``~/answer``, ``~/answer_stream``, ``/diagnostics``."""

    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self.values = self._declare_parameters()
        self.session = build_session(self.values)
        self.answer_pub = self.create_publisher(String, "~/answer", ANSWER_QOS)
        self.stream_pub = self.create_publisher(String, "~/answer_stream", ANSWER_QOS)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.started_at = time.monotonic()
        self.last_frame_at: dict[str, float] = {}  # per camera topic, when its last frame came
        self.worker = InferenceWorker(self.session, self._publish_answer, self._publish_piece,
                                      self.values["max_pending_queries"], self.values["frame_rate"],
                                      log_error=lambda text: self.get_logger().error(text),
                                      question_frame_age=self.values["question_frame_age"],
                                      warm_up=self.session.warm_up if self.values["warm_up"] else None,
                                      on_ready=self._on_ready)
        for topic in self.values["image_topics"]:
            if topic.endswith("/compressed"):
                self.create_subscription(CompressedImage, topic, self._frame_callback(topic, compressed_to_rgb),
                                         qos_profile_sensor_data)
            else:
                self.create_subscription(Image, topic, self._frame_callback(topic, image_to_rgb),
                                         qos_profile_sensor_data)
        self.create_subscription(String, "~/query", self._on_query, QUERY_QOS)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_timer(self.values["diagnostics_period"], self._publish_diagnostics)
        self.worker.start()
        if self.values["warm_up"]:
            self.get_logger().info("warming up: frames and questions wait until ready")
        if (os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") == "rmw_fastrtps_cpp"
                and not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")):
            self.get_logger().warning(
                "FASTDDS_DEFAULT_PROFILES_FILE is not set: Fast DDS's default shared-memory segment (512 KB) "
                "drops most camera frames larger than it (640x480 rgb8 is 900 KB); give the camera driver's "
                "process share/ros_infmllm/config/fastdds_large_frames.xml (infmllm.launch.py does so for its own)")

    def _on_ready(self, seconds: float | None, error: str) -> None:
        """Called by the worker once warm-up is over (at once without one)."""
        warm = f" after a {seconds:.2f} s warm-up" if seconds is not None else (f" ({error})" if error else "")
        self.get_logger().info(
            f"ready: policy={self.values['policy']} capacity={self.values['capacity']} "
            f"cameras={self.values['image_topics']} model={self.values['model_path'] or '(bundled demo)'} "
            f"backend={self.session.backend.name} "
            f"{' '.join(f'{key}={value}' for key, value in self.session.held_weights.items())}{warm}")
        self._publish_diagnostics()

    # ---- parameters ------------------------------------------------------------------------
    def _declare_parameters(self) -> dict[str, Any]:
        values = {}
        for spec in P.PARAMS:
            value = self.declare_parameter(spec.name, spec.default, _descriptor(spec)).value
            P.validate(spec.name, value)
            values[spec.name] = value
        return values

    def _on_set_parameters(self, parameters: list) -> SetParametersResult:
        for parameter in parameters:
            try:
                P.validate(parameter.name, parameter.value)
            except (ValueError, KeyError) as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        for parameter in parameters:
            self.values[parameter.name] = parameter.value
            self._apply(parameter.name, parameter.value)
        return SetParametersResult(successful=True)

    def _apply(self, name: str, value: Any) -> None:
        """Runtime changes reach the worker and session; the rest are read-only descriptors."""
        from ..session import SamplingConfig
        from dataclasses import replace

        if name == "frame_rate":
            self.worker.frame_rate = value
        elif name == "question_frame_age":
            self.worker.question_frame_age = value
        elif name == "max_pending_queries":
            self.worker.max_pending_queries = value
        elif name == "max_new_tokens":
            self.session.config = replace(self.session.config, max_new_tokens=value)
        elif name in ("temperature", "top_p"):
            sampling = self.session.config.sampling
            self.session.config = replace(self.session.config, sampling=SamplingConfig(
                self.values["temperature"], self.values["top_p"], sampling.seed))

    # ---- inputs ----------------------------------------------------------------------------
    def _frame_callback(self, topic: str, convert):
        def callback(msg) -> None:
            try:
                rgb = convert(msg)
            except ImageConversionError as exc:
                self.worker.reject_frame(f"{topic}: {exc}")
                self.get_logger().warning(f"frame on {topic} refused: {exc}", throttle_duration_sec=WARN_THROTTLE_S)
                return
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            self.last_frame_at[topic] = time.monotonic()
            self.worker.submit_frame(topic, rgb, stamp)
        return callback

    def _on_query(self, msg: String) -> None:
        if self.worker.submit_query(msg.data) is None:
            self.get_logger().warning("query refused: queue full", throttle_duration_sec=WARN_THROTTLE_S)
            self.answer_pub.publish(String(data=f"busy: {self.worker.max_pending_queries} questions are "
                                                f"waiting, ask again later"))

    # ---- outputs (called from the worker thread) -------------------------------------------
    def _publish_piece(self, query: Query, piece: str) -> None:
        self.stream_pub.publish(String(data=piece))

    def _publish_answer(self, query: Query, text: str) -> None:
        self.stream_pub.publish(String(data=""))  # an empty piece ends each streamed answer
        self.answer_pub.publish(String(data=text))

    def _publish_diagnostics(self) -> None:
        counters, cache = self.worker.counters, self.session.cache
        level = DiagnosticStatus.OK
        message = "streaming" if self.worker.state == "ready" else self.worker.state
        silent = self.silent_cameras()
        if silent:
            level, message = DiagnosticStatus.WARN, "no frames from " + ", ".join(silent)
        if self.worker.pending_queries >= self.worker.max_pending_queries:
            level, message = DiagnosticStatus.WARN, "query queue full"
        if self.worker.warm_up_error:
            level, message = DiagnosticStatus.WARN, self.worker.warm_up_error[:200]
        if self.session.runner.capture_error:
            level, message = DiagnosticStatus.WARN, "CUDA graph capture failed: " + self.session.runner.capture_error[:160]
        warm_up_s = self.worker.warm_up_s
        values = {
            "state": self.worker.state, "warm_up_s": "" if warm_up_s is None else f"{warm_up_s:.3f}",
            "warm_up_error": self.worker.warm_up_error,
            "cache_fill": cache.length, "cache_capacity": cache.capacity, "tokens_streamed": cache.total_seen,
            "evictions": cache.evictions, "evicted_tokens": cache.evicted_tokens, "policy": self.session.policy.name,
            "frames_received": counters.frames_received, "frames_ingested": counters.frames_ingested,
            "frames_dropped": counters.frames_dropped, "frames_rejected": counters.frames_rejected,
            "queries_queued": self.worker.pending_queries, "queries_received": counters.queries_received,
            "queries_answered": counters.queries_answered, "queries_refused": counters.queries_refused,
            "queries_failed": counters.queries_failed, "last_ingest_ms": f"{counters.last_ingest_ms:.1f}",
            "last_first_token_ms": f"{counters.last_first_token_ms:.1f}",
            "last_answer_ms": f"{counters.last_answer_ms:.1f}", "last_error": counters.last_error,
            "last_frame_age_ms": f"{counters.last_frame_age_ms:.1f}",
            "max_frame_age_ms": f"{counters.max_frame_age_ms:.1f}",
            **{f"held_{key}": value for key, value in self.session.held_weights.items()},
            "captured_graphs": len(self.session.runner.graphs),
            "graph_capture_error": self.session.runner.capture_error or "",
            **self._gpu_memory(),
        }
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: streaming session", message=message,
                                  hardware_id=str(self.values["device"]),
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    def _gpu_memory(self) -> dict[str, str]:
        """The CUDA allocator's figures for the session's device (none on the CPU)."""
        device = self.session.model.device
        if device.type != "cuda":
            return {}
        import torch

        return {"gpu_memory_allocated_mb": f"{torch.cuda.memory_allocated(device) / 2**20:.1f}",
                "gpu_memory_reserved_mb": f"{torch.cuda.memory_reserved(device) / 2**20:.1f}"}

    def silent_cameras(self) -> list[str]:
        """Camera topics with no frame for ``camera_timeout`` seconds ('for N s', or 'yet')."""
        now, timeout = time.monotonic(), self.values["camera_timeout"]
        silent = []
        for topic in self.values["image_topics"]:
            last = self.last_frame_at.get(topic)
            if last is None and now - self.started_at > timeout:
                silent.append(f"{topic} yet")
            elif last is not None and now - last > timeout:
                silent.append(f"{topic} for {now - last:.0f} s")
        return silent

    def destroy_node(self) -> None:
        worker = getattr(self, "worker", None)  # absent when start-up failed
        if worker is not None:
            worker.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Entry point of ``infmllm_node``: exits 2 on bad parameters or a missing model."""
    return run_node(InfMLLMNode, NODE_NAME, (ValueError, CheckpointError, OSError), args)


if __name__ == "__main__":
    sys.exit(main())
