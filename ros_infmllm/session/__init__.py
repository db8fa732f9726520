"""The streaming session (no ROS): frames and questions in, answers out, over a bounded cache."""
from .preprocess import ImagePreprocessor, validate_rgb
from .sampling import SamplingConfig, sample_next
from .session import SessionConfig, SessionStats, StreamingSession, checkpoint_template
from .templates import PRESETS, PromptTemplate, template_for

__all__ = ["ImagePreprocessor", "validate_rgb", "SamplingConfig", "sample_next", "SessionConfig", "SessionStats",
           "StreamingSession", "checkpoint_template", "PRESETS", "PromptTemplate", "template_for"]
