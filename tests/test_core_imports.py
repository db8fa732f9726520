"""The streaming core must stay free of ROS so it can be tested and benchmarked alone."""
from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_rclpy() -> None:
    code = ("import sys; import ros_infmllm.model, ros_infmllm.cache, ros_infmllm.session, ros_infmllm.backends; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'rosidl_runtime_py', 'std_msgs', "
            "'sensor_msgs')); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"core imported ROS modules: {result.stdout} {result.stderr}"
