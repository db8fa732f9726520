"""ros_infmllm: a streaming vision-language ROS 2 node with a bounded, Inf-MLLM-managed KV cache."""
__version__ = "0.1.0"
