"""``infmllm_demo --model DIR --bag BAG``: start the node, replay a bag into it, print each
question with the node's answer. What ``make demo`` runs."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import json
from pathlib import Path

from ..cache import DEFAULT_POLICY

QUERY_TOPIC = "/infmllm/query"
ANSWER_TOPIC = "/infmllm/answer"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infmllm_demo", description=__doc__)
    parser.add_argument("--model", default="demo-vlm",
                        help="'demo-vlm' (default: SmolLM2 + trained tower, assembled on first use), '' for the "
                             "tiny bundled test model, or a checkpoint path")
    parser.add_argument("--bag", type=Path, required=True, help="rosbag2 with camera frames and questions")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--capacity", type=int, default=1024)
    parser.add_argument("--rate", type=float, default=0.25,
                        help="bag playback speed (0.25 leaves a CPU time to ingest each frame of a 4 fps bag)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the last answer")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    from ..ros.entry import spinning
    from .bag_io import read_bag
    from .make_bag import EXPECTED_TOPIC

    from rclpy.serialization import deserialize_message

    from ..demo.chat_questions import judge

    if args.model == "demo-vlm":  # assemble here, so the progress shows before the node starts
        from ..demo.vlm import demo_vlm_path

        args.model = str(demo_vlm_path())
    questions = [raw for _, _, _, raw in read_bag(args.bag, [QUERY_TOPIC])]
    expected = [json.loads(deserialize_message(raw, String).data) for topic, _, _, raw in read_bag(args.bag)
                if topic == EXPECTED_TOPIC]
    params = Path(tempfile.mkdtemp()) / "demo.yaml"
    params.write_text("infmllm:\n  ros__parameters:\n"
                      f"    model_path: \"{args.model}\"\n    policy: \"{args.policy}\"\n"
                      f"    capacity: {args.capacity}\n    max_chunk: 128\n    frame_rate: 20.0\n"
                      "    image_topics: [\"/camera/image_raw\"]\n")
    node = subprocess.Popen([sys.executable, "-m", "ros_infmllm.ros.node", "--ros-args", "--params-file",
                             str(params)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rclpy.init()
    listener = rclpy.create_node("infmllm_demo")
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    asked: list[str] = []
    answers: list[str] = []
    listener.create_subscription(String, QUERY_TOPIC, lambda m: asked.append(m.data), qos)
    listener.create_subscription(String, ANSWER_TOPIC, lambda m: answers.append(m.data), qos)
    code = 1
    try:
        with spinning(listener):
            deadline = time.monotonic() + 120
            while listener.count_publishers(ANSWER_TOPIC) == 0:
                if node.poll() is not None:
                    print(node.communicate()[0], file=sys.stderr)
                    return 2
                if time.monotonic() > deadline:
                    print("the node did not start within 120 s", file=sys.stderr)
                    return 2
                time.sleep(0.1)
            print(f"node up; replaying {args.bag} ({len(questions)} questions)", flush=True)
            player = subprocess.run([sys.executable, "-m", "ros_infmllm.tools.play", str(args.bag),
                                     "--topics", "/camera/image_raw", QUERY_TOPIC, "--rate", str(args.rate)])
            deadline = time.monotonic() + args.timeout
            while len(answers) < len(questions) and time.monotonic() < deadline:
                time.sleep(0.1)
            right = 0
            for i, (question, answer) in enumerate(zip(asked, answers)):
                print(f"Q: {question}\nA: {answer}", flush=True)
                # The bag records each generated question's answer beside it, in the same order.
                truth = expected[i]["answer"] if i < len(expected) and expected[i]["question"] == question else None
                if truth is not None:
                    correct = judge(answer, truth)  # up to case, punctuation and spacing
                    right += correct
                    print(f"   ({'correct' if correct else 'expected: ' + truth})", flush=True)
                print(flush=True)
            if expected:
                print(f"{right} of {len(expected)} answers match the ground truth", flush=True)
            code = 0 if player.returncode == 0 and len(answers) == len(questions) else 1
            if code:
                print(f"only {len(answers)} of {len(questions)} answers arrived", file=sys.stderr)
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(timeout=30)
        listener.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
