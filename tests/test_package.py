"""Package files: parameter file, launch file, package.xml and installed executables agree."""
from __future__ import annotations

import ast
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from ros_infmllm.ros.params import PARAMS

ROOT = Path(__file__).resolve().parents[1]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_parameter_file_has_exactly_the_declared_parameters_with_their_defaults() -> None:
    data = yaml.safe_load((ROOT / "config" / "infmllm.yaml").read_text())
    values = _flatten(data["/**"]["ros__parameters"])
    assert values == {spec.name: spec.default for spec in PARAMS}


def test_launch_file_declares_its_arguments_and_names_the_installed_executable() -> None:
    source = (ROOT / "launch" / "infmllm.launch.py").read_text()
    tree = ast.parse(source)  # valid Python; `launch` itself is not installable here
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert {"model_path", "image_topic", "params_file", "backend", "namespace"} <= strings
    assert {"infmllm_node", "ros_infmllm", "infmllm.yaml"} <= strings
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)


def test_console_scripts_are_installed() -> None:
    bin_dir = Path(sys.executable).parent
    for script in ("infmllm_node", "infmllm_play", "infmllm_make_bag", "infmllm_demo", "infmllm_synthetic_camera"):
        assert shutil.which(script, path=str(bin_dir)), f"{script} not installed in {bin_dir}"


def test_package_xml_is_format_3_with_runtime_dependencies() -> None:
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "ros_infmllm"
    depends = {d.text for d in root.findall("exec_depend")}
    assert {"rclpy", "std_msgs", "sensor_msgs", "diagnostic_msgs"} <= depends
    assert root.find("export/build_type").text == "ament_python"


def test_each_policy_gets_its_parameters_and_builds_from_them() -> None:
    from ros_infmllm.cache import make_policy
    from ros_infmllm.ros.params import policy_options

    defaults = {spec.name: spec.default for spec in PARAMS}
    for policy in ("full", "streamingllm", "h2o", "inf-mllm", "inf-mllm-paper", "inf-mllm-lt", "look-m", "h2o-kinds"):
        options = policy_options({**defaults, "policy": policy})
        assert make_policy(policy, **options).name == policy
    both = policy_options({**defaults, "policy": "inf-mllm-lt", "inf_mllm.retrieval_window": 8,
                           "inf_mllm_lt.stretch": 16})
    assert both["retrieval_window"] == 8 and both["stretch"] == 16 and "sinks" not in both
    kinds = policy_options({**defaults, "policy": "h2o-kinds", "h2o.recent_fraction": 0.25, "streamingllm.sinks": 8})
    assert kinds == {"recent_fraction": 0.25, "sinks": 8}
