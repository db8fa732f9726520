"""ROS 2 glue: message conversion, the inference worker, parameters and the rclpy node.

Importing this package does not import rclpy; ``ros_infmllm.ros.node`` does."""
