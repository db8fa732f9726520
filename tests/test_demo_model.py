"""The bundled demo model and the script that trains it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ros_infmllm.demo import bundled_model_path
from ros_infmllm.demo.episodes import make_episode
from ros_infmllm.demo.train import main as train_main
from ros_infmllm.model import load_model
from ros_infmllm.session import StreamingSession


def test_bundled_model_is_a_small_llava_checkpoint() -> None:
    path = bundled_model_path()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 20 * 1024 * 1024
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    model = load_model(path)
    assert model.cfg.vision.model_type == "siglip_vision_model" and model.cfg.text.model_type == "qwen2"
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.json", "training.json"):
        assert (path / name).is_file()


def test_bundled_model_answers_current_scene_questions_on_held_out_streams() -> None:
    session_args = dict(policy="full", capacity=1024, max_chunk=64, max_new_tokens=12)
    right = total = 0
    for seed in range(40_000_000, 40_000_012):
        episode = make_episode(seed, 6, question_rate=0.6, memory_share=0.0)
        session = StreamingSession.from_pretrained(bundled_model_path(), **session_args)
        for kind, item in episode.events:
            if kind == "frame":
                session.ingest_frame(episode.frames[item])
            else:
                total += 1
                right += session.answer(item.question) == item.answer
    assert total >= 20 and right / total >= 0.95, f"{right}/{total}"


def test_training_script_writes_a_checkpoint_our_loader_reads(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert train_main(["--out", str(out), "--size", "tiny", "--max-steps", "3", "--batch", "2", "--workers", "0",
                       "--max-frames", "3", "--device", "cpu", "--minutes", "5", "--validation-episodes", "32"]) == 0
    meta = json.loads((out / "training.json").read_text())
    assert meta["steps"] == 3
    session = StreamingSession.from_pretrained(out, capacity=256, max_chunk=32, max_new_tokens=3)
    assert session.template.name == "demo"
    session.ingest_frame(np.zeros((64, 64, 3), np.uint8))
    assert isinstance(session.answer("what is in view ?"), str)
