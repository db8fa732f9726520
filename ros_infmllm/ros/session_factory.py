"""The streaming session that node parameters describe, without ROS: the node builds its session
here, and benchmarks/capture_check.py builds the same one on a machine without ROS 2."""
from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from . import params as P


def build_session(values: dict[str, Any]):
    """The streaming session the parameters describe (imports torch only here)."""
    import torch

    from ..session import SamplingConfig, StreamingSession

    model_path = values["model_path"] or default_model_path()
    if model_path == DEMO_VLM:
        from ..demo.vlm import demo_vlm_path

        model_path = str(demo_vlm_path())  # assembled on first use, with progress on stderr
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(values["dtype"])
    return StreamingSession.from_pretrained(
        model_path, policy=values["policy"], policy_options=P.policy_options(values), device=values["device"],
        dtype=dtype, backend=values["backend"], engine_dir=values["engine_dir"] or None, weights=values["weights"],
        lm_head_weights=values["lm_head_weights"], embedding_weights=values["embedding_weights"],
        vision_weights=values["vision_weights"],
        mmproj=values["mmproj_path"] or None, capacity=values["capacity"], kv_cache_dtype=values["kv_cache_dtype"],
        max_chunk=values["max_chunk"],
        slack_fraction=values["slack_fraction"], template=values["template"],
        system_prompt=values["system_prompt"] or None, max_new_tokens=values["max_new_tokens"],
        max_query_chars=values["max_query_chars"], max_query_tokens=values["max_query_tokens"],
        sampling=SamplingConfig(values["temperature"], values["top_p"], values["seed"]),
        visual_pool=values["visual_tokens.pool"], merge_evicted=values["visual_tokens.merge"],
        drop_layers=P.drop_layers(values["visual_tokens.drop_layers"]), drop_keep=values["visual_tokens.drop_keep"],
        min_pixels=values["vision.min_pixels"], max_pixels=values["vision.max_pixels"],
        image_splitting=values["vision.image_splitting"])


DEMO_VLM = "demo-vlm"  # model_path naming the demo VLM


def default_model_path() -> str:
    """The tiny bundled model, used when ``model_path`` is empty."""
    from ..demo import bundled_model_path

    path = bundled_model_path()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"parameter model_path is empty and the bundled demo model is missing at {path}: "
                              "reinstall the package or set model_path")
    return str(path)
