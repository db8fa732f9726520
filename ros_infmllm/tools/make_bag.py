"""``infmllm_make_bag OUT``: write a small rosbag2 of camera frames and questions for demos and tests.

Frames are seeded test patterns (coloured shapes drawn with OpenCV on a textured background),
published as raw ``sensor_msgs/Image`` and/or JPEG ``CompressedImage``; questions are
``std_msgs/String`` on the node's query topic at set times.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from ..ros.conversion import rgb_to_image_fields
from .bag_io import BagMessage, write_bag

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def test_pattern(index: int, width: int, height: int, seed: int) -> np.ndarray:
    """A textured background with one or two filled shapes whose colour and place vary by frame."""
    rng = np.random.default_rng(seed * 100003 + index)
    image = np.full((height, width, 3), 128, np.uint8)
    image = np.clip(image.astype(np.int16) + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    for _ in range(1 + index % 2):
        colour = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
        centre = (int(rng.integers(8, width - 8)), int(rng.integers(8, height - 8)))
        if rng.random() < 0.5:
            cv2.circle(image, centre, int(rng.integers(4, 10)), colour, -1)
        else:
            half = int(rng.integers(4, 10))
            cv2.rectangle(image, (centre[0] - half, centre[1] - half), (centre[0] + half, centre[1] + half),
                          colour, -1)
    return image


def stream(frames: int, fps: float, width: int, height: int, seed: int, image_topic: str, compressed: bool,
           query_topic: str, questions: list[tuple[float, str]]) -> Iterator[BagMessage]:
    events: list[tuple[int, BagMessage]] = []
    start = 1_700_000_000 * 10**9
    for index in range(frames):
        stamp = start + int(index / fps * 1e9)
        rgb = test_pattern(index, width, height, seed)
        if image_topic:
            events.append((stamp, BagMessage(image_topic, "sensor_msgs/msg/Image", stamp, rgb_to_image_fields(rgb))))
        if compressed:
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            assert ok
            events.append((stamp, BagMessage(f"{image_topic or '/camera/image_raw'}/compressed",
                                             "sensor_msgs/msg/CompressedImage", stamp,
                                             {"format": "jpeg", "data": jpeg.tobytes()})))
    for at, text in questions:
        stamp = start + int(at * 1e9)
        events.append((stamp, BagMessage(query_topic, "std_msgs/msg/String", stamp, {"data": text})))
    for _, message in sorted(events, key=lambda item: item[0]):
        yield message


def parse_question(text: str) -> tuple[float, str]:
    at, _, question = text.partition(":")
    try:
        return float(at), question
    except ValueError:
        raise argparse.ArgumentTypeError(f"question {text!r} must be SECONDS:TEXT") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infmllm_make_bag", description=__doc__)
    parser.add_argument("out", type=Path, help="new rosbag2 folder")
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--fps", type=float, default=5.0)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 48), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-topic", default="/camera/image_raw", help="'' for none")
    parser.add_argument("--compressed", action="store_true", help="also write JPEG frames on TOPIC/compressed")
    parser.add_argument("--query-topic", default="/infmllm/query")
    parser.add_argument("--question", type=parse_question, action="append", default=[], metavar="SECONDS:TEXT")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists")
    write_bag(args.out, stream(args.frames, args.fps, args.size[0], args.size[1], args.seed, args.image_topic,
                               args.compressed, args.query_topic, args.question), args.storage)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
