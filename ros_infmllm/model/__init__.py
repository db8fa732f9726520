"""The model in plain PyTorch (no ROS): LLaMA-family decoders, alone (``CausalLM``), behind a
CLIP/SigLIP tower and projector (``LlavaModel``) or a SigLIP tower and pixel-shuffle connector
(``Idefics3Model``: SmolVLM) or a dynamic-resolution tower and M-RoPE decoder (``Qwen2VLModel``:
Qwen2-VL, Qwen2.5-VL), from Hugging Face folders or GGUF files."""
from .causal_lm import CausalLM
from .checkpoint import CheckpointFiles, load_model, locate
from .config import (CausalLMConfig, Idefics3Config, LlavaConfig, Qwen2VLConfig, QwenVisionConfig, TextConfig,
                     VisionConfig, load_config)
from .decoder import Decoder, StepOutput
from .idefics3 import Idefics3Model
from .llava import LlavaModel
from .qwen2_vl import Qwen2VLModel

__all__ = ["load_model", "locate", "CheckpointFiles", "load_config", "CausalLM", "CausalLMConfig", "LlavaConfig",
           "Idefics3Config", "TextConfig", "VisionConfig", "LlavaModel", "Idefics3Model", "Qwen2VLConfig", "QwenVisionConfig", "Qwen2VLModel",
           "Decoder", "StepOutput"]
