"""The benchmark scripts run end to end (tiny shapes, CPU): their numbers are not checked here,
only that a run writes complete, consistent results files."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402
from ros_infmllm.cache import DEFAULT_POLICY  # noqa: E402


def test_bench_gpu_q4_k_m_mix_packs_llama_cpps_choice_of_v_and_down_layers(tmp_path: Path) -> None:
    """``--weights q4_k_m``: v and down in int8 groups of 16 in llama.cpp's use_more_bits blocks
    (of 8: the first, the last, and every third between: 0, 3, 6, 7), every other projection int4."""
    from builders import build_tiny_causal_lm
    from ros_infmllm.model import load_model
    from ros_infmllm.model.quantized import QUANTIZED_PROJECTIONS

    build_tiny_causal_lm(tmp_path, "llama", num_hidden_layers=8)
    model = load_model(tmp_path)
    bench_gpu.pack_random_model(model, "q4_k_m")
    decoder = model.decoder
    for index, block in enumerate(decoder.layers):
        modes = {path: (block.get_submodule(path).mode, block.get_submodule(path).group)
                 for path in QUANTIZED_PROJECTIONS}
        wide = index in (0, 3, 6, 7)
        assert modes.pop("self_attn.v_proj") == modes.pop("mlp.down_proj") == (("int8", 16) if wide else ("int4", 32))
        assert set(modes.values()) == {("int4", 32)}, index


def test_bench_gpu_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    assert bench_gpu.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["bandwidth_bytes_per_s"] > 0 and report["capacity"] == 128
    (model,) = report["models"]
    assert set(model["policies"]) == {"h2o-kinds", "inf-mllm", "streamingllm"} and report["ours"] == "h2o-kinds"
    for policy in model["policies"].values():
        streamed = [c["streamed_tokens"] for c in policy["checkpoints"]]
        assert streamed == sorted(streamed) and streamed[-1] >= 1200  # the stream reached each checkpoint
        assert all(c["cache_length"] <= 128 for c in policy["checkpoints"])  # bounded all along
        assert policy["evictions"] > 0 and policy["eviction_amortised_ms_per_token"] > 0
    assert [(row["context"], row["cache"]) for row in model["transformers"]] == [(64, "dynamic"), (128, "dynamic"),
                                                                             (128, "static")]
    assert all("tokens_per_s" in row for row in model["transformers"]), model["transformers"]
    assert model["roofline_ms"] > 0 and set(report["summary"]["tiny-qwen2"]) >= {
        "roofline_fraction_p50", "p50_last_over_first", "eviction_share_of_decode", "frame_ingest_p50_ms",
        "decode_p50_over_streamingllm_h2o-kinds", "decode_p50_over_streamingllm_inf-mllm"}
    markdown = (tmp_path / "bench_gpu.md").read_text()
    assert "| tiny-qwen2 | 128 |" in markdown and "## Targets" in markdown


def test_launch_probe_runs_bench_gpu_and_skips_only_what_it_is_told(tmp_path: Path, monkeypatch, capsys) -> None:
    """launch_probe.py: with nothing to skip it is bench_gpu (its results file); skipping needs a GPU
    (refused on a CPU); skipping the quantize launch hands back one fixed buffer per input width."""
    import launch_probe
    import torch

    from ros_infmllm.model import matvec_dp4a

    assert launch_probe.main(["--", "--smoke", "--policies", "h2o", "--skip-transformers", "--out", str(tmp_path),
                              "--name", "probe"]) == 0
    assert json.loads((tmp_path / "probe.json").read_text())["models"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            launch_probe.main(["--without", "quantize", "combine", "--", "--smoke"])
        assert "needs a CUDA GPU" in capsys.readouterr().err  # parsed, then refused
    monkeypatch.setattr(matvec_dp4a, "quantized_activations", matvec_dp4a.quantized_activations)  # put back after
    launch_probe.skip_quantize()
    codes, stats = matvec_dp4a.quantized_activations(torch.randn(64), 32)
    assert codes.dtype == torch.int32 and codes.numel() == 16 and stats.numel() == 6
    again = matvec_dp4a.quantized_activations(torch.randn(64), 32)
    assert again[0] is codes and again[1] is stats  # stale: nothing is computed


def test_bench_gpu_smoke_run_with_int4_weights_counts_packed_bytes(tmp_path: Path) -> None:
    """--weights int4: the decoder's projections packed, the roofline from their packed bytes; with
    --int4-activations int8 the run says so and leaves the shipped setting as it was."""
    from ros_infmllm.model import decode_linear

    shipped = decode_linear.TUNING.int4_activations
    assert bench_gpu.main(["--smoke", "--weights", "int4", "--int4-activations", "int8", "--policies", "h2o",
                           "--skip-transformers", "--out", str(tmp_path), "--name", "packed"]) == 0
    packed = json.loads((tmp_path / "packed.json").read_text())
    assert packed["int4_activations"] == "int8" and decode_linear.TUNING.int4_activations == shipped
    assert bench_gpu.main(["--smoke", "--policies", "h2o", "--skip-transformers", "--out", str(tmp_path),
                           "--name", "float"]) == 0
    floats = json.loads((tmp_path / "float.json").read_text())
    assert packed["weights"] == "int4" and floats["weights"] == "float"
    (p,), (f,) = packed["models"], floats["models"]
    assert 0 < p["decoder_weight_bytes"] < f["decoder_weight_bytes"]
    assert p["policies"]["h2o"]["checkpoints"][-1]["streamed_tokens"] >= 1200
    assert "decoder projections int4" in (tmp_path / "packed.md").read_text()
    assert "int4 products against x's int8 codes" in (tmp_path / "packed.md").read_text()
    assert "products against" not in (tmp_path / "float.md").read_text()  # float weights: no rounded x


def test_bench_gpu_smoke_run_with_an_int8_cache_counts_its_bytes(tmp_path: Path) -> None:
    """--kv-cache int8: every policy's session keeps an int8 cache and the roofline counts its codes
    and row scales (head size + 4 bytes per row); the cache is refused as a policy suffix."""
    assert bench_gpu.main(["--smoke", "--kv-cache", "int8", "--policies", "h2o", "--skip-transformers",
                           "--out", str(tmp_path), "--name", "kv8"]) == 0
    report = json.loads((tmp_path / "kv8.json").read_text())
    (model,) = report["models"]
    from ros_infmllm.model.config import load_config

    shape = bench_gpu.SMOKE_SHAPES[model["model"]]
    text = load_config(bench_gpu.write_checkpoint_config(tmp_path / "shape", shape)).text
    rows = 2 * text.num_layers * text.num_kv_heads * report["capacity"]
    assert report["kv_cache"] == "int8" and model["cache_bytes"] == rows * (text.head_dim + 4)
    assert model["policies"]["h2o"]["checkpoints"][-1]["streamed_tokens"] >= 1200
    assert "K/V cache int8" in (tmp_path / "kv8.md").read_text()
    with pytest.raises(SystemExit):
        bench_gpu.main(["--smoke", "--policies", "h2o+kv8", "--skip-transformers", "--out", str(tmp_path)])


def test_bench_gpu_matvec_overrides_set_the_launch_shape_for_the_run_and_put_it_back(tmp_path: Path) -> None:
    """--matvec FIELD=VALUE: the op runs at that shape (the report keeps it), the shipped tuning is
    back afterwards, and a field the tuning lacks is refused with the fields named."""
    from ros_infmllm.model import decode_linear

    shipped = dataclasses.replace(decode_linear.TUNING)
    assert bench_gpu.main(["--smoke", "--weights", "int4", "--policies", "h2o", "--skip-transformers",
                           "--matvec", "int4_block_n=2", "int4_block_k=64", "pdl=false",
                           "--out", str(tmp_path), "--name", "tuned"]) == 0
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert tuned["matvec_tuning"]["int4_block_n"] == 2 and tuned["matvec_tuning"]["int4_block_k"] == 64
    assert tuned["matvec_tuning"]["pdl"] is False and decode_linear.TUNING == shipped
    assert "int4_block_n=2 int4_block_k=64" in (tmp_path / "tuned.md").read_text()
    with pytest.raises(SystemExit):
        bench_gpu.main(["--smoke", "--matvec", "int4_rows=2", "--out", str(tmp_path)])
    assert decode_linear.TUNING == shipped


def test_bench_gpu_decode_attention_overrides_are_kept_in_the_report_and_put_back(tmp_path: Path) -> None:
    """--decode-attention FIELD=VALUE sets the decode attention's launch shape for the run (the report
    names it) and the shipped one is back afterwards; an unknown field is refused."""
    from ros_infmllm.model import decode_attention

    shipped = dataclasses.replace(decode_attention.TUNING)
    assert bench_gpu.main(["--smoke", "--policies", "h2o", "--skip-transformers", "--decode-attention",
                           "programs=528", "min_split=64", "pdl=false", "--out", str(tmp_path), "--name", "da"]) == 0
    report = json.loads((tmp_path / "da.json").read_text())
    assert (shipped.programs, shipped.min_split, shipped.pdl) != (528, 64, False)
    assert report["decode_attention_tuning"]["programs"] == 528 and report["decode_attention_tuning"]["pdl"] is False
    assert "decode attention programs=528 min_split=64 pdl=false" in (tmp_path / "da.md").read_text()
    assert decode_attention.TUNING == shipped
    with pytest.raises(SystemExit):
        bench_gpu.main(["--smoke", "--decode-attention", "splits=8", "--out", str(tmp_path)])
    assert decode_attention.TUNING == shipped


def test_launch_tuning_overrides_parse_each_field_as_its_type() -> None:
    from launch_tuning import overridden
    from ros_infmllm.model.decode_linear import MatvecTuning

    tuning = overridden(MatvecTuning(), ["x8_block_n=16", "pdl=0", "int4_activations=int8"])
    assert (tuning.x8_block_n, tuning.pdl, tuning.int4_activations) == (16, False, "int8")
    for bad in ("x8_block_n=four", "pdl=maybe", "block_n", "nothing=1"):
        with pytest.raises(ValueError, match="x8_block_n|pdl|block_n"):
            overridden(MatvecTuning(), [bad])


def test_decoder_weight_bytes_count_a_tied_table_once(tmp_path: Path) -> None:
    shape = bench_gpu.SMOKE_SHAPES["tiny-qwen2"]
    folder = bench_gpu.write_checkpoint_config(tmp_path / "m", shape)
    model = bench_gpu.random_model(folder, "cpu", bench_gpu.torch.float32)
    text = shape["text"]
    per_layer = (4 * text["hidden_size"] ** 2 // 2 + text["hidden_size"] ** 2  # q,o full; k,v at 2 of 4 heads
                 + 3 * text["hidden_size"] * text["intermediate_size"] + 2 * text["hidden_size"]  # MLP, norms
                 + text["hidden_size"] + 2 * text["hidden_size"] // 2)  # q/k/v biases
    expected = 4 * (text["num_hidden_layers"] * per_layer + text["vocab_size"] * text["hidden_size"]
                    + text["hidden_size"])
    assert bench_gpu.decoder_bytes_per_token(model) == expected
    # the head packed apart from its tied float table: the table is then read only by row
    from ros_infmllm.model.checkpoint import pack_parts

    pack_parts(model, lm_head="int8")
    table = 4 * text["vocab_size"] * text["hidden_size"]
    assert bench_gpu.decoder_bytes_per_token(model) == expected - table + model.decoder.lm_head.packed_bytes()


def _smoke_run(name: str, out: Path, *options: str) -> dict:
    """``benchmarks/NAME.py --smoke`` in a process of its own (the smoke run puts Triton in
    interpreter mode before importing it); its one model's JSON entry."""
    script = Path(bench_gpu.__file__).with_name(f"{name}.py")
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out), *options], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (model,) = json.loads((out / f"{name}.json").read_text())["models"]
    return model


