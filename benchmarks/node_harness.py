"""What the node benchmarks share: the node as a subprocess with a parameters file, a camera of
synthetic-world frames at a real camera's size, a DDS probe that publishes frames and questions
and records answers, streamed pieces and diagnostics with arrival times, and /proc memory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Both ends of the camera (this process and the node it starts) use the package's Fast DDS profile,
# as infmllm.launch.py sets it: without it Fast DDS delivers a few percent of 640x480 rgb8 frames
# (results/dds_frames_cpu.md). A profile already named in the environment is kept.
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(ROOT / "config" / "fastdds_large_frames.xml"))


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux, as on a Jetson)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def camera_frames(size: tuple[int, int], count: int = 64) -> list[dict]:
    """A loop of synthetic busy-table frames resized to the camera's (width, height), as Image fields."""
    import cv2

    from ros_infmllm.demo.world import BUSY_TABLE, scene_stream
    from ros_infmllm.ros.conversion import rgb_to_image_fields

    return [rgb_to_image_fields(cv2.resize(frame.image, size, interpolation=cv2.INTER_LINEAR))
            for frame in scene_stream(5, count, 1, 128, 128, BUSY_TABLE)]


@dataclass
class Ticker:
    """A periodic event for the benchmarks' camera loops (frames, questions, samples): ``due`` says
    whether it fires now and schedules the next one a ``period`` later; ``next`` is None until it
    is started."""

    period: float
    next: float | None = None

    def start(self, now: float) -> None:
        self.next = now

    def due(self, now: float) -> bool:
        if self.next is None or now < self.next:
            return False
        self.next += self.period
        return True


def sleep_until_due(*tickers: Ticker) -> None:
    """Sleep until the earliest started ticker is due."""
    wake = min(t.next for t in tickers if t.next is not None)
    time.sleep(max(0.0, wake - time.monotonic()))


def start_node(params: dict, folder: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """``python -m ros_infmllm.ros.node`` with ``params`` (written as YAML); output to node.log."""
    folder = folder or Path(tempfile.mkdtemp(prefix="node-bench-"))
    lines = ["infmllm:", "  ros__parameters:"]
    for key, value in params.items():
        text = f'"{value}"' if isinstance(value, str) else ("[" + ", ".join(f'"{v}"' for v in value) + "]"
                                                             if isinstance(value, list) else str(value).lower()
                                                             if isinstance(value, bool) else str(value))
        lines.append(f"    {key}: {text}")
    (folder / "params.yaml").write_text("\n".join(lines) + "\n")
    log = open(folder / "node.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "ros_infmllm.ros.node", "--ros-args", "--params-file",
                                str(folder / "params.yaml")], stdout=log, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT)
    return process, folder


def stop_node(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class Recorder:
    """Answers, streamed pieces (with monotonic arrival times) and the latest diagnostics values."""

    answers: list[tuple[float, str]] = field(default_factory=list)
    pieces: list[tuple[float, str]] = field(default_factory=list)
    diagnostics: dict[str, str] = field(default_factory=dict)


class CameraProbe:
    """A node that publishes camera frames (stamped now) and questions, and records the replies."""

    def __init__(self, namespace: str = "/infmllm", image_topic: str = "/camera/image_raw") -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        self._Image, self._String = Image, String
        self.node = rclpy.create_node("node_bench_probe")
        self.record = Recorder()
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(String, f"{namespace}/answer",
                                      lambda m: self.record.answers.append((time.monotonic(), m.data)), reliable)
        self.node.create_subscription(String, f"{namespace}/answer_stream",
                                      lambda m: self.record.pieces.append((time.monotonic(), m.data)), reliable)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.record.diagnostics.update(
            {kv.key: kv.value for s in m.status for kv in s.values}), 10)
        self.images = self.node.create_publisher(Image, image_topic, qos_profile_sensor_data)
        self.queries = self.node.create_publisher(String, f"{namespace}/query", reliable)

    def publish_frame(self, fields: dict) -> None:
        msg = self._Image(**fields)
        now = time.time()
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(now), int((now % 1) * 1e9)
        self.images.publish(msg)

    def ask(self, text: str) -> float:
        self.queries.publish(self._String(data=text))
        return time.monotonic()

    def wait_ready(self, process: subprocess.Popen, log: Path, timeout: float = 900.0) -> float:
        """Seconds until /diagnostics says ``state: ready`` (start-up, assembly, warm-up)."""
        started = time.monotonic()
        while self.record.diagnostics.get("state") != "ready":
            if process.poll() is not None:
                raise RuntimeError(f"node exited during start-up: {log.read_text()[-2000:]}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"node not ready after {timeout} s")
            time.sleep(0.1)
        return time.monotonic() - started
