"""The model in plain PyTorch (no ROS): LLaMA-family decoders, alone (``CausalLM``), behind a
CLIP/SigLIP tower and projector (``LlavaModel``) or a SigLIP tower and pixel-shuffle connector
(``Idefics3Model``: SmolVLM), from Hugging Face folders or GGUF files."""
from .causal_lm import CausalLM
from .checkpoint import CheckpointFiles, load_model, locate
from .config import CausalLMConfig, Idefics3Config, LlavaConfig, TextConfig, VisionConfig, load_config
from .decoder import Decoder, StepOutput
from .idefics3 import Idefics3Model
from .llava import LlavaModel

__all__ = ["load_model", "locate", "CheckpointFiles", "load_config", "CausalLM", "CausalLMConfig", "LlavaConfig",
           "Idefics3Config", "TextConfig", "VisionConfig", "LlavaModel", "Idefics3Model", "Decoder", "StepOutput"]