@pytest.mark.parametrize("kv_cache", ["model", "int8"])
def test_probe_decode_combine_smoke_run_writes_a_line_per_variant(tmp_path: Path, kv_cache: str) -> None:
    """The combine probe in Triton's interpreter (its own process): every variant of both head
    sizes launches the kernels at its shape (over an int8 cache: its own partial pass) and is written."""
    script = Path(bench_gpu.__file__).with_name("probe_decode_combine.py")
    out = tmp_path / "probe.txt"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--kv-cache", kv_cache, "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = out.read_text().splitlines()
    import probe_decode_combine

    assert ("an int8 cache" in lines[0]) is (kv_cache == "int8")
    assert len(lines) == 1 + 2 * len(probe_decode_combine.VARIANTS)
    assert all(line.endswith(" us") for line in lines[1:])
    assert sum("dim 64 parts pc mass 1" in line for line in lines) == 9


def test_bench_packed_prefill_smoke_run_times_every_variant(tmp_path: Path) -> None:
    """The prefill-product benchmark in Triton's interpreter (its own process): int4 and int8 rows
    with every variant but tinygemm (CUDA only), each product within float rounding of float64."""
    script = Path(bench_gpu.__file__).with_name("bench_packed_prefill.py")
    done = subprocess.run([sys.executable, str(script), "--smoke", "--tokens", "8", "--layers", "2", "--replays", "1",
                           "--out", str(tmp_path), "--name", "prefill"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "prefill.json").read_text())
    assert [(r["bits"], r["tokens"]) for r in report["rows"]] == [(4, 8), (8, 8)]
    for row in report["rows"]:
        assert set(row["variants"]) == {"float", "torch", "triton", "shipped", "whole"}  # tinygemm: CUDA only
        assert all(v["relative_error"] < 1e-5 and v["us"] > 0 for v in row["variants"].values())
    assert "| int4 | tiny (96x256) | 8 |" in (tmp_path / "prefill.md").read_text()


def test_load_memory_reports_the_peak_of_a_load_beside_what_the_model_holds(tmp_path: Path) -> None:
    """SmolLM2 loaded in a fresh process per cell: the peak grows by at least what the model holds,
    packed (auto) holds less than float, and less again with its tied table and head packed."""
    import load_memory

    assert load_memory.main(["--weights", "float", "auto", "--dtypes", "bfloat16", "--out", str(tmp_path),
                             "--name", "load"]) == 0
    assert load_memory.main(["--weights", "auto", "--dtypes", "bfloat16", "--lm-head", "int8", "--embeddings", "int8",
                             "--out", str(tmp_path), "--name", "load8"]) == 0
    rows = {r["weights"]: r for r in json.loads((tmp_path / "load.json").read_text())["rows"]}
    [packed_table] = json.loads((tmp_path / "load8.json").read_text())["rows"]
    assert packed_table["model_bytes"] < rows["auto"]["model_bytes"] < rows["float"]["model_bytes"]
    assert all(r["peak_growth_bytes"] >= r["model_bytes"] > 0 for r in [*rows.values(), packed_table])
    assert "| auto | float | float | bfloat16 |" in (tmp_path / "load.md").read_text()
    assert "| auto | int8 | int8 | bfloat16 |" in (tmp_path / "load8.md").read_text()


