"""Calibrated int4 weights for the demo VLM: ``python -m ros_infmllm.demo.calibrate_vlm --out DIR``.

Why: the demo VLM is SmolLM2 with LoRA updates merged into its projections, and round-to-nearest
int4 loses most of those updates (docs/quantized_weights.md: memory questions 58.7% -> 23.9%).
GPTQ or AWQ (``tools/calibrate.py``, llm-compressor) rounds them knowing the layers' inputs. The
samples are episodes of the training world laid out token for token as the session writes them
(frames, questions, answers), from seeds below ``train_vlm.VALIDATION_SEED``: the evaluation's
held-out streams (seeds above 30M) are never seen. The folder written loads with
``weights: auto`` (packed as calibrated) like any compressed-tensors checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..tools.calibrate import METHODS, calibrate, collate_one
from .episodes import CHAT, make_episode
from .train_vlm import VALIDATION_SEED, Layout


def episode_samples(folder: Path, count: int, frames: int, seed: int) -> list[dict]:
    """``count`` training-world episodes of ``frames`` frames as the model's inputs (token ids,
    mask, normalised frames)."""
    from ..model.smollm2 import smollm2_path

    config = json.loads((folder / "config.json").read_text())
    patch = int(config["vision_config"]["patch_size"])
    layout = Layout(smollm2_path(), int(config["image_seq_length"]), patch)
    seeds = np.random.default_rng(seed).integers(0, VALIDATION_SEED, count)
    samples = []
    for episode_seed in seeds:
        batch = layout.collate([make_episode(int(episode_seed), frames, question_rate=0.4, memory_share=0.6,
                                             questions=CHAT)])
        samples.append({"input_ids": batch["input_ids"][0].tolist(), "attention_mask": batch["attention_mask"][0].tolist(),
                        "pixel_values": batch["pixel_values"].numpy()})
    return samples


def main(argv: list[str] | None = None) -> int:
    from transformers import LlavaForConditionalGeneration

    from .vlm import demo_vlm_path

    parser = argparse.ArgumentParser(prog="python -m ros_infmllm.demo.calibrate_vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the calibrated folder to write (must not exist)")
    parser.add_argument("--method", choices=METHODS, default="gptq",
                        help="GPTQ (symmetric groups) or AWQ (channel scaling, groups with zero points)")
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--samples", type=int, default=64, help="training-world episodes")
    parser.add_argument("--frames", type=int, default=8, help="frames per episode")
    parser.add_argument("--seed", type=int, default=0, help="draws the episodes' seeds")
    args = parser.parse_args(argv)
    folder = demo_vlm_path()
    samples = episode_samples(folder, args.samples, args.frames, args.seed)
    record = calibrate(folder, args.out, samples, collate_one, args.method, 4, args.group,
                       model_class=LlavaForConditionalGeneration,
                       note={"episodes": "training world, seeds below VALIDATION_SEED", "frames": args.frames,
                             "seed": args.seed})
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
