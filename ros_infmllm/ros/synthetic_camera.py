"""``infmllm_synthetic_camera``: publishes a seeded synthetic-world stream as sensor_msgs/Image,
and the ground truth of every frame on ``~/ground_truth`` (JSON in std_msgs/String), for demos,
tests and soak runs without a camera."""
from __future__ import annotations

import json
import sys
from typing import Iterator

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String

from ..demo.world import WORLDS, StreamFrame, scene_stream
from .conversion import rgb_to_image_fields
from .entry import run_node


def ground_truth(frame: StreamFrame) -> str:
    return json.dumps({"frame": frame.index, "event": frame.event,
                       "things": [{"shape": t.shape, "colour": t.colour, "position": t.position}
                                  for t in frame.scene.ordered()]})


class SyntheticCamera(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("synthetic_camera", **kwargs)
        declare = lambda name, value, text: self.declare_parameter(  # noqa: E731
            name, value, ParameterDescriptor(description=text, read_only=True)).value
        self.rate = declare("rate", 2.0, "Frames per second.")
        width = declare("width", 64, "Image width in pixels.")
        height = declare("height", 64, "Image height in pixels.")
        seed = declare("seed", 0, "Stream seed: the same seed gives the same frames.")
        per_scene = declare("frames_per_scene", 3, "Frames showing each scene before it changes.")
        scenes = declare("scenes", 0, "Scenes to publish, 0 for no end.")
        topic = declare("image_topic", "/camera/image_raw", "Where frames go.")
        world = declare("world", "table", f"Which table: {', '.join(WORLDS)} (busy_table: the demo VLM's, "
                                          "up to 5 things at 9 places; use width and height 128).")
        if self.rate <= 0 or width < 16 or height < 16 or per_scene < 1 or scenes < 0 or world not in WORLDS:
            raise ValueError(f"bad synthetic camera parameters: rate={self.rate} width={width} height={height} "
                             f"frames_per_scene={per_scene} scenes={scenes} world={world!r}")
        self.frames: Iterator[StreamFrame] = scene_stream(seed, scenes or 1 << 62, per_scene, width, height,
                                                          WORLDS[world])
        self.image_pub = self.create_publisher(Image, topic, qos_profile_sensor_data)
        self.truth_pub = self.create_publisher(String, "~/ground_truth", 10)
        self.create_timer(1.0 / self.rate, self._publish)

    def _publish(self) -> None:
        frame = next(self.frames, None)
        if frame is None:
            return
        msg = Image(**rgb_to_image_fields(frame.image))
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "synthetic_camera"
        self.image_pub.publish(msg)
        self.truth_pub.publish(String(data=ground_truth(frame)))


def main(args: list[str] | None = None) -> int:
    return run_node(SyntheticCamera, "synthetic_camera", (ValueError,), args)


if __name__ == "__main__":
    sys.exit(main())
