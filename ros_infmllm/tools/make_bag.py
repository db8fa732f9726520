"""``infmllm_make_bag OUT``: record a synthetic-world stream and questions into a rosbag2.

Frames come from the seeded synthetic camera world (``ros_infmllm.demo.world``) as raw
``sensor_msgs/Image`` and/or JPEG ``CompressedImage``. Questions are ``std_msgs/String`` on the
node's query topic: given ones (``--question SECONDS:TEXT``) and/or generated ones
(``--ask-every N``), whose exact answers go to ``/infmllm_demo/expected`` as JSON, so a replay
can be checked against the ground truth.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from ..demo.episodes import CHAT, TERSE
from ..demo.world import scene_stream
from ..ros.conversion import rgb_to_image_fields
from .bag_io import BagMessage, write_bag

EXPECTED_TOPIC = "/infmllm_demo/expected"
QUESTION_SETS = {"terse": TERSE, "chat": CHAT}
START_NS = 1_700_000_000 * 10**9


def stream(args: argparse.Namespace) -> Iterator[BagMessage]:
    events: list[BagMessage] = []
    rng = np.random.default_rng(args.seed)
    questions = QUESTION_SETS[args.questions]
    kinds = list(questions.current_types) + list(questions.memory_types)
    history = questions.history()
    frame_ns = int(1e9 / args.fps)
    size = args.size or (questions.frame_size, questions.frame_size)
    frames = scene_stream(args.seed, args.scenes, args.frames_per_scene, size[0], size[1], questions.world)
    for frame in frames:
        stamp = START_NS + frame.index * frame_ns
        history.observe(frame.scene)
        if args.image_topic:
            events.append(BagMessage(args.image_topic, "sensor_msgs/msg/Image", stamp, rgb_to_image_fields(frame.image)))
        if args.compressed:
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            events.append(BagMessage(f"{args.image_topic or '/camera/image_raw'}/compressed",
                                     "sensor_msgs/msg/CompressedImage", stamp,
                                     {"format": "jpeg", "data": jpeg.tobytes()}))
        if args.ask_every and (frame.index + 1) % args.ask_every == 0:
            kind = kinds[(frame.index // args.ask_every) % len(kinds)]
            qa = (questions.memory(kind, history, rng) if kind in questions.memory_types
                  else questions.current(kind, frame.scene, rng))
            if qa is not None:
                at = stamp + frame_ns // 2
                events.append(BagMessage(args.query_topic, "std_msgs/msg/String", at, {"data": qa.question}))
                events.append(BagMessage(EXPECTED_TOPIC, "std_msgs/msg/String", at, {"data": json.dumps(
                    {"kind": qa.kind, "question": qa.question, "answer": qa.answer})}))
    for at, text in args.question:
        stamp = START_NS + int(at * 1e9)
        events.append(BagMessage(args.query_topic, "std_msgs/msg/String", stamp, {"data": text}))
    yield from sorted(events, key=lambda m: m.timestamp_ns)


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
    parser.add_argument("--scenes", type=int, default=8, help="scene changes in the stream")
    parser.add_argument("--frames-per-scene", type=int, default=2)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("WIDTH", "HEIGHT"),
                        help="frame size (default: 64x64 for terse questions, 128x128 for chat)")
    parser.add_argument("--questions", choices=sorted(QUESTION_SETS), default="terse",
                        help="terse: the small table and the tiny model's questions; chat: the busy table and "
                             "the demo VLM's questions in English")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-topic", default="/camera/image_raw", help="'' for none")
    parser.add_argument("--compressed", action="store_true", help="also write JPEG frames on TOPIC/compressed")
    parser.add_argument("--query-topic", default="/infmllm/query")
    parser.add_argument("--question", type=parse_question, action="append", default=[], metavar="SECONDS:TEXT")
    parser.add_argument("--ask-every", type=int, default=0, help="ask a generated question every N frames")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists")
    if args.fps <= 0 or args.scenes < 1 or args.frames_per_scene < 1:
        parser.error("--fps, --scenes and --frames-per-scene must be positive")
    write_bag(args.out, stream(args), args.storage)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
