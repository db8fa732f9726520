"""Out of process: the node started with a params file, driven by infmllm_play from recorded bags."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor

from ros_infmllm.tools.bag_io import BagMessage, read_bag, write_bag
from test_node import Probe

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bag_round_trip(tmp_path: Path, storage: str) -> None:
    messages = [BagMessage("/q", "std_msgs/msg/String", 10 + i, {"data": f"m{i}"}) for i in range(3)]
    write_bag(tmp_path / "bag", messages, storage)
    read = list(read_bag(tmp_path / "bag"))
    assert [(t, ts) for t, _, ts, _ in read] == [("/q", 10), ("/q", 11), ("/q", 12)]
    with pytest.raises(ValueError, match="none of the topics"):
        list(read_bag(tmp_path / "bag", ["/missing"]))


@pytest.mark.parametrize("bag", ["stream_mcap", "stream_sqlite3"])
def test_node_subprocess_answers_questions_replayed_from_a_bag(ros_context, tiny_model_dir: Path, tmp_path: Path,
                                                               bag: str) -> None:
    questions = [m for m in read_bag(DATA / bag, ["/infmllm/query"])]
    assert len(questions) == 2
    params = tmp_path / "params.yaml"
    params.write_text(
        "infmllm:\n  ros__parameters:\n"
        f"    model_path: \"{tiny_model_dir}\"\n    capacity: 256\n    max_chunk: 32\n    template: demo\n"
        "    frame_rate: 50.0\n    max_new_tokens: 4\n"
        "    image_topics: [\"/camera/image_raw\", \"/camera/image_raw/compressed\"]\n")
    node = subprocess.Popen([sys.executable, "-m", "ros_infmllm.ros.node", "--ros-args", "--params-file", str(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = Probe()
    executor = SingleThreadedExecutor()
    executor.add_node(probe.node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        deadline = time.monotonic() + 60
        while probe.node.count_publishers("/infmllm/answer") == 0:
            assert node.poll() is None, node.communicate()[0]
            assert time.monotonic() < deadline, "node did not come up"
            time.sleep(0.1)
        player = subprocess.run([sys.executable, "-m", "ros_infmllm.tools.play", str(DATA / bag), "--rate", "2"],
                                capture_output=True, text=True, timeout=120)
        assert player.returncode == 0, player.stderr
        answers = probe.wait_answers(2, timeout=60)
        assert len(answers) == 2 and not any(a.startswith(("error", "busy")) for a in answers)
        def last_diagnostics() -> dict[str, str]:
            return {kv.key: kv.value for kv in probe.diagnostics[-1].status[0].values} if probe.diagnostics else {}

        deadline = time.monotonic() + 10
        while last_diagnostics().get("queries_answered") != "2" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert last_diagnostics()["queries_answered"] == "2"
        assert int(last_diagnostics()["frames_ingested"]) > 0
    finally:
        node.send_signal(signal.SIGINT)
        output = node.communicate(timeout=30)[0]
        executor.shutdown()
        probe.node.destroy_node()
    assert node.returncode == 0, output
    assert "ready: policy=inf-mllm capacity=256" in output


def test_bundled_demo_model_answers_the_demo_bag_correctly(ros_context, tmp_path: Path) -> None:
    """End to end with real answers: node (default model_path = the bundled demo model) + player
    + the demo bag; every answer must equal the ground truth recorded in the bag."""
    import json

    from rclpy.serialization import deserialize_message
    from std_msgs.msg import String

    from ros_infmllm.tools.make_bag import EXPECTED_TOPIC

    expected = [json.loads(deserialize_message(raw, String).data)["answer"]
                for _, _, _, raw in read_bag(DATA / "demo_mcap", [EXPECTED_TOPIC])]
    assert len(expected) >= 6
    params = tmp_path / "params.yaml"
    params.write_text("infmllm:\n  ros__parameters:\n    capacity: 1024\n    max_chunk: 128\n    frame_rate: 20.0\n")
    node = subprocess.Popen([sys.executable, "-m", "ros_infmllm.ros.node", "--ros-args", "--params-file", str(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = Probe()
    executor = SingleThreadedExecutor()
    executor.add_node(probe.node)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while probe.node.count_publishers("/infmllm/answer") == 0:
            assert node.poll() is None, node.communicate()[0]
            assert time.monotonic() < deadline, "node did not come up"
            time.sleep(0.1)
        player = subprocess.run([sys.executable, "-m", "ros_infmllm.tools.play", str(DATA / "demo_mcap"), "--rate",
                                 "0.5", "--topics", "/camera/image_raw", "/infmllm/query"],
                                capture_output=True, text=True, timeout=120)
        assert player.returncode == 0, player.stderr
        answers = probe.wait_answers(len(expected), timeout=60)
        time.sleep(1.2)  # one more diagnostics period
    finally:
        node.send_signal(signal.SIGINT)
        output = node.communicate(timeout=30)[0]
        executor.shutdown()
        probe.node.destroy_node()
    assert "model=(bundled demo)" in output
    frames = len(list(read_bag(DATA / "demo_mcap", ["/camera/image_raw"])))
    ingested = {kv.key: kv.value for kv in probe.diagnostics[-1].status[0].values}["frames_ingested"]
    assert answers == expected, f"{ingested} of {frames} frames ingested"
