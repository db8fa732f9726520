"""``infmllm_play BAG [--rate R] [--topics ...]``: replay a rosbag2 into live topics with the
recorded timing, where ``ros2 bag play`` is not installed."""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from .bag_io import read_bag


def message_class(msgtype: str) -> type:
    """rclpy message class of ``pkg/msg/Name``."""
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infmllm_play", description=__doc__)
    parser.add_argument("bag", type=Path, help="rosbag2 folder (mcap or sqlite3)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--topics", nargs="+", help="only these topics")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="most seconds to wait for every topic to have a subscriber before playing "
                             "(messages sent before discovery completes are lost)")
    parser.add_argument("--remap", nargs="+", default=[], metavar="FROM:=TO", help="topic remappings")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error(f"--rate must be positive, got {args.rate}")
    if not args.bag.exists():
        parser.error(f"bag {args.bag} not found")
    return args


def play(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message

    remap = dict(item.split(":=", 1) for item in args.remap)
    messages = list(read_bag(args.bag, args.topics))
    rclpy.init()
    node = rclpy.create_node("infmllm_play")
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    publishers, classes = {}, {}
    for topic, msgtype, _, _ in messages:
        if topic not in publishers:
            classes[topic] = message_class(msgtype)
            publishers[topic] = node.create_publisher(classes[topic], remap.get(topic, topic), qos)
    try:
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline and any(p.get_subscription_count() == 0 for p in publishers.values()):
            time.sleep(0.05)
        time.sleep(0.3)  # let the matched readers finish their side of the handshake
        start_wall = time.monotonic()
        start_bag = messages[0][2] if messages else 0
        for topic, _, stamp, raw in messages:
            due = start_wall + (stamp - start_bag) / 1e9 / args.rate
            time.sleep(max(0.0, due - time.monotonic()))
            publishers[topic].publish(deserialize_message(raw, classes[topic]))
        node.get_logger().info(f"played {len(messages)} messages from {args.bag}")
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return play(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
