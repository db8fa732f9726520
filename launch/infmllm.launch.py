"""ros2 launch ros_infmllm infmllm.launch.py [model_path:=DIR|FILE.gguf|demo-vlm] [mmproj_path:=FILE.gguf]
[image_topic:=TOPIC] [params_file:=YAML]
[backend:=torch|onnxruntime|tensorrt] [engine_dir:=DIR] [namespace:=NS] [dds_profile:=XML]

Starts the infmllm node with the package's default parameter file (or the one given); the
arguments given here override the file. Processes started here get FASTDDS_DEFAULT_PROFILES_FILE =
``dds_profile`` (default: the package's config/fastdds_large_frames.xml), without which Fast DDS
delivers only a few percent of 640x480 rgb8 frames; a camera driver started elsewhere needs it too."""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    "model_path": ("", "Checkpoint folder or .gguf file; demo-vlm for the demo VLM; empty for the tiny test model"),
    "mmproj_path": ("", "llama.cpp mmproj .gguf for a .gguf model_path"),
    "image_topic": ("/camera/image_raw", "Camera topic (…/compressed for CompressedImage)"),
    "params_file": (None, "Parameter YAML (default: the package's config/infmllm.yaml)"),
    "backend": ("torch", "Inference backend: torch, onnxruntime or tensorrt"),
    "engine_dir": ("", "Folder written by infmllm_export (onnxruntime and tensorrt backends)"),
    "namespace": ("", "Namespace for the node"),
    "dds_profile": (None, "Fast DDS XML profile (default: the package's config/fastdds_large_frames.xml)"),
}


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("ros_infmllm")
    defaults = {"params_file": PathJoinSubstitution([share, "config", "infmllm.yaml"]),
                "dds_profile": PathJoinSubstitution([share, "config", "fastdds_large_frames.xml"])}
    declared = [
        DeclareLaunchArgument(name, default_value=default if default is not None else defaults[name],
                              description=description)
        for name, (default, description) in ARGUMENTS.items()
    ]
    dds_profile = SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("dds_profile"))
    node = Node(
        package="ros_infmllm",
        executable="infmllm_node",
        name="infmllm",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "model_path": LaunchConfiguration("model_path"),
                "mmproj_path": LaunchConfiguration("mmproj_path"),
                "image_topics": [LaunchConfiguration("image_topic")],
                "backend": LaunchConfiguration("backend"),
                "engine_dir": LaunchConfiguration("engine_dir"),
            },
        ],
    )
    return LaunchDescription(declared + [dds_profile, node])
