"""The model in plain PyTorch (no ROS): LLaMA-family decoders, alone (``CausalLM``) or behind a
CLIP/SigLIP tower and projector (``LlavaModel``), from Hugging Face folders or GGUF files."""
from .causal_lm import CausalLM
from .checkpoint import CheckpointFiles, load_model, locate
from .config import CausalLMConfig, LlavaConfig, TextConfig, VisionConfig, load_config
from .decoder import Decoder, StepOutput
from .llava import LlavaModel

__all__ = ["load_model", "locate", "CheckpointFiles", "load_config", "CausalLM", "CausalLMConfig", "LlavaConfig",
           "TextConfig", "VisionConfig", "LlavaModel", "Decoder", "StepOutput"]
