"""The multimodal model in plain PyTorch (no ROS): LLaVA layout, CLIP/SigLIP tower, LLaMA-family decoder."""
from .checkpoint import load_model
from .config import LlavaConfig, TextConfig, VisionConfig, load_config
from .decoder import Decoder, StepOutput
from .llava import LlavaModel

__all__ = ["load_model", "load_config", "LlavaConfig", "TextConfig", "VisionConfig", "LlavaModel", "Decoder",
           "StepOutput"]
