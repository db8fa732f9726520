"""The synthetic camera node over real DDS: frames and ground truth match the seeded world."""
from __future__ import annotations

import json
import time

import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String

from ros_infmllm.demo.world import scene_stream
from ros_infmllm.ros.conversion import image_to_rgb
from ros_infmllm.ros.entry import spinning
from ros_infmllm.ros.synthetic_camera import SyntheticCamera


def test_camera_publishes_the_seeded_stream_with_ground_truth(ros_context) -> None:
    camera = SyntheticCamera(parameter_overrides=[
        Parameter("rate", value=20.0), Parameter("seed", value=5), Parameter("frames_per_scene", value=2),
        Parameter("scenes", value=3), Parameter("image_topic", value="/synthetic/image")])
    probe = rclpy.create_node("camera_probe")
    images, truths = [], []
    probe.create_subscription(Image, "/synthetic/image", lambda m: images.append(image_to_rgb(m)),
                              qos_profile_sensor_data)
    probe.create_subscription(String, "/synthetic_camera/ground_truth", lambda m: truths.append(json.loads(m.data)), 10)
    try:
        with spinning(camera, probe, executor=MultiThreadedExecutor()):
            deadline = time.monotonic() + 15
            while len(truths) < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        camera.destroy_node()
        probe.destroy_node()
    expected = list(scene_stream(5, 3, 2))
    assert len(truths) == 6
    for truth in truths:
        frame = expected[truth["frame"]]
        assert truth["things"] == [{"shape": t.shape, "colour": t.colour, "position": t.position}
                                   for t in frame.scene.ordered()]
    assert images and all(image.shape == (64, 64, 3) for image in images)
    assert any(np.array_equal(image, frame.image) for image in images for frame in expected)
