"""The synthetic camera world, its questions and the demo model trained on it (no ROS)."""
from pathlib import Path


def bundled_model_path() -> Path:
    """Folder of the demo model shipped with the package (trained by ``ros_infmllm.demo.train``)."""
    return Path(__file__).resolve().parent.parent / "demo_model"
