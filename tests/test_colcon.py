"""The package built as ROS users build it: ``colcon build`` in a fresh workspace (colcon and
colcon-ros from PyPI), its install space checked, and the installed node run from it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import numpy as np
from sensor_msgs.msg import Image

from test_node import Probe
from ros_infmllm.ros.conversion import rgb_to_image_fields
from ros_infmllm.ros.entry import spinning

ROOT = Path(__file__).resolve().parents[1]
EXECUTABLES = ("infmllm_node", "infmllm_play", "infmllm_make_bag", "infmllm_demo", "infmllm_synthetic_camera",
               "infmllm_export")


def _tracked_files() -> list[str]:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.fail(f"the colcon test copies the package's tracked files: git ls-files failed: {listed.stderr}")
    return [line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``colcon build --packages-select ros_infmllm`` of a copy of this checkout; its install prefix."""
    workspace = tmp_path_factory.mktemp("ros2_ws")
    package = workspace / "src" / "ros_infmllm"
    for name in _tracked_files():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, package / name)
    colcon = shutil.which("colcon") or str(Path(sys.executable).parent / "colcon")
    built = subprocess.run([colcon, "build", "--packages-select", "ros_infmllm"], cwd=workspace,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return workspace / "install" / "ros_infmllm"


def _installed_env(prefix: Path) -> dict[str, str]:
    """What ``source install/setup.bash`` gives a shell: the install space first on the paths."""
    (site,) = prefix.glob("lib/python*/site-packages")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "PATH": os.pathsep.join([str(prefix / "lib" / "ros_infmllm"), os.environ["PATH"]]),
            "AMENT_PREFIX_PATH": str(prefix)}


def test_install_space_holds_executables_launch_config_model_and_index(install: Path) -> None:
    for name in EXECUTABLES:
        executable = install / "lib" / "ros_infmllm" / name
        assert executable.is_file() and os.access(executable, os.X_OK), name
    share = install / "share" / "ros_infmllm"
    assert (share / "launch" / "infmllm.launch.py").is_file() and (share / "config" / "infmllm.yaml").is_file()
    assert (share / "config" / "fastdds_large_frames.xml").is_file()  # the launch file points Fast DDS at it
    assert (share / "package.xml").is_file()
    assert (install / "share" / "ament_index" / "resource_index" / "packages" / "ros_infmllm").is_file()
    (site,) = install.glob("lib/python*/site-packages")
    assert (site / "ros_infmllm" / "demo_model" / "config.json").is_file()
    where = subprocess.run([sys.executable, "-c", "import ros_infmllm; print(ros_infmllm.__file__)"], cwd=install,
                           env=_installed_env(install), capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))  # the installed copy, not this checkout


def test_installed_node_starts_and_answers_a_question(install: Path, ros_context) -> None:
    node = subprocess.Popen([str(install / "lib" / "ros_infmllm" / "infmllm_node")], env=_installed_env(install),
                            cwd=install, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = Probe()
    try:
        with spinning(probe.node):
            frame = Image(**rgb_to_image_fields(np.full((48, 64, 3), 90, np.uint8)))
            for _ in range(60):  # a frame and the question go out until the node has discovered us and answers
                probe.images.publish(frame)
                probe.ask("what is in view ?")
                if any(not a.startswith("busy") for a in probe.answers):
                    break
                try:
                    node.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    continue
                pytest.fail(f"installed node exited: {node.stdout.read()}")
            probe.wait_answers(1, timeout=30.0)
            answers = [a for a in probe.answers if not a.startswith("busy: no camera frame")]
        assert answers and answers[0] and not answers[0].startswith(("error", "busy")), probe.answers
    finally:
        probe.node.destroy_node()
        node.terminate()
        node.wait(timeout=30)
