"""SmolVLM (transformers' Idefics3 layout): our model against transformers on small random
checkpoints, and streaming it through a session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from builders import IMAGE_TOKEN, build_tiny_idefics3, frame_and_question_logits
from ros_infmllm.errors import CheckpointError
from ros_infmllm.model import Idefics3Model, load_model
from ros_infmllm.session import StreamingSession

SIZES = [(32, 4, 2), (48, 8, 2), (32, 4, 4)]  # (image size, patch, scale): 16, 9 and 4 tokens per image


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}px-patch{s[1]}-scale{s[2]}")
def idefics3(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    image_size, patch, scale = request.param
    path = tmp_path_factory.mktemp("idefics3")
    return path, build_tiny_idefics3(path, image_size, patch, scale)


def _prompt(tokens_per_image: int, images: int) -> torch.Tensor:
    ids = [10, 23, 24]
    for _ in range(images):
        ids += [61, 62] + [IMAGE_TOKEN] * tokens_per_image + [61, 20, 21]
    return torch.tensor([ids + [30, 31]])


def test_text_only_logits_equal_transformers(idefics3) -> None:
    path, theirs = idefics3
    ours = load_model(path)
    assert isinstance(ours, Idefics3Model)
    ids = torch.tensor([[10, 23, 24, 20, 21, 30]])
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits[0]
    assert (ours.forward_full(ids)[0] - expected).abs().max().item() <= 1e-4


def test_image_logits_equal_transformers(idefics3) -> None:
    """Two images in one prompt, fed as transformers takes them ([batch, images, 3, H, W])."""
    path, theirs = idefics3
    ours = load_model(path)
    size = ours.cfg.vision.image_size
    pixels = torch.randn(1, 2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = _prompt(ours.cfg.num_image_tokens, 2)
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels).logits[0]
    got = ours.forward_full(ids, pixel_values=pixels)[0]
    assert (got - expected).abs().max().item() <= 1e-4
    other = ours.forward_full(ids, pixel_values=pixels.flip(1))[0]
    assert (other - got).abs().max().item() > 1e-3  # the images do reach the logits


def test_padded_image_with_pixel_attention_mask_equals_transformers(idefics3) -> None:
    """A smaller image padded into the square, its real region given by ``pixel_attention_mask``
    (as transformers' processor pads): positions by fraction of the grid, padding never attended;
    an all-zero padding image in the batch is dropped as transformers drops it."""
    path, theirs = idefics3
    ours = load_model(path)
    size, patch = ours.cfg.vision.image_size, ours.cfg.vision.patch_size
    mask = torch.zeros(1, 2, size, size, dtype=torch.long)
    mask[0, 0, : size - 2 * patch, : size - patch] = 1
    pixels = torch.randn(1, 2, 3, size, size, generator=torch.Generator().manual_seed(2)) * mask[:, :, None]
    ids = _prompt(ours.cfg.num_image_tokens, 1)
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels, pixel_attention_mask=mask).logits[0]
    got = ours.forward_full(ids, pixel_values=pixels, pixel_attention_mask=mask)[0]
    assert (got - expected).abs().max().item() <= 1e-4


def test_a_session_streams_frames_between_the_image_markers(idefics3) -> None:
    """Each frame is one global image at the tower's size, written between SmolVLM's markers in
    its chat template's user turn; the cache gives the logits of one full forward."""
    path, _ = idefics3
    session = StreamingSession.from_pretrained(path, policy="full", capacity=1024)
    tokenizer, cfg = session.tokenizer, session.model.cfg
    assert session.template.turn_end == "<end_of_utterance>\n"  # derived from SmolVLM's template
    frame_ids = session.frame_ids().tolist()
    start = frame_ids.index(tokenizer.token_to_id("<fake_token_around_image>"))
    assert frame_ids[start + 1] == tokenizer.token_to_id("<global-img>")
    assert frame_ids[start + 2: start + 2 + cfg.num_image_tokens] == [IMAGE_TOKEN] * cfg.num_image_tokens
    assert frame_ids[start + 2 + cfg.num_image_tokens] == tokenizer.token_to_id("<fake_token_around_image>")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    system = session.cache.length
    prefix = session._system_ids()
    got, ids, pixels = [], [], []
    for frame in frames:
        pixels.append(session.preprocessor(frame))
        got.append(session.feed(session.frame_ids(), session.encode_frame(frame), all_logits=True))
        ids += frame_ids
    expected = session.model.forward_full(torch.tensor([prefix + ids]), torch.cat(pixels))[0, system:]
    assert (torch.cat(got) - expected).abs().max().item() <= 1e-4
    assert isinstance(session.answer("what is in view ?", max_new_tokens=4), str)


def test_a_tokenizer_without_the_image_markers_is_refused(tmp_path: Path) -> None:
    from builders import build_tokenizer

    build_tiny_idefics3(tmp_path)
    build_tokenizer(tmp_path)  # the plain test vocabulary: no <global-img>
    with pytest.raises(ValueError, match="no <fake_token_around_image>, <global-img> token"):
        StreamingSession.from_pretrained(tmp_path, policy="full", capacity=256)


def test_a_grid_the_shuffle_cannot_divide_is_refused(tmp_path: Path) -> None:
    build_tiny_idefics3(tmp_path, image_size=24, patch=8, scale=2)  # a 3x3 grid, shuffled by 2
    with pytest.raises(CheckpointError, match="scale_factor=2 does not divide"):
        load_model(tmp_path)


def test_onnx_export_gives_torch_logits_in_onnxruntime(tmp_path: Path) -> None:
    """infmllm_export writes the vision and step graphs for this layout too; the onnxruntime
    backend then ingests a frame and a question with the torch backend's logits."""
    from ros_infmllm.export.cli import main as export

    build_tiny_idefics3(tmp_path / "model")
    assert export(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "onnx"), "--capacity", "64",
                   "--max-chunk", "16", "--engines", "no"]) == 0
    frame = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    logits = []
    for backend, options in (("torch", {}), ("onnxruntime", {"engine_dir": tmp_path / "onnx"})):
        session = StreamingSession.from_pretrained(tmp_path / "model", policy="inf-mllm", capacity=64, max_chunk=16,
                                                   backend=backend, **options)
        logits.append(frame_and_question_logits(session, frame))
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4


