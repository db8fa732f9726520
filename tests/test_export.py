"""ONNX export, the onnxruntime backend against torch, and TensorRT-RTX engine builds (CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from builders import TinySpec, build_tiny_llava, frame_and_question_logits
from ros_infmllm.backends import TorchBackend, make_backend
from ros_infmllm.demo import bundled_model_path
from ros_infmllm.demo.episodes import make_episode
from ros_infmllm.errors import CheckpointError
from ros_infmllm.export import Manifest, export_onnx, model_sha256
from ros_infmllm.export.cli import main as export_main
from ros_infmllm.export.trt_build import EngineBuildError, build_engine, build_engines
from ros_infmllm.model import load_model
from ros_infmllm.session import StreamingSession

CAPACITY, MAX_CHUNK = 96, 32


@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_export")
    export_onnx(tiny_model_dir, out, capacity=CAPACITY, max_chunk=MAX_CHUNK, max_images=2)
    return out


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_export")
    assert export_main(["--out", str(out), "--capacity", "256", "--max-chunk", "32", "--engines", "no"]) == 0
    return out


def test_onnx_files_pass_the_checker_and_the_manifest_describes_them(tiny_model_dir: Path, tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export)
    assert manifest.capacity == CAPACITY and manifest.max_chunk == MAX_CHUNK and manifest.precision == "fp32"
    assert manifest.model_sha256 == model_sha256(tiny_model_dir)
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.tools)
    for spec in manifest.graphs.values():
        model = onnx.load(str(tiny_export / spec.onnx))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version >= 17
        session = ort.InferenceSession(str(tiny_export / spec.onnx))
        assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
        assert [o.name for o in session.get_outputs()] == [t.name for t in spec.outputs]
    step = manifest.graphs["decoder_step"]
    assert step.dynamic == {"q": [1, MAX_CHUNK]}
    assert [t.shape for t in step.inputs if t.name == "cache_k"][0][2] == CAPACITY


def _random_step(model, fill: int, q: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    k, v = model.decoder.empty_cache(CAPACITY)
    k.normal_(generator=generator)
    v.normal_(generator=generator)
    valid = torch.zeros(CAPACITY, dtype=torch.bool)
    valid[:fill] = True
    valid[torch.randperm(CAPACITY, generator=generator)[: fill // 4]] = False  # holes, as after eviction
    embeds = torch.randn(q, model.cfg.text.hidden_size, generator=generator)
    return embeds, k, v, valid, torch.arange(fill, fill + q)


@pytest.mark.parametrize("q", [1, 7, MAX_CHUNK])
@pytest.mark.parametrize("fill", [0, 40, CAPACITY - MAX_CHUNK])
@pytest.mark.parametrize("window", [0, 4])
def test_onnxruntime_step_equals_torch(tiny_model_dir: Path, tiny_export: Path, q: int, fill: int, window: int) -> None:
    model = load_model(tiny_model_dir)
    reference, exported = TorchBackend(model), make_backend("onnxruntime", model, tiny_model_dir, tiny_export)
    args = _random_step(model, fill, q, seed=q * 1000 + fill)
    want, got = reference.step(*args, attn_window=window), exported.step(*args, attn_window=window)
    assert (got.logits - want.logits[-1:]).abs().max() <= 1e-4
    assert (got.new_k - want.new_k).abs().max() <= 1e-4
    assert (got.new_v - want.new_v).abs().max() <= 1e-4
    if window:
        assert got.attn_mass.shape == want.attn_mass.shape == (2, 2, CAPACITY + q)
        assert (got.attn_mass - want.attn_mass).abs().max() <= 1e-5
    else:
        assert got.attn_mass is None and want.attn_mass is None


def test_onnxruntime_vision_equals_torch_in_slices_of_max_images(tiny_model_dir: Path, tiny_export: Path) -> None:
    model = load_model(tiny_model_dir)
    exported = make_backend("onnxruntime", model, tiny_model_dir, tiny_export)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # 3 > max_images = 2
    assert (exported.encode_images(pixels) - model.encode_images(pixels)).abs().max() <= 1e-4


def test_exported_backend_refuses_what_the_export_cannot_serve(tiny_model_dir: Path, tiny_export: Path,
                                                               tmp_path: Path) -> None:
    model = load_model(tiny_model_dir)
    exported = make_backend("onnxruntime", model, tiny_model_dir, tiny_export)
    with pytest.raises(ValueError, match="capacity 128 != exported 96"):
        exported.check_session(128, 16, torch.float32)
    with pytest.raises(ValueError, match="max_chunk 64 > exported 32"):
        exported.check_session(CAPACITY, 64, torch.float32)
    args = _random_step(model, 10, MAX_CHUNK + 1, seed=1)
    with pytest.raises(ValueError, match=r"q=33 outside the exported range \[1, 32\]"):
        exported.step(*args)
    with pytest.raises(ValueError, match="last position's logits only"):
        exported.step(*_random_step(model, 10, 2, seed=1), all_logits=True)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        make_backend("onnxruntime", model, tiny_model_dir, tmp_path)
    with pytest.raises(ValueError, match="needs engine_dir"):
        make_backend("onnxruntime", model, tiny_model_dir, None)
    other = tmp_path / "other"
    build_tiny_llava(other, TinySpec(seed=9))
    with pytest.raises(CheckpointError, match="exported from another checkpoint"):
        make_backend("onnxruntime", load_model(other), other, tiny_export)
    with pytest.raises(ValueError, match="capacity 64 != exported 96"):
        StreamingSession.from_pretrained(tiny_model_dir, backend="onnxruntime", engine_dir=tiny_export, capacity=64,
                                         max_chunk=16, template="demo")


def test_demo_session_gives_the_same_greedy_answers_on_torch_and_onnxruntime_with_evictions(demo_export: Path) -> None:
    episode = make_episode(30_000_321, 48, question_rate=0.25, memory_share=0.5)
    answers, seen = {}, {}
    for backend in ("torch", "onnxruntime"):
        session = StreamingSession.from_pretrained(bundled_model_path(), backend=backend, engine_dir=demo_export,
                                                   capacity=256, max_chunk=32, max_new_tokens=12)
        answers[backend] = [session.answer(item.question) if kind == "qa"
                            else session.ingest_frame(episode.frames[item]) for kind, item in episode.events]
        seen[backend] = session.cache.total_seen
    assert seen["torch"] > 3 * 256  # the stream outgrew the cache: evictions happened
    questions = [a for a in answers["torch"] if a is not None]
    assert len(questions) >= 8 and answers["torch"] == answers["onnxruntime"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_rtx_builds_engines_for_the_tiny_llava(tiny_model_dir: Path, tmp_path: Path, precision: str) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is in the test extras")
    export_onnx(tiny_model_dir, tmp_path, capacity=CAPACITY, max_chunk=MAX_CHUNK, precision=precision)
    manifest = build_engines(tmp_path, "tensorrt_rtx", ["SM86"], progress=False)
    for spec in manifest.graphs.values():
        assert spec.engine and (tmp_path / spec.engine).stat().st_size > 100_000
    assert Manifest.load(tmp_path).tools["engine_builder"].startswith("tensorrt_rtx")


def test_infmllm_export_builds_demo_engines_with_tensorrt_rtx(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is in the test extras")
    code = export_main(["--out", str(tmp_path), "--capacity", "512", "--max-chunk", "64",
                        "--tensorrt-module", "tensorrt_rtx", "--compute-capability", "SM86", "SM89"])
    assert code == 0
    manifest = Manifest.load(tmp_path)
    assert manifest.model_sha256 == model_sha256(bundled_model_path())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder_step.engine", "decoder_step.onnx", "manifest.json",
                                                          "vision.engine", "vision.onnx"]
    err = capsys.readouterr().err
    assert "Building engine" in err and "decoder_step.engine:" in err  # the progress display


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_packed_weights_export_as_codes_the_graph_dequantizes(tiny_model_dir: Path, tmp_path: Path,
                                                              weights: str) -> None:
    """--weights int8/int4: no float projection weight is left in the step graph (codes, scales,
    offsets instead), onnxruntime gives the torch backend's logits on the same packed weights, the
    manifest says what the graphs hold, and a session asking for other weights is refused."""
    assert export_main(["--model", str(tiny_model_dir), "--out", str(tmp_path), "--capacity", str(CAPACITY),
                        "--max-chunk", str(MAX_CHUNK), "--weights", weights, "--engines", "no"]) == 0
    graph = onnx.load(str(tmp_path / "decoder_step.onnx")).graph
    initializers = {t.name: t for t in graph.initializer}
    codes_type = onnx.TensorProto.INT8 if weights == "int8" else onnx.TensorProto.INT4
    for layer in range(TinySpec().layers):
        for projection in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            name = f"decoder.layers.{layer}.{projection}.weight"
            assert name not in initializers and initializers[f"{name}.codes"].data_type == codes_type
    assert Manifest.load(tmp_path).weights == weights
    frame = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    logits = []
    for backend, options in (("torch", {"weights": weights}), ("onnxruntime", {"engine_dir": tmp_path})):
        session = StreamingSession.from_pretrained(tiny_model_dir, policy="h2o", capacity=CAPACITY,
                                                   max_chunk=MAX_CHUNK, backend=backend, **options)
        logits.append(frame_and_question_logits(session, frame, "what is red ?"))
        # what a node reports: the torch backend's packed layers, the graphs' own weights from the manifest
        assert session.held_weights == {"weights": weights, "lm_head_weights": "float", "embedding_weights": "float"}
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4
    other = "int4" if weights == "int8" else "int8"
    with pytest.raises(ValueError, match=f"exported with \\({weights}"):
        StreamingSession.from_pretrained(tiny_model_dir, backend="onnxruntime", engine_dir=tmp_path, weights=other)
    with pytest.raises(ValueError, match="LM head, embeddings and vision float"):
        StreamingSession.from_pretrained(tiny_model_dir, backend="onnxruntime", engine_dir=tmp_path,
                                         lm_head_weights="int8")
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is in the test extras")
    manifest = build_engines(tmp_path, "tensorrt_rtx", ["SM86"], progress=False)
    assert all((tmp_path / spec.engine).stat().st_size > 100_000 for spec in manifest.graphs.values())


def test_centred_int4_exports_without_offsets(tmp_path: Path) -> None:
    """Codes centred on 8 (GGUF Q4_0, no offsets) become one DequantizeLinear over INT4 codes;
    onnxruntime's product equals the float64 one of the dequantized weight."""
    from onnx import TensorProto, helper

    from ros_infmllm.export.packed_weights import pack_initializers
    from ros_infmllm.model.quantized import QuantizedLinear, pack_int4

    generator = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (6, 64), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(6, 2, generator=generator) + 0.5).to(torch.float16)
    layer = QuantizedLinear(pack_int4(codes), scales, None, 4, 64)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [6, 64], np.zeros((6, 64), np.float32).ravel())
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], [weight]),
        opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "g.onnx"))
    pack_initializers(tmp_path / "g.onnx", {"w": layer}, external=False)
    packed = onnx.load(str(tmp_path / "g.onnx"))
    assert [n.op_type for n in packed.graph.node] == ["DequantizeLinear", "Gemm"]
    x = np.random.default_rng(5).standard_normal((1, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {"x": x})
    want = torch.from_numpy(x).double() @ layer.dequantized(torch.float64).T
    assert np.abs(y - want.numpy()).max() < 1e-5


def test_engine_build_names_the_nodes_tensorrt_cannot_parse(tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is in the test extras")
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOperator", ["x"], ["y"], name="mystery_node", domain="ai.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                       helper.make_opsetid("ai.example", 1)]), str(path))
    from ros_infmllm.export.manifest import GraphSpec, TensorSpec

    spec = GraphSpec("bad.onnx", [TensorSpec("x", "float32", [2])], [TensorSpec("y", "float32", [2])], {})
    with pytest.raises(EngineBuildError, match="mystery_node.*NoSuchOperator"):
        build_engine(trt, path, tmp_path / "bad.engine", spec, "fp32", ["SM86"], progress=False)


def test_export_refuses_bad_arguments(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert export_main(["--model", str(tiny_model_dir), "--out", str(tmp_path), "--max-chunk", "500",
                        "--capacity", "256"]) == 2
    assert "max_chunk must be in [2, capacity=256]" in capsys.readouterr().err
    assert export_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
