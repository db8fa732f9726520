"""Camera frames delivered over DDS between two processes, with and without our Fast DDS profile.

``python benchmarks/dds_frames.py``: for each setting, one process publishes 640x480 rgb8
``sensor_msgs/Image`` frames at 30 fps for ``--seconds`` (sensor-data QoS: best effort, as camera
drivers publish and as the node subscribes) and another counts what arrives. Settings: Fast DDS's
defaults, and ``config/fastdds_large_frames.xml`` (a shared-memory segment large enough for a
frame) in both processes. Writes ``<out>/<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from intervals import wilson
from results_files import save_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROFILE = ROOT / "config" / "fastdds_large_frames.xml"
PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"


def publish(topic: str, seconds: float, fps: float, width: int, height: int) -> int:
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("dds_frames_camera")
    publisher = node.create_publisher(Image, topic, qos_profile_sensor_data)
    pixels = np.random.default_rng(0).integers(0, 256, width * height * 3, dtype=np.uint8).tobytes()
    message = Image(height=height, width=width, encoding="rgb8", step=3 * width, data=pixels)
    time.sleep(2.0)  # discovery
    sent, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        publisher.publish(message)
        sent += 1
        time.sleep(max(0.0, start + sent / fps - time.monotonic()))
    rclpy.shutdown()
    return sent


def count(topic: str, seconds: float) -> int:
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("dds_frames_counter")
    received = []
    node.create_subscription(Image, topic, lambda message: received.append(len(message.data)), qos_profile_sensor_data)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    rclpy.shutdown()
    return len(received)


def measure(profile: Path | None, seconds: float, fps: float, size: tuple[int, int], domain: int) -> dict:
    """Publisher and counter as two processes of this script, on their own ROS domain."""
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain)}
    env.pop(PROFILE_VARIABLE, None)
    if profile is not None:
        env[PROFILE_VARIABLE] = str(profile)
    script = [sys.executable, __file__]
    counter = subprocess.Popen(script + ["--role", "count", "--seconds", str(seconds + 4)], env=env,
                               stdout=subprocess.PIPE, text=True)
    sent = subprocess.run(script + ["--role", "publish", "--seconds", str(seconds), "--fps", str(fps),
                                    "--size", str(size[0]), str(size[1])], env=env, capture_output=True, text=True,
                          check=True).stdout.split()[-1]
    received = counter.communicate(timeout=seconds + 30)[0].split()[-1]
    sent, received = int(sent), int(received)
    return {"profile": str(profile.relative_to(ROOT)) if profile else "Fast DDS defaults", "published": sent,
            "received": received, "share": received / sent, "share_ci95": wilson(min(received, sent), sent)}


def write_markdown(report: dict, path: Path) -> None:
    width, height = report["size"]
    lines = ["# Camera frames over DDS", "",
             f"Produced by `benchmarks/dds_frames.py`: {width}x{height} rgb8 `sensor_msgs/Image` at "
             f"{report['fps']:g} fps for {report['seconds']:g} s, publisher and subscriber in two processes on one "
             "host, sensor-data QoS (best effort); RMW " + report["rmw"] + ".", "",
             "| Fast DDS profile (both processes) | published | received | share (95% CI) |", "|---|---|---|---|"]
    for r in report["rows"]:
        low, high = r["share_ci95"]
        lines.append(f"| {r['profile']} | {r['published']} | {r['received']} | {100 * r['share']:.1f}% "
                     f"({100 * low:.1f}-{100 * high:.1f}%) |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=("run", "publish", "count"), default="run")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--domain", type=int, default=91)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="dds_frames_cpu")
    args = parser.parse_args(argv)
    if args.role == "publish":
        print(publish("/dds_frames/image_raw", args.seconds, args.fps, *args.size))
        return 0
    if args.role == "count":
        print(count("/dds_frames/image_raw", args.seconds))
        return 0
    rows = [measure(profile, args.seconds, args.fps, tuple(args.size), args.domain) for profile in (None, PROFILE)]
    report = {"seconds": args.seconds, "fps": args.fps, "size": list(args.size), "rmw": os.environ.get(
        "RMW_IMPLEMENTATION", "rmw_fastrtps_cpp (default)"), "rows": rows}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
