"""Qwen2-VL and Qwen2.5-VL: our model against transformers on small random checkpoints (the
tower at several image sizes, Qwen2.5-VL's windows, M-RoPE), and streaming them through a
session: frames at cache-relative M-RoPE positions, exact after evictions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import IMAGE_TOKEN, build_tiny_qwen2_vl, frame_and_question_logits
from ros_infmllm.backends import TorchBackend
from ros_infmllm.cache import BoundedKVCache, make_policy
from ros_infmllm.errors import CheckpointError
from ros_infmllm.model import Qwen2VLModel, load_model
from ros_infmllm.model.qwen2_vl import patchify
from ros_infmllm.rope import Rotary
from ros_infmllm.session import StreamingSession
from ros_infmllm.session.preprocess import smart_resize

VARIANTS = ["qwen2_vl", "qwen2_5_vl"]
# (height, width) pixel sizes, patch 4 and merge 2: 4x3, 2x6 and 5x5 merged tokens; with
# Qwen2.5-VL's 16-pixel windows (2x2 tokens) the grids split into whole and partial windows.
IMAGE_SIZES = [(32, 24), (16, 48), (40, 40)]


@pytest.fixture(scope="module", params=VARIANTS)
def qwen(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp(request.param)
    return path, build_tiny_qwen2_vl(path, request.param)


def _images(sizes: list[tuple[int, int]], model: Qwen2VLModel, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened patches and ``image_grid_thw`` as transformers' processor gives them."""
    generator = torch.Generator().manual_seed(seed)
    patch = model.cfg.vision.patch_size
    pixels = [patchify(torch.randn(1, 3, h, w, generator=generator), model.cfg.vision) for h, w in sizes]
    return torch.cat(pixels), torch.tensor([[1, h // patch, w // patch] for h, w in sizes])


def _prompt(token_counts: list[int]) -> torch.Tensor:
    ids = [10, 23, 24]
    for count in token_counts:
        ids += [61] + [IMAGE_TOKEN] * count + [62, 20, 21]  # <|vision_start|> ... <|vision_end|>
    return torch.tensor([ids + [30, 31]])


def test_text_only_logits_equal_transformers(qwen) -> None:
    path, theirs = qwen
    ours = load_model(path)
    assert isinstance(ours, Qwen2VLModel)
    ids = torch.tensor([[10, 23, 24, 20, 21, 30]])
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits[0]
    assert (ours.forward_full(ids)[0] - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("sizes", [IMAGE_SIZES[:1], IMAGE_SIZES[1:2], IMAGE_SIZES], ids=["4x3", "2x6", "three"])
def test_image_logits_equal_transformers(qwen, sizes: list[tuple[int, int]]) -> None:
    """Images of several sizes in one prompt, fed as transformers takes them (flattened patches,
    ``image_grid_thw``, ``mm_token_type_ids``): dynamic resolution, windows and M-RoPE together."""
    path, theirs = qwen
    ours = load_model(path)
    pixels, grids = _images(sizes, ours)
    ids = _prompt([int(t * h * w) // 4 for t, h, w in grids.tolist()])
    inputs = dict(pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=(ids == IMAGE_TOKEN).int())
    with torch.no_grad():
        expected = theirs(input_ids=ids, **inputs).logits[0]
    got = ours.forward_full(ids, **inputs)[0]
    assert (got - expected).abs().max().item() <= 1e-4
    other, _ = _images(sizes, ours, seed=1)
    assert (ours.forward_full(ids, **{**inputs, "pixel_values": other})[0] - got).abs().max().item() > 1e-3


def test_frames_as_pixels_encode_like_flattened_patches(qwen) -> None:
    """The session's form (``[N, 3, H, W]``, patchified inside) gives transformers' form's tokens."""
    path, _ = qwen
    ours = load_model(path)
    frames = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(3))
    flat = ours.encode_images(patchify(frames, ours.cfg.vision), torch.tensor([[1, 8, 6]] * 2))
    stacked = ours.encode_images(frames)
    assert stacked.shape == (2, 12, ours.cfg.text.hidden_size)
    assert torch.allclose(stacked.reshape(1, 24, -1), flat, atol=1e-5)


def test_the_qwen_teams_flat_config_loads_the_same_model(tmp_path: Path) -> None:
    """Files as the Qwen team published them: decoder fields at the top level, ``in_chans``,
    ``rope_scaling: {type: mrope}``."""
    theirs = build_tiny_qwen2_vl(tmp_path, "qwen2_5_vl", flat_config=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" not in raw and raw["rope_scaling"]["type"] == "mrope"
    ours = load_model(tmp_path)
    assert ours.cfg.text.mrope_section == (2, 3, 3) and ours.cfg.vision.full_attention_blocks == (1,)
    ids = torch.tensor([[10, 23, 24, 20, 21, 30]])
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits[0]
    assert (ours.forward_full(ids)[0] - expected).abs().max().item() <= 1e-4


def test_bad_mrope_sections_and_window_sizes_are_refused(tmp_path: Path) -> None:
    build_tiny_qwen2_vl(tmp_path, "qwen2_5_vl")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 2]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="mrope_section"):
        load_model(tmp_path)
    raw["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]
    raw["vision_config"]["window_size"] = 12
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="window_size"):
        load_model(tmp_path)


@pytest.mark.parametrize("size", [(480, 640), (720, 1280), (100, 900), (10, 900), (37, 53)])
def test_smart_resize_keeps_multiples_of_a_token_within_the_pixel_budget(size: tuple[int, int]) -> None:
    factor, low, high = 28, 56 * 56, 28 * 28 * 256
    h, w = smart_resize(*size, factor, low, high)
    assert h % factor == 0 and w % factor == 0 and low <= h * w <= high
    if min(size) >= factor:  # the aspect survives as nearly as whole tokens allow
        assert abs(math.log((h / w) / (size[0] / size[1]))) < 0.3
    assert smart_resize(480, 640, 28, low, 28 * 28 * 1280) == (476, 644)  # round(480/28)=17, round(640/28)=23


def _session(path: Path, policy: str = "full", backend=None, **config) -> StreamingSession:
    options = dict(capacity=256, max_chunk=8, max_new_tokens=4, system_prompt="hello robot")
    options.update(config)
    session = StreamingSession.from_pretrained(path, policy=policy, **options)
    if backend is not None:
        session = StreamingSession(session.model, session.tokenizer, make_policy(policy), session.config,
                                   session.template, session.preprocessor, backend(session.model))
    return session


def _frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 3 * (i % 2), 44, 3), dtype=np.uint8) for i in range(count)]


def test_a_session_streams_frames_at_cache_relative_mrope_positions(qwen) -> None:
    """Frames of the stream's own size between ``<|vision_start|>`` and ``<|vision_end|>``; each
    frame's grid ends where its slots end (``stream_position_offsets``). The cache's logits equal
    transformers' model fed the whole stream at those positions."""
    path, theirs = qwen
    session = _session(path)
    assert session.preprocessor.height % 8 == 0 and session.image_tokens_per_frame > 0
    system = session.cache.length
    ids, positions, patches, grids, got = [], [], [], [], []
    for frame in _frames(2):
        frame_ids, features, offsets = session.frame_inputs(frame)
        pixels = session.preprocessor(frame)
        rows, cols = session.model.frame_grid(pixels)
        assert frame_ids.tolist().count(IMAGE_TOKEN) == rows * cols == features.shape[1]
        slots = torch.arange(session.cache.length, session.cache.length + frame_ids.shape[0])
        positions.append(slots + offsets)
        got.append(session.feed(frame_ids, features, all_logits=True, position_offsets=offsets))
        ids += frame_ids.tolist()
        patches.append(patchify(pixels, session.model.cfg.vision))
        grids.append([1, 2 * rows, 2 * cols])
    grid = positions[0][:, frame_ids == IMAGE_TOKEN]
    assert grid[1].max() - grid[1].min() == rows - 1 and grid[2].max() - grid[2].min() == cols - 1
    assert int(grid.max()) == system + frame_ids.tolist().index(62) - 1  # the grid ends before <|vision_end|>
    full_ids = torch.tensor([session._system_ids() + ids])
    full_positions = torch.cat([torch.arange(system).expand(3, -1)] + positions, dim=1)
    with torch.no_grad():
        expected = theirs(input_ids=full_ids, pixel_values=torch.cat(patches), image_grid_thw=torch.tensor(grids),
                          position_ids=full_positions.unsqueeze(1)).logits[0, system:]
    assert (torch.cat(got) - expected).abs().max().item() <= 1e-4
    assert isinstance(session.answer("what is in view ?", max_new_tokens=4), str)


class MropeRecordingBackend(TorchBackend):
    """The torch backend, keeping each step's new K/V (keys turned back to position 0), the
    M-RoPE positions they were written at and the slot each was written to."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.raw_k, self.raw_v, self.positions, self.slots = [], [], [], []

    def step(self, embeds, cache_k, cache_v, valid, positions, *args, **kwargs):
        out = super().step(embeds, cache_k, cache_v, valid, positions, *args, **kwargs)
        count = embeds.shape[0]
        triple = positions if positions.dim() == 2 else positions.expand(3, -1)
        cos, sin = self.model.decoder.rotary.cos_sin(-triple, torch.float32)
        self.raw_k.append(Rotary.apply(out.new_k.float(), cos, sin))
        self.raw_v.append(out.new_v.clone())
        self.positions.append(triple.clone())
        self.slots.append(int(valid.sum()) + torch.arange(count))
        return out


def _evicted_stream(path: Path, policy: str, **config) -> StreamingSession:
    """Eight frames through a 96-slot cache (two evictions at least), each step's K/V recorded."""
    session = _session(path, policy, backend=MropeRecordingBackend, capacity=96, **config)
    for frame in _frames(8):
        session.ingest_frame(frame)
    assert session.cache.evictions >= 2
    return session


def _kept_rows(session: StreamingSession) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Per layer and head, the kept tokens' recorded rows in slot order: their keys rotated afresh at
    the renumbered M-RoPE positions (each component moved by new slot - slot it was written to),
    the same keys unrotated, their values; and whether a kept token's components differ from its slot."""
    cache, recorded = session.cache, session.backend
    raw_k, raw_v = torch.cat(recorded.raw_k, 2), torch.cat(recorded.raw_v, 2)
    written_at, slots = torch.cat(recorded.positions, 1), torch.cat(recorded.slots)
    n = cache.length
    keys, unrotated, values = (torch.zeros(cache.k[:, :, :n].shape) for _ in range(3))
    offsets_kept = False
    for layer in range(cache.k.shape[0]):
        for head in range(cache.k.shape[1]):
            origin = cache.origin[layer, head, :n]
            renumbered = written_at[:, origin] + (torch.arange(n) - slots[origin])
            offsets_kept |= bool((renumbered != torch.arange(n)).any())
            unrotated[layer, head] = raw_k[layer, head, origin]
            keys[layer, head] = Rotary.apply(unrotated[layer, head], *cache.rotary.cos_sin(renumbered, torch.float32))
            values[layer, head] = raw_v[layer, head, origin]
    return keys, unrotated, values, offsets_kept


def _float_cache_logits(session: StreamingSession, keys: torch.Tensor, values: torch.Tensor
                        ) -> tuple[BoundedKVCache, torch.Tensor, torch.Tensor]:
    """A float cache holding ``keys`` and ``values``, the next token (what the session is fed after),
    and the decoder's logits for it over that cache at the session's next position."""
    cache = session.cache
    fresh = BoundedKVCache(*cache.k.shape[:2], cache.capacity, cache.k.shape[-1], cache.rotary)
    fresh.append(keys, values)
    token = torch.tensor([session.tokenizer.token_to_id("what")])
    with torch.inference_mode():
        reference = session.model.decoder.step(session.model.embed_tokens(token), fresh.k, fresh.v, fresh.valid(),
                                               cache.positions(1)).logits[-1]
    return fresh, token, reference


@pytest.mark.parametrize("policy", ["streamingllm", "h2o", "inf-mllm"])
def test_after_evictions_the_cache_equals_keys_rotated_afresh_at_renumbered_positions(qwen, policy: str) -> None:
    """M-RoPE renumbering on eviction: a kept token's three components move by (new slot - slot it
    was written to). Every layer and head: the compacted cache equals one rebuilt from the
    recorded unrotated K/V rotated from scratch at those renumbered positions, so the next
    step's logits agree (each head keeps its own subset of the stream)."""
    path, _ = qwen
    session = _evicted_stream(path, policy)
    keys, _, values, _ = _kept_rows(session)
    fresh, token, reference = _float_cache_logits(session, keys, values)
    n = session.cache.length
    assert torch.allclose(fresh.k[:, :, :n], session.cache.k[:, :, :n], atol=1e-4)
    assert (session.feed(token) - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("policy", ["streamingllm", "h2o"])
def test_an_int8_cache_holds_mrope_keys_through_evictions(qwen, policy: str) -> None:
    """An int8 cache under M-RoPE: each key is stored turned back by its slot (so still turned by
    its frame's per-component offsets) and rounded once; after evictions, read back and turned by
    the slot it now holds, every kept key is the float cache's key at its renumbered M-RoPE
    position to within that rounding, and the next step's logits follow a float cache built from
    them. Turning the recorded unrotated keys by their slots alone (dropping the offsets) is far off."""
    from ros_infmllm.cache.kv_codes import read_keys

    path, _ = qwen
    session = _evicted_stream(path, policy, kv_cache_dtype="int8")
    cache = session.cache
    assert cache.k.dtype == torch.int8
    keys, unrotated, values, offsets_kept = _kept_rows(session)
    assert offsets_kept  # frame tokens whose components differ from their slots were kept
    n = cache.length
    by_slot = cache.rotary.rotate(unrotated, torch.arange(n))
    read = read_keys(cache.k, cache.k_scale, cache.read_cos, cache.read_sin, torch.float32)[:, :, :n]
    scale = cache.k_scale[:, :, :n].unsqueeze(-1)
    assert bool(((read - keys).abs() <= 2 ** 0.5 * scale * 0.51 + 1e-3 * keys.abs()).all())  # one rounding
    assert float((read - by_slot).abs().max()) > 20 * float(scale.max())  # the offsets are in the codes
    _, token, reference = _float_cache_logits(session, keys, values)
    with torch.inference_mode():
        got = session.feed(token)
    assert float((got - reference).norm() / reference.norm()) < 5e-3  # the int8 rows' rounding only (about 5e-4)
    assert int(got.argmax()) == int(reference.argmax())


def test_frames_of_another_size_take_their_own_token_count(qwen) -> None:
    """Dynamic resolution in a stream: a larger camera frame gives more visual tokens; both sizes
    stream into one cache."""
    path, _ = qwen
    session = _session(path, "h2o", capacity=512)
    small, large = (np.full(shape, 90, np.uint8) for shape in ((24, 32, 3), (48, 64, 3)))
    before = session.cache.length
    session.ingest_frame(small)
    small_tokens = session.cache.length - before
    session.ingest_frame(large)
    assert session.cache.length - before - small_tokens > small_tokens
    assert session.stats.frames_ingested == 2


def test_pixel_budget_parameters_set_the_tokens_per_frame(qwen) -> None:
    path, _ = qwen
    small = _session(path, max_pixels=32 * 32)
    large = _session(path, min_pixels=64 * 64, max_pixels=96 * 96)
    assert small.image_tokens_per_frame < large.image_tokens_per_frame
    with pytest.raises(ValueError, match="min_pixels"):
        _session(path, min_pixels=96 * 96, max_pixels=64 * 64)
    with pytest.raises(ValueError, match="visual_pool"):
        _session(path, visual_pool=2)


def test_the_node_streams_qwen2_vl_frames_and_answers(ros_context, tmp_path: Path) -> None:
    """Real rclpy and DDS: the node loads a Qwen2.5-VL folder, takes raw and JPEG frames of two
    camera sizes (each at its own token count, within ``vision.max_pixels``) and answers."""
    import cv2
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage, Image

    from ros_infmllm.ros.conversion import rgb_to_image_fields
    from ros_infmllm.ros.entry import spinning
    from ros_infmllm.ros.node import InfMLLMNode
    from test_node import Probe, _wait

    build_tiny_qwen2_vl(tmp_path, "qwen2_5_vl")
    overrides = [Parameter("model_path", value=str(tmp_path)), Parameter("capacity", value=256),
                 Parameter("max_chunk", value=16), Parameter("frame_rate", value=100.0),
                 Parameter("max_new_tokens", value=4), Parameter("vision.max_pixels", value=48 * 48),
                 Parameter("image_topics", value=["/camera/image_raw", "/camera/image_raw/compressed"])]
    node = InfMLLMNode(parameter_overrides=overrides)
    probe = Probe()
    assert node.session.preprocessor.max_pixels == 48 * 48
    try:
        with spinning(node, probe.node, executor=MultiThreadedExecutor()):
            _wait(lambda: node.count_subscribers("/infmllm/answer") > 0 and probe.queries.get_subscription_count() > 0)
            rng = np.random.default_rng(0)
            probe.images.publish(Image(**rgb_to_image_fields(rng.integers(0, 256, (30, 40, 3), np.uint8), "rgb8")))
            _wait(lambda: node.worker.counters.frames_ingested >= 1)
            ok, jpeg = cv2.imencode(".jpg", rng.integers(0, 256, (120, 160, 3), np.uint8))
            probe.compressed.publish(CompressedImage(format="jpeg", data=jpeg.tobytes()))
            _wait(lambda: node.worker.counters.frames_ingested >= 2)
            probe.ask("what is in view ?")
            answer = probe.wait_answers(1)[0]
            assert not answer.startswith(("error", "busy")), answer
            assert set(node.session._frame_offsets) == {(4, 5), (5, 6)}  # 32x40 and 40x48 pixels: two grids
    finally:
        node.destroy_node()
        probe.node.destroy_node()


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_export_gives_torch_logits_in_onnxruntime(tmp_path: Path, variant: str) -> None:
    """infmllm_export writes this family's graphs (the step takes M-RoPE positions [3, q]; the
    vision graph one frame of the stream's size); the onnxruntime backend then ingests a frame,
    a question and its greedy answer with the torch backend's logits."""
    from ros_infmllm.export.cli import main as export

    build_tiny_qwen2_vl(tmp_path / "model", variant)
    assert export(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "onnx"), "--capacity", "128",
                   "--max-chunk", "16", "--max-pixels", str(40 * 48), "--engines", "no"]) == 0
    spec = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["graphs"]
    assert spec["decoder_step"]["inputs"][1]["shape"] == [3, "q"]
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # the VGA camera it assumes
    logits = []
    for backend, options in (("torch", {}), ("onnxruntime", {"engine_dir": tmp_path / "onnx"})):
        session = StreamingSession.from_pretrained(tmp_path / "model", policy="h2o", capacity=128, max_chunk=16,
                                                   max_pixels=40 * 48, backend=backend, **options)
        logits.append(frame_and_question_logits(session, frame))
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4


def test_tensorrt_rtx_builds_engines_for_a_tiny_qwen2_5_vl(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is in the test extras")
    from ros_infmllm.export import export_onnx
    from ros_infmllm.export.trt_build import build_engines

    build_tiny_qwen2_vl(tmp_path / "model", "qwen2_5_vl")
    export_onnx(tmp_path / "model", tmp_path / "out", capacity=128, max_chunk=16, max_pixels=40 * 48)
    manifest = build_engines(tmp_path / "out", "tensorrt_rtx", ["SM86"], progress=False)
    for spec in manifest.graphs.values():
        assert spec.engine and (tmp_path / "out" / spec.engine).stat().st_size > 10_000