def test_bench_llamacpp_random_gguf_has_the_shape_llama_cpp_reads(tmp_path: Path) -> None:
    """The random GGUFs llama-bench times: every block tensor of the shape in the file's type (norms
    and biases f32), no tokenizer, a tied LM head left out. (llama.cpp itself is built on the GPU
    machine only; the CPU build of it read these files there and here when the script was made.)"""
    import gguf

    import bench_llamacpp

    text = bench_gpu.SMOKE_SHAPES["tiny-qwen2"]["text"]
    for kind, qtype in (("F16", gguf.GGMLQuantizationType.F16), ("Q4_0", gguf.GGMLQuantizationType.Q4_0)):
        reader = gguf.GGUFReader(bench_llamacpp.write_random_gguf(tmp_path / f"{kind}.gguf", text, kind))
        tensors = {t.name: t for t in reader.tensors}
        hidden, layers = text["hidden_size"], text["num_hidden_layers"]
        assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type == qtype
        assert list(tensors["blk.0.ffn_down.weight"].shape) == [text["intermediate_size"], hidden]
        assert tensors["blk.1.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
        assert len(tensors) == 2 + layers * (9 + 3)
        assert reader.fields["tokenizer.ggml.model"].contents() == "none"


def test_bench_llamacpp_names_the_source_a_built_llama_bench_came_from(tmp_path: Path) -> None:
    """Where llama-bench says its commit is "unknown" (built from the sdist's vendor/llama.cpp, no
    git checkout), the report names the ggml version of the tree the build's CMake cache points to,
    and the llama-cpp-python version where the tree sits in its sdist; nothing where no tree is found."""
    import bench_llamacpp

    tree = tmp_path / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    (tree / "ggml").mkdir(parents=True)
    (tree / "ggml" / "CMakeLists.txt").write_text(
        "project(ggml)\nset(GGML_VERSION_MAJOR 0)\nset(GGML_VERSION_MINOR 25)\nset(GGML_VERSION_PATCH 3)\n")
    binary = tmp_path / "build" / "bin" / "llama-bench"
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    assert bench_llamacpp.source_version(binary) is None  # no CMake cache yet
    (tmp_path / "build" / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={tree}\nOTHER:BOOL=ON\n")
    assert bench_llamacpp.source_version(binary) == "ggml 0.25.3"
    (tmp_path / "llama_cpp_python-0.3.36" / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: llama_cpp_python\n"
                                                                    "Version: 0.3.36\n")
    assert bench_llamacpp.source_version(binary) == "llama-cpp-python 0.3.36, ggml 0.25.3"


def test_bench_llamacpp_smoke_run_times_ours_in_every_weight_mode(tmp_path: Path) -> None:
    import bench_llamacpp

    assert bench_llamacpp.main(["--smoke", "--skip-llama-cpp", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_llamacpp.json").read_text())
    rows = {(r["weights"], r["lm_head"]): r for r in report["ours"]}
    assert set(rows) == set(bench_llamacpp.OURS)
    packed = rows[("int4", "int4")]["weight_bytes_per_token"]
    assert packed < rows[("int8", "int8")]["weight_bytes_per_token"] < rows[("float", "float")]["weight_bytes_per_token"]
    assert all(r["decode_p50_ms"] > 0 and r["parts_bytes"]["cache"] > 0 for r in rows.values())
    assert "speedup_over_bf16_int4_head_int4" in report["summary"]["tiny-qwen2"]


def test_bench_llamacpp_with_an_int8_cache_sets_both_sides(tmp_path: Path) -> None:
    """--kv-cache int8: our rows stream into an int8 cache (its bytes counted as codes and row
    scales) and llama-bench is asked for Q8_0 K and V with flash attention; the table lists the
    file types asked for (--types) only. llama-bench itself is
    a stand-in here (a mock script that records its arguments): building it takes minutes."""
    import bench_llamacpp

    assert bench_llamacpp.main(["--smoke", "--skip-llama-cpp", "--ours", "int4/int8", "--kv-cache", "int8",
                                "--types", "F16", "Q4_0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_llamacpp.json").read_text())
    (row,) = report["ours"]
    assert report["kv_cache"] == row["kv_cache"] == "int8" and report["types"] == ["F16", "Q4_0"]
    table = (tmp_path / "bench_llamacpp.md").read_text()
    assert "| Q4_0 |" in table and "Q4_1" not in table  # only the file types asked for stand beside our row
    from ros_infmllm.model.config import load_config

    shape = bench_gpu.SMOKE_SHAPES[row["model"]]
    text = load_config(bench_gpu.write_checkpoint_config(tmp_path / "shape", shape)).text
    assert row["cache_bytes"] == 2 * text.num_layers * text.num_kv_heads * report["depth"] * (text.head_dim + 4)
    assert "cache 128 tokens in int8" in (tmp_path / "bench_llamacpp.md").read_text()
    stand_in = tmp_path / "llama-bench"
    stand_in.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(tmp_path / 'argv')!r}, 'w').write(' '.join(sys.argv))\n"
                        "print(json.dumps([{'avg_ts': 100.0, 'stddev_ts': 1.0, 'type_k': 'q8_0', 'type_v': 'q8_0'}]))\n")
    stand_in.chmod(0o755)
    got = bench_llamacpp.run_llama_bench(stand_in, tmp_path / "m.gguf", 4096, 128, 3, "int8")
    assert got["tokens_per_s"] == 100.0 and got["type_k"] == "q8_0"
    assert "-ctk q8_0 -ctv q8_0 -fa on" in (tmp_path / "argv").read_text()
    bench_llamacpp.run_llama_bench(stand_in, tmp_path / "m.gguf", 4096, 128, 3)
    assert "-ctk" not in (tmp_path / "argv").read_text()


def test_bench_llamacpp_packs_the_embedding_table_where_a_setting_names_it(tmp_path: Path) -> None:
    """``--ours weights/head/embeddings[/vision]``: the third mode packs the token table (tied to
    the head packed alike: one table, counted once as the embeddings), the fourth the tower; the
    rows say so; a setting of five parts is refused by name."""
    import bench_llamacpp

    settings = ["int4/int8", "int4/int8/int8", "int4/int8/int8/int8"]
    assert bench_llamacpp.main(["--smoke", "--skip-llama-cpp", "--ours", *settings, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_llamacpp.json").read_text())
    rows = {bench_llamacpp.setting_of(r): r for r in report["ours"]}
    assert set(rows) == set(settings) and rows["int4/int8/int8"]["embeddings"] == "int8"
    plain, packed = rows["int4/int8"]["parts_bytes"], rows["int4/int8/int8"]["parts_bytes"]
    assert packed["embeddings"] < plain["embeddings"] and packed["lm_head"] == 0  # the head's table is the embedding's
    assert packed["embeddings"] == plain["lm_head"]
    assert "| tiny-qwen2 | int4 / int8 / int8 |" in (tmp_path / "bench_llamacpp.md").read_text()
    tower = rows["int4/int8/int8/int8"]
    assert tower["vision_weights"] == "int8"
    assert tower["parts_bytes"]["vision_and_projector"] < packed["vision_and_projector"]
    assert "| tiny-qwen2 | int4 / int8 / int8 / int8 |" in (tmp_path / "bench_llamacpp.md").read_text()
    with pytest.raises(SystemExit):
        bench_llamacpp.main(["--smoke", "--skip-llama-cpp", "--ours", "int4/int8/int8/int8/int8", "--out",
                             str(tmp_path)])


def test_bench_decode_attention_smoke_run_writes_its_table(tmp_path: Path) -> None:
    """Every launch shape, the mass programs' block size included (two sizes over an 80-slot cache:
    several blocks each), gives the reference's output and mass."""
    model = _smoke_run("bench_decode_attention", tmp_path)
    assert len(model["variants"]) == 4 and model["best"] in model["variants"]
    assert {v["mass_block"] for v in model["variants"]} == {32, 64}
    assert max(max(v["out_error"], v["mass_error"]) for v in model["variants"]) < 1e-5
    assert model["explicit"]["mass_error"] < 1e-5
    assert "| tiny-qwen2 | 4 / 2 / 16 |" in (tmp_path / "bench_decode_attention.md").read_text()


def test_bench_decode_attention_smoke_run_reads_an_int8_cache(tmp_path: Path) -> None:
    """--kv-cache int8: the kernels read codes and row scales, the explicit path dequantizes; both
    give the reference over the dequantized rows; bytes count the codes and scales."""
    model = _smoke_run("bench_decode_attention", tmp_path, "--kv-cache", "int8")
    assert max(max(v["out_error"], v["mass_error"]) for v in model["variants"]) < 1e-5
    assert model["explicit"]["out_error"] < 1e-5 and model["explicit"]["mass_error"] < 1e-5
    assert model["bytes_per_call"] == 2 * model["kv_heads"] * 80 * (model["head_dim"] + 4)
    assert "int8 cache, capacity 80" in (tmp_path / "bench_decode_attention.md").read_text()


def test_bench_dp4a_matvec_smoke_run_times_all_three_and_reports_the_rounding(tmp_path: Path) -> None:
    """cuBLAS, the shipped int4 op and the dp4a candidate per matrix, with the candidate's larger
    error from x's int8 rounding (the shipped op is exact to its int4 weights)."""
    script = Path(bench_gpu.__file__).with_name("bench_dp4a_matvec.py")
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_dp4a_matvec.json").read_text())["rows"]
    assert [r["matrix"] for r in rows] == ["o", "down"]
    for r in rows:
        assert r["int4_float_x"]["error"] < 1e-5 < r["int4_dp4a"]["error"] < 1e-2
        assert all(r[k]["us"] > 0 for k in ("cublas_bf16", "int4_float_x", "int4_dp4a"))
        assert r["int4_dp4a"]["packed_ahead"] == 2  # the smoke sweep requests two chunks ahead
    assert "| tiny | down | 32x512 |" in (tmp_path / "bench_dp4a_matvec.md").read_text()


def test_bench_decode_linear_smoke_run_writes_its_table(tmp_path: Path) -> None:
    """Every matrix of a layer and the LM head, each version checked."""
    model = _smoke_run("bench_decode_linear", tmp_path)
    assert [m["name"] for m in model["matrices"]] == ["q/k/v", "o", "gate/up", "down", "LM head"]
    assert max(max(m["op"]["error"], m["op_without_pdl"]["error"]) for m in model["matrices"]) < 1e-5
    assert max(m["compiled"]["error"] for m in model["matrices"]) < 1e-5
    assert "| tiny-qwen2 | gate/up |" in (tmp_path / "bench_decode_linear.md").read_text()


@pytest.mark.parametrize("weights, flags, activations, rows_field, bound",
                         [("int4", ["--int4-activations", "float"], "float", "int4_block_n", 1e-5),
                          ("int4", ["--int4-activations", "int8"], "int8", "x8_block_n", 1e-2),
                          ("int8", ["--matvec", "int8_activations=int8"], "int8", "int8_block_n", 1e-2)],
                         ids=["int4-float-x", "int4-dp4a", "int8-dp4a"])
def test_bench_decode_linear_times_packed_weights_against_their_dequantized_reference(
        tmp_path: Path, weights, flags, activations, rows_field, bound) -> None:
    """--weights int4 / int8: the op reads codes and scales (int4 with offsets: a quarter of bf16's
    bytes and the scales'; int8 a half) and agrees with the float64 product of the dequantized
    weights: exactly against float x, within x's int8 rounding on the dp4a paths (int4's rows per
    program are x8_block_n there); --matvec sets the path of the shipped row and the variants."""
    model = _smoke_run("bench_decode_linear", tmp_path, "--weights", weights, *flags)
    share = 0.5 if weights == "int4" else 0.6
    for matrix in model["matrices"]:
        assert matrix["op"]["error"] < bound and matrix["op"]["bytes"] < matrix["cublas"]["bytes"] * share
        assert matrix["op"][f"{weights}_activations"] == activations
        assert matrix["op"][rows_field] == matrix["op"]["rows_per_program"]
        assert matrix["op"][f"{weights}_block_k"] == matrix["op"]["chunk"]
        assert all(v["ahead"] == 2 and v["error"] < bound for v in matrix["variants"])  # two chunks in flight
        assert all(v[f"{weights}_activations"] == activations for v in matrix["variants"])
    text = (tmp_path / "bench_decode_linear.md").read_text()
    assert f"weights {weights}" in text and (("dp4a" in text) == (activations == "int8"))


def test_matvec_sass_counts_the_main_loop_of_each_weight_type(tmp_path: Path) -> None:
    """Compiled for sm_90 and disassembled here: a loop is found for bf16, int8 and int4, each step
    covers the weights its launch shape gives a thread, and packed codes cost instructions; the
    dp4a paths' loops (int4 and int8 weights against x's int8 codes) use byte dot products and
    fewer instructions per code than the same weights against float x."""
    script = Path(bench_gpu.__file__).with_name("matvec_sass.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels = {k["weights"]: k for k in json.loads((tmp_path / "matvec_sass.json").read_text())["kernels"]}
    dp4a = {4: kernels.pop("int4 x int8 dp4a (int4_activations int8)"),
            8: kernels.pop("int8 x int8 dp4a (int8_activations int8)")}
    assert set(kernels) == {"bf16", "int8", "int4"}
    for kernel in kernels.values():
        assert kernel["loop_instructions"] > 10 and kernel["instructions_per_weight"] > 1
        assert any(op in ("FFMA", "FMUL") for op, _ in kernel["opcodes"])
    assert kernels["int4"]["weights_per_thread_per_step"] > kernels["bf16"]["weights_per_thread_per_step"]
    # the dp4a paths: byte dot products (IDP) in their loops, and fewer instructions per code
    for bits, kernel in dp4a.items():
        assert any(op == "IDP" for op, _ in kernel["opcodes"])
        assert kernel["instructions_per_weight"] < kernels[f"int{bits}"]["instructions_per_weight"]
    assert "| int4 |" in (tmp_path / "matvec_sass.md").read_text()


def test_attention_registers_reads_each_compiled_case(tmp_path: Path) -> None:
    """attention_registers.py compiles both partial passes for sm_90 here and reads their registers:
    every case has a count, the programs per SM follow from it and from the shared memory, and the
    int8 pass's turn holds more registers per thread than the bf16 pass at the same tile, the two-pass
    kernel fewer than the one-pass one."""
    script = Path(bench_gpu.__file__).with_name("attention_registers.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = json.loads((tmp_path / "attention_registers.json").read_text())["cases"]
    for case in cases:
        assert 16 <= case["registers_per_thread"] <= 255
        assert case["programs_per_sm_by_registers"] == 65536 // (case["registers_per_thread"] * 32 * case["warps"])
        assert case["programs_per_sm_by_shared"] == 233472 // case["shared_bytes"] >= 1
    shipped = {c["cache"]: c for c in cases if (c["split"], c["block"], c["warps"], c["maxnreg"]) == (128, 128, 4, 0)}
    assert shipped["int8"]["registers_per_thread"] > shipped["bf16"]["registers_per_thread"]
    # the two-pass kernel: no dot padded to 16 rows, so fewer registers than the one-pass int8 kernel
    assert shipped["int8 two-pass"]["registers_per_thread"] < shipped["int8"]["registers_per_thread"]
    assert "| int8 | 128 | 2 | 128 | 4 |" in (tmp_path / "attention_registers.md").read_text()
    assert all(case["instructions"] > 100 for case in cases)  # SASS instructions per thread, read from the cubin
    capped = [c for c in cases if c["maxnreg"]]  # the two-pass pass under register caps: each within its cap
    assert capped and all(c["registers_per_thread"] <= c["maxnreg"] for c in capped)
    assert all(c["spill_instructions"] == 0 for c in cases if not c["stack_bytes"])


def test_bench_alternated_runs_settings_in_turn_and_keeps_a_failed_row(tmp_path: Path) -> None:
    """bench_alternated.py on the smoke model: rows A, B, C, A, B, C, each a bench_gpu.py process with
    its setting's flags (the override reaches bench_gpu's report); per setting the p50s in run order,
    their median and its change from the first setting's; a setting bench_gpu refuses is a failed row
    with bench_gpu's message, the others still run, and the exit status is 1."""
    import bench_alternated

    status = bench_alternated.main(["--rounds", "2", "--common", "--smoke --policies h2o-kinds --skip-transformers",
                                    "--setting", "shipped=", "--setting",
                                    "cap=--decode-attention two_pass_maxnreg=64", "--setting",
                                    "bad=--decode-attention nonsense=1", "--out", str(tmp_path), "--name", "alt"])
    assert status == 1
    report = json.loads((tmp_path / "alt.json").read_text())
    assert [(r["setting"], r["round"]) for r in report["rows"]] == [
        ("shipped", 0), ("cap", 0), ("bad", 0), ("shipped", 1), ("cap", 1), ("bad", 1)]
    ran = [r for r in report["rows"] if r["setting"] != "bad"]
    streamed = [p["streamed_tokens"] for p in ran[0]["points"]]  # the smoke run's stream checkpoints
    assert all([p["streamed_tokens"] for p in r["points"]] == streamed and r["points"][0]["decode_p50_ms"] > 0
               for r in ran)
    assert [r["overrides"]["decode_attention_overrides"] for r in ran] == [[], ["two_pass_maxnreg=64"]] * 2
    failed = [r for r in report["rows"] if r["setting"] == "bad"]
    assert all("nonsense=1" in r["error"] and "points" not in r for r in failed)
    assert len(report["summary"]) == 2 * len(streamed)
    summary = {s["setting"]: s for s in report["summary"] if s["streamed_tokens"] == streamed[0]}
    assert set(summary) == {"shipped", "cap"}
    for setting, rows in (("shipped", ran[0::2]), ("cap", ran[1::2])):
        p50s = [r["points"][0]["decode_p50_ms"] for r in rows]
        assert summary[setting]["p50s_ms"] == p50s and summary[setting]["median_p50_ms"] == pytest.approx(sum(p50s) / 2)
    assert summary["shipped"]["change_ms"] == 0
    assert summary["cap"]["change_ms"] == pytest.approx(summary["cap"]["median_p50_ms"]
                                                        - summary["shipped"]["median_p50_ms"])
    text = (tmp_path / "alt.md").read_text()
    assert "| 3 | bad | `--decode-attention nonsense=1` | failed:" in text
    assert "| 2 | cap | `--decode-attention two_pass_maxnreg=64` | tiny-qwen2 | h2o-kinds |" in text
    with pytest.raises(SystemExit):  # a setting without its '='
        bench_alternated.main(["--setting", "shipped", "--out", str(tmp_path)])


def test_two_pass_issue_model_sums_issue_and_memory(tmp_path: Path) -> None:
    """two_pass_issue_model.py compiles the two-pass pass at each launch shape and models its call:
    issue time from the SASS instructions, warps and programs, memory time from the codes and scales;
    halving the warps per program gives each thread more instructions, and a 64-wide head half the bytes;
    a register cap takes more programs per SM and more instructions (the spills), the bytes unchanged."""
    script = Path(bench_gpu.__file__).with_name("two_pass_issue_model.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = {(c["block"], c["warps"], c["dim"], c["maxnreg"]): c for c in
             json.loads((tmp_path / "two_pass_issue_model.json").read_text())["cases"]}
    for c in cases.values():
        programs = 32 * 4096 // c["block"]
        assert c["issue_us"] == pytest.approx(1e6 * c["instructions_per_thread"] * c["warps"] * programs
                                              / (132 * 4 * 1.755e9))
        assert c["serial_us"] == pytest.approx(c["issue_us"] + c["memory_us"])
        assert c["overlapped_us"] == max(c["issue_us"], c["memory_us"])
        assert c["waves"] == pytest.approx(programs / (132 * c["programs_per_sm"]))
    shipped = cases[(128, 4, 128, 0)]
    assert shipped["memory_us"] == pytest.approx(1e6 * 32 * 4096 * 2 * 132 / 2.99e12)  # 34.6 MB per 7B call
    assert cases[(128, 8, 128, 0)]["instructions_per_thread"] < shipped["instructions_per_thread"]
    assert cases[(128, 4, 64, 0)]["memory_us"] == pytest.approx(shipped["memory_us"] * 68 / 132)
    capped = cases[(128, 4, 128, 64)]
    assert capped["registers_per_thread"] <= 64 < shipped["registers_per_thread"]
    assert capped["programs_per_sm"] > shipped["programs_per_sm"] and capped["memory_us"] == shipped["memory_us"]
    assert capped["instructions_per_thread"] > shipped["instructions_per_thread"] and capped["spill_instructions"] > 0
    assert "| 128 | 4 | 128 |" in (tmp_path / "two_pass_issue_model.md").read_text()


def test_stream_perplexity_smoke_run_scores_every_token(tmp_path: Path) -> None:
    """SmolLM2 over 300 tokens of the benchmark text at one tiny capacity, every configuration."""
    import stream_perplexity

    assert stream_perplexity.main(["--tokens", "300", "--capacities", "64", "--chunk", "16", "--block", "64",
                                   "--segments", "3", "--out", str(tmp_path), "--tag", "smoke"]) == 0
    report = json.loads((tmp_path / "stream_perplexity_smoke.json").read_text())
    runs = {row["configuration"]: row for row in report["runs"]}
    assert set(runs) == {"sliding-window", "streamingllm", "h2o", "h2o-kinds", "inf-mllm", "inf-mllm-paper",
                         "inf-mllm-lt", "full"}
    # on text alone h2o-kinds keeps what streamingllm keeps, so it predicts the same
    assert runs["h2o-kinds"]["mean_nll"] == pytest.approx(runs["streamingllm"]["mean_nll"], abs=1e-6)
    for row in runs.values():
        assert row["tokens"] == 299 and len(row["segment_perplexity"]) == 3 and 1 < row["perplexity"] < 1000
    # with the whole stream in view, full attention predicts at least as well as a 48-token window
    assert runs["full"]["mean_nll"] <= runs["sliding-window"]["mean_nll"]
    assert "vs_sliding_window" in runs["h2o"] and "vs_sliding_window" not in runs["full"]


def test_stream_perplexity_with_packed_weights_pairs_each_run_with_its_float_one(tmp_path: Path) -> None:
    """--weights: each policy (and full) again per weight setting, compared token by token with
    its float run. SmolLM2 ships as Q4_1, so int4 (its own blocks) predicts as float does; with the
    GPU decode's int8 rounding of every packed input (int4-x8) it does not."""
    import stream_perplexity

    assert stream_perplexity.main(["--tokens", "300", "--capacities", "64", "--chunk", "16", "--block", "64",
                                   "--segments", "3", "--policies", "streamingllm", "--weights", "float", "int4",
                                   "int4-x8", "--no-reference", "--out", str(tmp_path), "--tag", "weights"]) == 0
    report = json.loads((tmp_path / "stream_perplexity_weights.json").read_text())
    runs = {row["configuration"]: row for row in report["runs"]}
    assert set(runs) == {"streamingllm", "streamingllm+int4", "streamingllm+int4-x8", "full", "full+int4",
                         "full+int4-x8"}
    assert runs["streamingllm+int4-x8"]["weights"] == "int4-x8" and "vs_float_weights" not in runs["full"]
    for name in ("streamingllm", "full"):
        assert runs[f"{name}+int4"]["vs_float_weights"]["delta_nll"] == pytest.approx(0, abs=1e-5)
        rounded = runs[f"{name}+int4-x8"]["vs_float_weights"]
        assert rounded["delta_nll"] != 0 and rounded["delta_nll_ci95"][0] <= rounded["delta_nll"] <= rounded["delta_nll_ci95"][1]
    assert "Δ NLL vs float weights" in (tmp_path / "stream_perplexity_weights.md").read_text()


def test_stream_perplexity_with_an_int8_cache_pairs_each_run_with_its_float_one(tmp_path: Path) -> None:
    """--kv-cache int8: each policy (and full) again with the cache in int8 (``+kv8``), paired with
    the run in the model's dtype; with weights too, paired with the run in float weights and cache."""
    import stream_perplexity

    assert stream_perplexity.main(["--tokens", "300", "--capacities", "64", "--chunk", "16", "--block", "64",
                                   "--segments", "3", "--policies", "h2o-kinds", "--weights", "float", "int8",
                                   "--kv-cache", "model", "int8", "--no-reference", "--out", str(tmp_path),
                                   "--tag", "kv"]) == 0
    report = json.loads((tmp_path / "stream_perplexity_kv.json").read_text())
    runs = {row["configuration"]: row for row in report["runs"]}
    assert set(runs) == {f"{p}{w}{k}" for p in ("h2o-kinds", "full") for w in ("", "+int8") for k in ("", "+kv8")}
    assert runs["h2o-kinds+kv8"]["kv_cache"] == "int8" and runs["h2o-kinds+int8"]["kv_cache"] == "model"
    assert "vs_float_weights" not in runs["h2o-kinds"]
    for name in ("h2o-kinds", "full"):
        for packed in ("+kv8", "+int8+kv8"):
            delta = runs[name + packed]["vs_float_weights"]
            assert delta["delta_nll"] != 0 and delta["delta_nll_ci95"][0] <= delta["delta_nll"] <= delta["delta_nll_ci95"][1]
    # int8 weights and an int8 cache: paired with the float run, not the int8-weight one
    both = runs["h2o-kinds+int8+kv8"]["vs_float_weights"]["delta_nll"]
    assert both != runs["h2o-kinds+kv8"]["vs_float_weights"]["delta_nll"]
    assert "a `+kv8` row keeps the cache in int8" in (tmp_path / "stream_perplexity_kv.md").read_text()


def test_recall_passkey_smoke_run_counts_every_cell(tmp_path: Path) -> None:
    """SmolLM2, one stream per cell at a 64-token budget: full recalls the key, counts add up."""
    import recall_passkey

    assert recall_passkey.main(["--capacity", "64", "--lengths", "4", "--episodes", "1", "--policies",
                                "streamingllm", "--weights", "float", "int8-x8", "--out", str(tmp_path),
                                "--tag", "smoke"]) == 0
    report = json.loads((tmp_path / "recall_passkey_smoke.json").read_text())
    assert report["complete"] and [(c["policy"], c["length"]) for c in report["cells"]] == [
        ("streamingllm", 256), ("streamingllm+int8-x8", 256), ("full", 256), ("full+int8-x8", 256)]
    assert all(len(c["hits"]) == 1 and c["correct"] == sum(c["hits"]) for c in report["cells"])
    cells = {c["policy"]: c for c in report["cells"]}
    assert cells["full"]["correct"] == 1  # the model does the task when nothing is evicted
    assert all(0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1 for c in report["cells"])
    assert f"| streamingllm | {cells['streamingllm']['correct']}/1 " in (tmp_path / "recall_passkey_smoke.md").read_text()


def test_soak_node_short_run_passes_and_records_samples(tmp_path: Path) -> None:
    """The CI version of the soak (half a minute): a real node subprocess, a 30 fps camera and
    questions over DDS; every question answered, memory within its bound."""
    import soak_node

    code = soak_node.main(["--minutes", "0.5", "--sample-every", "2", "--out", str(tmp_path), "--name", "soak"])
    report = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0 and report["passed"], report["failures"]
    assert report["questions_asked"] >= 8 and report["questions_answered"] == report["questions_asked"]
    rows = (tmp_path / "soak.csv").read_text().splitlines()
    assert len(rows) >= 10 and rows[0].startswith("seconds,rss_mb")
    assert int(report["last_sample"]["frames_ingested"]) > 0 and report["rss_growth_mb"] is not None


def test_bench_node_times_answers_from_the_stream_even_when_the_answer_topic_arrives_first() -> None:
    """The probe may record ``~/answer`` before pieces already waiting on ``~/answer_stream``
    (another topic): times come from the stream, so a first piece never follows its answer."""
    import bench_node

    asked = [10.0, 20.0]
    answers = [(10.010, "a cup"), (20.030, "")]  # recorded before the pieces below
    pieces = [(10.015, "a"), (10.016, " cup"), (10.017, ""), (20.031, "")]
    first, second = bench_node.per_question(asked, answers, pieces)
    assert first["first_piece_ms"] == pytest.approx(15.0) and first["answer_ms"] == pytest.approx(17.0)
    assert first["streamed"] == first["answer"] == "a cup"
    assert first["pieces"] == 2 and first["ms_per_later_piece"] == pytest.approx(1.0)  # 10.015 -> 10.016
    assert second["first_piece_ms"] is None and second["answer_ms"] == pytest.approx(31.0)


def test_bench_node_smoke_run_times_every_question(tmp_path: Path) -> None:
    """bench_node on the tiny random shape, CPU: every question answered, each with a first piece
    and a whole-answer time, frames counted from the node's diagnostics."""
    import bench_node

    code = bench_node.main(["--model", "tiny-qwen2", "--device", "cpu", "--questions", "3", "--question-every", "1",
                            "--settle", "1", "--capacity", "512", "--max-chunk", "64", "--max-new-tokens", "8",
                            "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_node_tiny-qwen2.json").read_text())
    assert code == 0 and report["answers"] == report["questions"] == 3
    rows = report["per_question"]
    assert all(0 < r["first_piece_ms"] <= r["answer_ms"] for r in rows)
    assert all(r["streamed"] == r["answer"] for r in rows)  # the pieces of each answer, in order
    assert report["node"]["captured_graphs"] == "0" and report["node"]["graph_capture_error"] == ""  # CPU: eager
    assert float(report["node"]["last_first_token_ms"]) > 0
    assert int(report["frames"]["frames_ingested"]) > 0 and float(report["max_frame_age_ms"]) >= 0
    assert "| query -> first answer piece" in (tmp_path / "bench_node_tiny-qwen2.md").read_text()


def test_eval_demo_keeps_each_cell_and_reports_a_run_cut_short(tmp_path: Path) -> None:
    """eval_demo on the tiny model (one stream, 4x the budget): every cell is saved as it ends; a
    report compiled from the cells alone names the cells that are missing, and merges a cell
    whose parts are all there."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_demo.py"
    run = [sys.executable, str(script), "--model", "tiny", "--device", "cpu", "--streams", "1", "--budget", "256",
           "--multiples", "4", "--split", "dev", "--policies", "h2o", "inf-mllm-lt[stretch=17]",
           "--out", str(tmp_path), "--name", "t"]
    subprocess.run(run, check=True, capture_output=True, cwd=script.parent)
    cells = sorted(p.name for p in (tmp_path / "t_cells").iterdir())
    assert cells == ["0x_full.json", "4x_h2o.json", "4x_inf-mllm-lt[stretch=17].json"]
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["split"] == "dev" and report["cells_not_run"] == []
    assert set(report["long_streams"]["4x"]) == {"h2o", "inf-mllm-lt[stretch=17]"}
    (tmp_path / "t_cells" / "4x_h2o.json").unlink()
    subprocess.run(run + ["--report-only"], check=True, capture_output=True, cwd=script.parent)
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["cells_not_run"] == ["4x h2o"] and set(report["long_streams"]["4x"]) == {"inf-mllm-lt[stretch=17]"}
    assert "Not run" in (tmp_path / "t.md").read_text()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "t_cells").iterdir()}
    subprocess.run(run + ["--keep-cells"], check=True, capture_output=True, cwd=script.parent)  # runs 4x h2o alone
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "t_cells").iterdir()}
    assert again.keys() - kept.keys() == {"4x_h2o.json"} and all(again[n] == t for n, t in kept.items())
    assert json.loads((tmp_path / "t.json").read_text())["cells_not_run"] == []
    # a cell left as parts by a run cut short (--shard-streams) is merged by --report-only too
    import eval_demo

    cell = tmp_path / "t_cells" / "4x_h2o.json"
    ((start, stop),) = eval_demo.shards(4, 1, 0)
    cell.rename(eval_demo.part_path(tmp_path / "t_cells", 4, "h2o", start, stop))
    subprocess.run(run + ["--report-only"], check=True, capture_output=True, cwd=script.parent)
    assert cell.exists() and json.loads((tmp_path / "t.json").read_text())["cells_not_run"] == []


def test_jetson_plan_scales_with_bandwidth_and_marks_what_does_not_fit(tmp_path: Path) -> None:
    import jetson_plan

    assert jetson_plan.main(["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "jetson_plan.json").read_text())
    rows = {(r["model"], r["weights"], r["board"]): r for r in report["measured"]}
    nano, agx = rows[("qwen2-1.5b", "float", "Orin Nano 8GB")], rows[("qwen2-1.5b", "float", "AGX Orin 64GB")]
    assert abs(agx["tokens_per_s"] / nano["tokens_per_s"] - 204.8 / 68) < 1e-6
    assert not rows[("llama2-7b", "float", "Orin Nano 8GB")]["fits"] and rows[("llama2-7b", "int4", "AGX Orin 64GB")]["fits"]
    goal = {(r["model"], r["weights"], r["board"]): r for r in report["bf16_efficiency"]}
    assert goal[("llama2-7b", "int4", "Orin NX 16GB")]["tokens_per_s"] > goal[("llama2-7b", "float", "Orin NX 16GB")]["tokens_per_s"]
    # int4-compact (head, table and tower int8, rows of the same run): int4's speed in less memory
    compact, int4 = rows[("llama2-7b", "int4-compact", "Orin NX 16GB")], rows[("llama2-7b", "int4", "Orin NX 16GB")]
    assert compact["roofline_fraction"] == int4["roofline_fraction"]
    assert compact["memory_gib"] < int4["memory_gib"] - 0.3
    assert ("qwen2-0.5b", "int4-compact", "Orin NX 16GB") in rows and report["compact_source"]
    # a measured shape's int4 memory is its own int4 row's peak (int8 head; not the compact row's)
    measured = json.loads((Path(jetson_plan.__file__).parent / "results" / report["source"]).read_text())
    (peak,) = [r["peak_memory_bytes"] for r in measured["ours"] if (r["model"], r["weights"], r["lm_head"]) ==
               ("llama2-7b", "int4", "int8") and r.get("vision_weights", "float") == "float"]
    assert int4["memory_gib"] == pytest.approx(peak / (1 << 30), abs=1e-6)
    assert jetson_plan.main(["--out", str(tmp_path / "none"), "--compact", str(tmp_path / "missing.json")]) == 0
    assert "int4-compact" not in (tmp_path / "none" / "jetson_plan.md").read_text()


def test_jetson_plan_takes_a_later_bench_gpu_run_for_its_shape_and_weight_type(tmp_path: Path) -> None:
    """--decode: a bench_gpu run's fraction of the roofline (roofline / p50 at the stream's end)
    replaces the llama.cpp comparison's for that shape and weight type only, and says so."""
    import jetson_plan

    checkpoints = [{"decode_p50_ms": 9.0, "peak_memory_bytes": 1 << 30},
                   {"decode_p50_ms": 3.0, "peak_memory_bytes": 8 << 30}]  # the stream's end is the last
    run = {"weights": "int4", "capacity": 4096, "ours": "h2o-kinds",
           "models": [{"model": "llama2-7b", "roofline_ms": 1.5,
                       "policies": {"h2o-kinds": {"checkpoints": checkpoints}}}]}
    (tmp_path / "later_int4.json").write_text(json.dumps(run))
    assert jetson_plan.main(["--out", str(tmp_path / "base")]) == 0
    assert jetson_plan.main(["--out", str(tmp_path), "--decode", str(tmp_path / "later_int4.json")]) == 0
    base = {(r["model"], r["weights"], r["board"]): r for r in
            json.loads((tmp_path / "base" / "jetson_plan.json").read_text())["measured"]}
    rows = {(r["model"], r["weights"], r["board"]): r for r in
            json.loads((tmp_path / "jetson_plan.json").read_text())["measured"]}
    replaced = rows[("llama2-7b", "int4", "AGX Orin 64GB")]
    assert replaced["roofline_fraction"] == 0.5 and "later_int4" in replaced["efficiency_from"]
    assert rows[("llama2-7b", "int8", "AGX Orin 64GB")] == base[("llama2-7b", "int8", "AGX Orin 64GB")]
    assert rows[("qwen2-1.5b", "int4", "AGX Orin 64GB")] == base[("qwen2-1.5b", "int4", "AGX Orin 64GB")]
    assert "later_int4.json" in (tmp_path / "jetson_plan.md").read_text()


def test_eval_demo_session_suffixes_set_merging_pooling_and_packed_weights(tiny_model_dir: Path) -> None:
    import eval_demo
    import session_variants

    assert session_variants.session_variant("h2o") == ("h2o", {})
    assert session_variants.session_variant("look-m[merge=0]+pool2+merge") == ("look-m[merge=0]",
                                                                        {"visual_pool": 2, "merge_evicted": True})
    assert session_variants.session_variant("h2o+int4") == ("h2o", {"weights": "int4"})
    assert session_variants.session_variant("streamingllm+pyramid") == ("streamingllm", {"drop_layers": "auto"})
    assert session_variants.session_variant("h2o+drop15-22+keep0.25") == ("h2o", {"drop_layers": (15, 22),
                                                                                 "drop_keep": 0.25})
    evaluator = eval_demo.Evaluator(tiny_model_dir, "cpu")
    packed, _ = evaluator.model_and_backend("int8")
    assert evaluator.model_and_backend("float")[0] is evaluator.model
    assert evaluator.model_and_backend("int8")[0] is packed  # loaded once
    assert type(packed.decoder.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    # +int8-x8: the same packing, each packed product's input rounded as the GPU's decode rounds it
    assert session_variants.session_variant("h2o+int8-x8") == ("h2o", {"weights": "int8-x8"})
    rounded, _ = evaluator.model_and_backend("int8-x8")
    assert rounded is not packed and rounded.decoder.layers[0].mlp.down_proj._forward_pre_hooks
    assert not packed.decoder.layers[0].mlp.down_proj._forward_pre_hooks
    assert session_variants.session_variant("h2o+vision8") == ("h2o", {"vision_weights": "int8"})
    tower, _ = evaluator.model_and_backend("float", "int8")
    assert tower is not evaluator.model and type(tower.decoder.layers[0].mlp.down_proj).__name__ == "Linear"
    assert any(type(m).__name__ == "QuantizedLinear" for m in tower.vision_tower.modules())
    with pytest.raises(ValueError, match=r"\+fast"):
        session_variants.session_variant("h2o+fast")


def test_bench_gpu_packs_the_head_table_and_tower_it_is_asked_to(tmp_path: Path) -> None:
    """``--lm-head`` (with float blocks too), ``--embeddings`` and ``--vision-weights``: the
    report names them and the head's bytes a token reads shrink (the tied table is the head's)."""
    common = ["--smoke", "--models", "tiny-qwen2", "--policies", "h2o", "--skip-transformers", "--out", str(tmp_path)]
    assert bench_gpu.main(common + ["--name", "plain"]) == 0
    assert bench_gpu.main(common + ["--name", "packed", "--lm-head", "int8", "--embeddings", "int8",
                                    "--vision-weights", "int8"]) == 0
    plain, packed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "packed"))
    assert (packed["lm_head"], packed["embeddings"], packed["vision_weights"]) == ("int8", "int8", "int8")
    assert packed["models"][0]["decoder_weight_bytes"] < plain["models"][0]["decoder_weight_bytes"]
    assert "LM head int8, embeddings int8, vision int8" in (tmp_path / "packed.md").read_text()


def test_bench_gpu_smoke_run_streams_the_qwen2_5_vl_and_smolvlm_shapes(tmp_path: Path) -> None:
    """The new families' shapes run through bench_gpu (tiny versions on the CPU): camera frames of
    the shape's size, each layout's frame tokens counted, transformers' decoder beside ours."""
    assert bench_gpu.main(["--smoke", "--models", "tiny-qwen2.5-vl", "tiny-smolvlm", "--policies", "h2o",
                           "streamingllm", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    models = {m["model"]: m for m in report["models"]}
    assert [models[n]["layout"] for n in ("tiny-qwen2.5-vl", "tiny-smolvlm")] == ["qwen2_5_vl", "idefics3"]
    for model in models.values():
        assert model["image_tokens"] > 0 and all("tokens_per_s" in row for row in model["transformers"])
        for policy in model["policies"].values():
            assert policy["frame_size"] == [48, 64] and policy["evictions"] > 0
            assert all(c["cache_length"] <= 128 for c in policy["checkpoints"])
    assert bench_gpu.FAMILY_SHAPES["qwen2.5-vl-3b"]["layout"] == "qwen2_5_vl"  # the real shapes the GPU run uses


def test_lora_packing_measures_how_much_of_a_small_update_survives_rounding() -> None:
    """A base already on an int4 grid plus an update far below the grid's step: int4 rounds most
    of the update away (back onto the base's grid), int8's finer grid keeps it on average."""
    import lora_packing
    import torch
    from ros_infmllm.model.quantized import QuantizedLinear

    generator = torch.Generator().manual_seed(0)
    base = QuantizedLinear.from_float(torch.randn(64, 128, generator=generator), None, "int4").dequantized()
    update = 0.002 * torch.randn(64, 128, generator=generator)
    kept_int4, error_int4 = lora_packing.update_kept(base + update, base, "int4")
    kept_int8, _ = lora_packing.update_kept(base + update, base, "int8")
    assert kept_int4 < 0.3 and 0.9 < kept_int8 < 1.1
    assert error_int4 > 0.7  # rounded back to the base: the error is about the whole update


def test_bench_prefill_mass_smoke_run_compares_both_paths(tmp_path: Path) -> None:
    """The prefill-mass benchmark on a tiny shape in Triton's interpreter (its own process, so the
    interpreter is on before the kernels load): both paths timed, their outputs and masses agree."""
    script = Path(bench_gpu.__file__).with_name("bench_prefill_mass.py")
    subprocess.run([sys.executable, str(script), "--smoke", "--sweep", "--out", str(tmp_path)], check=True,
                   capture_output=True, cwd=script.parent, timeout=600)
    row = json.loads((tmp_path / "bench_prefill_mass.json").read_text())["rows"][0]
    assert row["explicit_ms"] > 0 and row["fused_ms"] > 0
    assert row["max_output_difference"] < 1e-4 and row["max_mass_difference"] < 1e-4
    assert abs(row["mass_per_head"] - row["expected_mass_per_head"]) < 1e-3
    grid = row["mass_op"]["grid"]  # every launch shape of the sweep gives the explicit path's mass
    assert [(g["block_m"], g["mass_block_n"]) for g in grid] == [(16, 16), (16, 32)]
    assert all(g["max_mass_difference"] < 1e-4 and g["us"] > 0 for g in grid)
    assert "The mass op alone" in (tmp_path / "bench_prefill_mass.md").read_text()


def test_capture_check_smoke_run_reports_the_node_session(tmp_path: Path) -> None:
    """The capture check on the tiny model (CPU, eager): it builds the node's session from the
    parameter defaults, warms it up, streams frames and questions, and says nothing was captured."""
    import capture_check

    assert capture_check.main(["--smoke", "--out", str(tmp_path), "--name", "check"]) == 0
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["policy"] == DEFAULT_POLICY and report["dtype"] == "float32"
    assert report["frames"] == 6 and report["questions"] == 2 and report["tokens_streamed"] > 6 * 10
    assert report["graphs_at_end"] == [] and report["capture_error"] is None
    assert "graphs captured after warm-up" in (tmp_path / "check.md").read_text()


def test_frames_held_counts_more_frames_in_the_deep_layers_of_a_staged_drop(tmp_path: Path) -> None:
    """The tiny model, one stream: streamingllm keeps the same frames in every layer; with the
    staged drop its deeper layers hold more of them, in the same cache bytes."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "frames_held.py"
    subprocess.run([sys.executable, str(script), "--model", "tiny", "--capacity", "256", "--frames", "40",
                    "--variants", "streamingllm", "streamingllm+pyramid", "--out", str(tmp_path), "--name", "held"],
                   check=True, capture_output=True, cwd=script.parent)
    plain, dropping = json.loads((tmp_path / "held.json").read_text())["rows"]
    assert plain["samples"] > 10 and len(set(plain["frames_held_per_layer"])) == 1
    assert dropping["frames_held"]["first"] == plain["frames_held"]["first"]
    assert dropping["frames_held"]["last"] > plain["frames_held"]["last"] and dropping["drop_layers"]
    assert dropping["cache_bytes"] == plain["cache_bytes"]
    assert "| streamingllm+pyramid |" in (tmp_path / "held.md").read_text()


def test_bench_gpu_times_a_visual_token_reduction_as_a_policy_variant(tmp_path: Path) -> None:
    """``h2o+pyramid`` streams through the same driver as the plain policies (CPU smoke: the
    figures are checked for presence and bounds, not speed)."""
    assert bench_gpu.main(["--smoke", "--policies", "h2o+pyramid", "streamingllm", "--skip-transformers",
                           "--out", str(tmp_path)]) == 0
    (model,) = json.loads((tmp_path / "bench_gpu.json").read_text())["models"]
    dropping = model["policies"]["h2o+pyramid"]
    assert dropping["ingest_p50_ms"] > 0 and dropping["evictions"] > 0
    assert all(c["cache_length"] <= 128 for c in dropping["checkpoints"])


def test_packed_prefill_memory_compares_both_products_in_fresh_processes(tmp_path: Path) -> None:
    """Before and now give the same product and each has a measured peak (the figures mean
    nothing on a tiny matrix)."""
    script = Path(bench_gpu.__file__).with_name("packed_prefill_memory.py")
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--name", "ppm"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads((tmp_path / "ppm.json").read_text())["rows"]
    assert row["relative_difference"] < 1e-6 and row["now"]["packed_bytes"] == row["before"]["packed_bytes"] > 0
    assert row["before"]["peak_growth_bytes"] >= 0 and row["now"]["peak_growth_bytes"] >= 0
    assert "| tiny (96 x 64) |" in (tmp_path / "ppm.md").read_text()


def test_memory_peak_finds_what_is_live_at_the_most_bytes_after_the_reset() -> None:
    """benchmarks/memory_peak.py on a synthetic allocator trace: the peak is counted from the reset
    on (an earlier, larger load-time peak is not it), frees end a block's life, and each block is
    owned by its innermost frame inside the repository."""
    import memory_peak

    repo = str(memory_peak.REPOSITORY)
    here = [{"filename": f"{repo}/ros_infmllm/model/decoder.py", "line": 7, "name": "step"},
            {"filename": "/usr/lib/python3/torch/nn/functional.py", "line": 1, "name": "linear"}]
    weights = [{"filename": f"{repo}/ros_infmllm/model/quantized.py", "line": 3, "name": "pack"}]
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": weights},
             {"action": "alloc", "addr": 2, "size": 900, "frames": weights},  # load-time temporary
             {"action": "free_completed", "addr": 2, "size": 900},
             {"action": "alloc", "addr": 3, "size": 50, "frames": here[1:]},  # reset happens before this
             {"action": "alloc", "addr": 4, "size": 30, "frames": here},
             {"action": "free_completed", "addr": 4, "size": 30},
             {"action": "alloc", "addr": 5, "size": 40, "frames": here},
             {"action": "alloc", "addr": 6, "size": 20, "frames": here}]
    peak, blocks = memory_peak.peak_allocations(trace, start=3)
    assert peak == 210 and set(blocks) == {1, 3, 5, 6}
    owners = {row["owner"]: row for row in memory_peak.by_owner(blocks)}
    assert owners["ros_infmllm/model/decoder.py:7 step"]["bytes"] == 60
    assert owners["ros_infmllm/model/decoder.py:7 step"]["blocks"] == 2
    assert owners["ros_infmllm/model/quantized.py:3 pack"]["bytes"] == 100
    assert owners["functional.py:1 linear"]["bytes"] == 50  # no frame in the repository: the innermost
    assert memory_peak.peak_allocations(trace)[0] == 1000  # from the start, the load's peak