def test_tensorrt_rtx_builds_engines_for_a_tiny_smolvlm(tmp_path: Path) -> None:
    """The exported vision graph (SigLIP tower + pixel shuffle + projector) and step graph parse
    and build in TensorRT-RTX, as the LLaVA and Qwen2.5-VL graphs do."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is in the test extras")
    from ros_infmllm.export import export_onnx
    from ros_infmllm.export.trt_build import build_engines

    build_tiny_idefics3(tmp_path / "model")
    export_onnx(tmp_path / "model", tmp_path / "out", capacity=64, max_chunk=16)
    manifest = build_engines(tmp_path / "out", "tensorrt_rtx", ["SM86"], progress=False)
    assert set(manifest.graphs) == {"vision", "decoder_step"}
    for spec in manifest.graphs.values():
        assert spec.engine and (tmp_path / "out" / spec.engine).stat().st_size > 10_000


def test_split_frames_are_tiles_then_the_global_image_as_transformers_cuts_them(tmp_path: Path) -> None:
    """A 640x480 frame: longer side to ``longest_edge`` (96 px: 96x72), both sides rounded up to
    whole 32-px tiles (96x96 -> 3x3 tiles; the global image is the whole frame at 32 px, last)."""
    from ros_infmllm.session.preprocess import TiledPreprocessor

    build_tiny_idefics3(tmp_path, longest_edge=96)
    session = StreamingSession.from_pretrained(tmp_path, policy="full", capacity=1024, image_splitting=True)
    pre = session.preprocessor
    assert isinstance(pre, TiledPreprocessor) and (pre.tile, pre.longest_edge) == (32, 96)
    assert pre.split_size(480, 640) == (96, 96) and pre.split_grid(480, 640) == (3, 3)
    assert pre.split_grid(20, 30) == (2, 3) and pre.split_grid(100, 20) == (3, 1)  # upscaled like transformers
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, 320:] = 255  # right half white: the tiles of the last column are white, the first black
    pixels = pre(frame)
    assert pixels.shape == (10, 3, 32, 32)
    assert pixels[2].min() > 0.9 and pixels[0].max() < -0.9  # row 1: col 1 black, col 3 white ([-1, 1])
    assert pixels[9, :, :, :10].max() < -0.9 and pixels[9, :, :, -10:].min() > 0.9  # the global image
    with pytest.raises(ValueError, match="image_splitting"):
        from builders import build_tiny_qwen2_vl

        build_tiny_qwen2_vl(tmp_path / "qwen")
        StreamingSession.from_pretrained(tmp_path / "qwen", policy="full", image_splitting=True)


def test_a_split_frame_streams_with_transformers_logits(tmp_path: Path) -> None:
    """Image splitting on: each frame is 2 x 3 tiles and its global image, written as SmolVLM's
    processor writes them (``<row_r_col_c>`` markers, newlines, ``<global-img>``); the cache's
    logits equal transformers' model fed the same ids and the tiles as one image batch."""
    theirs = build_tiny_idefics3(tmp_path, longest_edge=96)
    session = StreamingSession.from_pretrained(tmp_path, policy="full", capacity=1024, image_splitting=True)
    tokenizer, cfg = session.tokenizer, session.model.cfg
    frame = np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)  # 96x44 -> 96x64: 2 x 3
    assert session.preprocessor.split_grid(40, 90) == (2, 3)
    ids, features, offsets = session.frame_inputs(frame)
    assert offsets is None and features.shape[:2] == (7, cfg.num_image_tokens)
    marks = [tokenizer.id_to_token(i) for i in ids.tolist() if tokenizer.id_to_token(i).startswith("<row_")]
    assert marks == [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2, 3)]
    assert ids.tolist().count(IMAGE_TOKEN) == 7 * cfg.num_image_tokens
    system = session.cache.length
    got = session.feed(ids, features, all_logits=True)
    full = torch.tensor([session._system_ids() + ids.tolist()])
    with torch.no_grad():
        expected = theirs(input_ids=full, pixel_values=session.preprocessor(frame).unsqueeze(0)).logits[0, system:]
    assert (got - expected).abs().max().item() <= 1e-4
    assert len(session.frame_ids()) > 10 * cfg.num_image_tokens  # the reference VGA frame: 3 x 3 tiles + global
