"""Packed weights against llama.cpp on the same GPU: ``python benchmarks/bench_llamacpp.py --source SDIST``.

One run, for the decoder shapes of ``bench_gpu.py`` (random weights, batch 1, 4096 tokens of context):

- **llama.cpp**: ``llama-bench`` built from the ``llama-cpp-python`` source distribution on PyPI
  (``--source``: its ``.tar.gz``, or a folder holding ``vendor/llama.cpp`` or llama.cpp itself;
  only the ``llama-bench`` target, CUDA for ``--cuda-arch``), run on random-weight GGUFs of each
  shape in F16, Q8_0, Q4_0 and Q4_1 (every 2-D weight in the file's type, the LM head included;
  norms and biases f32; no tokenizer, ``tokenizer.ggml.model = none``) as
  ``llama-bench -p 0 -n 128 -d 4096``: tokens/s of 128 decode steps after a 4096-token context.
  Its GPU memory is the device's used memory (NVML, sampled every 50 ms) above the idle level.
- **ours**: the same shape streamed into a ``StreamingSession`` to 4096 tokens (frames through
  the SigLIP so400m/384 tower, the node's default policy, a 4096-token cache), then 128 decode
  steps (p50 ms/token) in bf16, int8 and int4 (groups of 32; int4 with offsets, as Q4_1), the LM
  head bf16 or packed, and the embedding table and the tower too where a setting names them
  (``--ours weights/head[/embeddings[/vision]]``); peak memory allocated by PyTorch while streaming, and the
  memory of each part (packed projections, embeddings, LM head, vision tower and projector, cache).

``--kv-cache int8``: both sides keep an 8-bit cache: ours int8 codes with a scale per token and
KV head (cache/kv_codes.py), llama.cpp's Q8_0 blocks for K and V (``-ctk q8_0 -ctv q8_0 -fa on``:
its quantized V cache needs flash attention).

Roofline: (weight bytes one token reads + cache bytes) / the copy bandwidth measured in the run.
Writes ``<out>/<name>.{json,md}``; prints the table. ``--smoke`` runs a tiny shape on the CPU
(llama.cpp built without CUDA) to keep the script working; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import bench_gpu
from launch_tuning import tuning_for_run
from ros_infmllm.cache import DEFAULT_POLICY
from ros_infmllm.cache.kv_codes import KV_CACHE_DTYPES
from ros_infmllm.model import decode_linear
from ros_infmllm.model.checkpoint import pack_parts
from ros_infmllm.model.quantized import HEAD_MODES, quantize_decoder

RESULTS = Path(__file__).resolve().parent / "results"
GGUF_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1")
# (our weights, our LM head) rows; the LM head packed as the file types pack llama.cpp's
OURS = (("float", "float"), ("int8", "int8"), ("int4", "int8"), ("int4", "int4"))


def parse_setting(text: str) -> tuple[str, str, str, str]:
    """``weights/head[/embeddings[/vision]]`` (e.g. ``int4/int8/int8/int8``) -> the four modes
    (embeddings and the tower float when left out)."""
    parts = text.split("/")
    if len(parts) not in (2, 3, 4) or any(p not in HEAD_MODES for p in parts):
        raise ValueError(f"{text!r}: expected weights/head[/embeddings[/vision]], each one of {', '.join(HEAD_MODES)}")
    return tuple(parts + ["float"] * (4 - len(parts)))


def setting_of(row: dict) -> str:
    """A row's ``--ours`` setting, trailing float parts left out (rows from before packed
    embeddings and towers have neither: float)."""
    parts = [row["weights"], row["lm_head"], row.get("embeddings", "float"), row.get("vision_weights", "float")]
    while len(parts) > 2 and parts[-1] == "float":
        parts.pop()
    return "/".join(parts)
COUNTERPART = {"float": ("F16",), "int8": ("Q8_0",), "int4": ("Q4_0", "Q4_1")}


# ---- llama.cpp ------------------------------------------------------------------------------------
def llama_cpp_tree(source: Path, work: Path) -> Path:
    """The llama.cpp source folder inside ``source`` (an sdist tarball is unpacked into ``work``)."""
    if source.is_file():
        with tarfile.open(source) as archive:
            archive.extractall(work, filter="data")
        source = work
    for candidate in (source, *source.glob("*"), *source.glob("*/vendor/llama.cpp"), *source.glob("vendor/llama.cpp")):
        if (candidate / "tools" / "llama-bench").is_dir() and (candidate / "CMakeLists.txt").is_file():
            return candidate
    raise FileNotFoundError(f"no llama.cpp source (tools/llama-bench) under {source}")


def source_version(binary: Path) -> str | None:
    """What a built ``llama-bench`` was built from, where llama-bench itself says "unknown" (a tree
    that is no git checkout, such as the sdist's ``vendor/llama.cpp``): the ggml version in the
    source tree its build folder's CMake cache names, and the llama-cpp-python version where the
    tree still sits in its sdist. None where no such tree is found."""
    cache = binary.resolve().parent.parent / "CMakeCache.txt"
    if not cache.is_file():
        return None
    found = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cache.read_text(errors="replace"), re.MULTILINE)
    ggml = Path(found.group(1).strip()) / "ggml" / "CMakeLists.txt" if found else None
    if ggml is None or not ggml.is_file():
        return None
    parts = [re.search(rf"set\(GGML_VERSION_{part} (\d+)\)", ggml.read_text()) for part in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    version = "ggml " + ".".join(p.group(1) for p in parts)
    sdist = ggml.parent.parent.parent.parent / "PKG-INFO"  # <sdist>/vendor/llama.cpp/ggml
    named = re.search(r"^Version: (\S+)$", sdist.read_text(), re.MULTILINE) if sdist.is_file() else None
    return f"llama-cpp-python {named.group(1)}, {version}" if named else version


def build_llama_bench(tree: Path, build: Path, cuda_arch: str | None, jobs: int) -> Path:
    """Configure and build only ``llama-bench``; returns the executable."""
    binary = build / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DGGML_NATIVE=OFF"]
    if cuda_arch:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-G", "Ninja", *flags], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(jobs)], check=True)
    return binary


def _tiled(make_rows, rows: int) -> np.ndarray:
    """A ``[rows, ...]`` array repeating a random block of at most 64 rows (values don't set speed)."""
    block = make_rows(min(rows, 64))
    return np.resize(block, (rows, *block.shape[1:]))


def write_random_gguf(path: Path, text: dict, kind: str, seed: int = 0) -> Path:
    """A GGUF of decoder shape ``text`` (a ``bench_gpu`` text config) with random weights in ``kind``."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(seed)
    arch = text["model_type"]
    hidden, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv_heads, vocab = text["num_attention_heads"], text["num_key_value_heads"], text["vocab_size"]
    kv = hidden // heads * kv_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(text["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(text["rms_norm_eps"])
    writer.add_rope_freq_base(text["rope_theta"])
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("none")
    writer.add_file_type({"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3}[kind])

    def matrix(name: str, rows: int, cols: int) -> None:
        def make(count: int) -> np.ndarray:
            values = (0.02 * rng.standard_normal((count, cols))).astype(np.float32)
            return values.astype(np.float16) if kind == "F16" else quants.quantize(values, GGMLQuantizationType[kind])
        data = _tiled(make, rows)
        writer.add_tensor(name, data, raw_dtype=None if kind == "F16" else GGMLQuantizationType[kind])

    def vector(name: str, size: int, value: float | None = None) -> None:
        data = np.full(size, value, np.float32) if value is not None else np.zeros(size, np.float32)
        writer.add_tensor(name, data)

    matrix("token_embd.weight", vocab, hidden)
    vector("output_norm.weight", hidden, 1.0)
    if not text.get("tie_word_embeddings"):
        matrix("output.weight", vocab, hidden)
    for i in range(layers):
        vector(f"blk.{i}.attn_norm.weight", hidden, 1.0)
        vector(f"blk.{i}.ffn_norm.weight", hidden, 1.0)
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", kv, hidden), ("attn_v", kv, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", inter, hidden),
                                 ("ffn_up", inter, hidden), ("ffn_down", hidden, inter)):
            matrix(f"blk.{i}.{name}.weight", rows, cols)
        if arch == "qwen2":
            for name, size in (("attn_q", hidden), ("attn_k", kv), ("attn_v", kv)):
                vector(f"blk.{i}.{name}.bias", size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class GpuMemorySampler:
    """Peak device memory in use (NVML) while a block runs, above the level before it."""

    def __init__(self, period: float = 0.05) -> None:
        self.period, self.peak, self.idle, self._stop = period, 0, 0, threading.Event()

    def _used(self) -> int:
        import pynvml

        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used

    def __enter__(self) -> "GpuMemorySampler":
        try:
            import pynvml

            pynvml.nvmlInit()
            self.idle = self.peak = self._used()
        except Exception:  # noqa: BLE001 - no NVML (the CPU smoke run): no memory figure
            self.idle = -1
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.idle >= 0:
            self._thread.join()

    @property
    def used_bytes(self) -> int | None:
        return None if self.idle < 0 else self.peak - self.idle


def run_llama_bench(binary: Path, model: Path, depth: int, tokens: int, repetitions: int,
                    kv_cache: str = "model") -> dict:
    command = [str(binary), "-m", str(model), "-p", "0", "-n", str(tokens), "-d", str(depth),
               "-r", str(repetitions), "-o", "json"]
    if kv_cache == "int8":  # Q8_0 K and V; a quantized V cache needs flash attention
        command += ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]
    with GpuMemorySampler() as memory:
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr or done.stdout)[-600:], "command": " ".join(command)}
    row = json.loads(done.stdout)[0]
    return {"tokens_per_s": row["avg_ts"], "tokens_per_s_stddev": row["stddev_ts"],
            "ms_per_token": 1e3 / row["avg_ts"], "model_size_bytes": row.get("model_size"),
            "flash_attn": row.get("flash_attn"), "n_gpu_layers": row.get("n_gpu_layers"),
            "build_commit": row.get("build_commit"), "gpu_memory_used_bytes": memory.used_bytes,
            "type_k": row.get("type_k"), "type_v": row.get("type_v"),
            "command": " ".join(command)}


# ---- ours -------------------------------------------------------------------------------------------
def part_bytes(model) -> dict[str, int]:
    """Bytes held by each part of the model, each storage counted once (fused projections are
    views of one buffer; a tied table is counted under the embeddings)."""
    def storages(module) -> dict[int, int]:
        tensors = (t for t in (*module.parameters(), *module.buffers()) if t is not None)
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    decoder = model.decoder
    embed, head, blocks = storages(decoder.embed_tokens), storages(decoder.lm_head), storages(decoder.layers)
    whole, text = storages(model), storages(decoder)
    head = {k: v for k, v in head.items() if k not in embed}
    rest = {k: v for k, v in text.items() if k not in embed and k not in head and k not in blocks}
    return {"decoder_blocks": sum(blocks.values()), "embeddings": sum(embed.values()), "lm_head": sum(head.values()),
            "vision_and_projector": sum(v for k, v in whole.items() if k not in text),
            "norms_and_rest": sum(rest.values())}


def bench_ours(name: str, shape: dict, setting: str, args, device: str, bandwidth: float) -> dict:
    weights, head, embeddings, vision = parse_setting(setting)
    folder = bench_gpu.write_checkpoint_config(Path(tempfile.mkdtemp()) / name, shape)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = bench_gpu.random_model(folder, device, dtype)
    if weights != "float":
        quantize_decoder(model.decoder, weights)
    pack_parts(model, head, embeddings, vision)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    tokenizer = bench_gpu.word_tokenizer(model.cfg.text.vocab_size)
    weight_bytes = bench_gpu.decoder_bytes_per_token(model)
    cache = bench_gpu.cache_bytes(model, args.depth, args.kv_cache)
    run_args = SimpleNamespace(capacity=args.depth, max_chunk=min(1024, args.depth // 4), stream_tokens=[args.depth],
                               decode_tokens=args.tokens, ingest_frames=args.ingest_frames, kv_cache=args.kv_cache)
    timed = bench_gpu.bench_policy(model, tokenizer, folder, args.policy, run_args, device)
    last = timed["checkpoints"][-1]
    parts = part_bytes(model)
    parts["cache"] = cache
    row = {"model": name, "weights": weights, "lm_head": head, "embeddings": embeddings, "vision_weights": vision,
           "kv_cache": args.kv_cache,
           "decode_p50_ms": last["decode_p50_ms"],
           "decode_p99_ms": last["decode_p99_ms"], "tokens_per_s": 1e3 / last["decode_p50_ms"],
           "streamed_tokens": last["streamed_tokens"], "weight_bytes_per_token": weight_bytes,
           "cache_bytes": cache, "roofline_ms": 1e3 * (weight_bytes + cache) / bandwidth,
           "peak_memory_bytes": last["peak_memory_bytes"], "parts_bytes": parts,
           "ingest_p50_ms": timed["ingest_p50_ms"]}
    row["roofline_fraction"] = row["roofline_ms"] / row["decode_p50_ms"]
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


# ---- report -----------------------------------------------------------------------------------------
def summarise(report: dict) -> dict:
    """Issue 19's targets, each with its measured figure."""
    out = {}
    for model in {r["model"] for r in report["ours"]}:
        ours = {setting_of(r): r for r in report["ours"] if r["model"] == model}
        theirs = {r["type"]: r for r in report["llama_cpp"] if r["model"] == model and "tokens_per_s" in r}
        row = {}
        base = ours.get("float/float")
        for setting, r in ours.items():
            weights, head, embeddings, vision = parse_setting(setting)
            key = (f"{weights}_head_{head}" + (f"_embeddings_{embeddings}" if embeddings != "float" else "")
                   + (f"_vision_{vision}" if vision != "float" else ""))
            if base and weights != "float":
                row[f"speedup_over_bf16_{key}"] = r["tokens_per_s"] / base["tokens_per_s"]
                if base["peak_memory_bytes"]:  # none on the CPU
                    row[f"peak_memory_over_bf16_{key}"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
            for kind in COUNTERPART[weights]:
                if kind in theirs:
                    row[f"ours_{key}_over_llama_cpp_{kind}"] = r["tokens_per_s"] / theirs[kind]["tokens_per_s"]
        out[model] = row
    return out


def write_markdown(report: dict, path: Path) -> None:
    gib = 1 << 30
    lines = ["# Packed weights against llama.cpp", "",
             f"Device {report['device']}; copy bandwidth {report['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s; "
             f"torch {report['torch']}; llama.cpp {report.get('llama_cpp_commit', '?')} "
             f"(`llama-bench -p 0 -n {report['tokens']} -d {report['depth']} -r {report['repetitions']}`"
             + (" with `-ctk q8_0 -ctv q8_0 -fa on`" if report.get("kv_cache") == "int8" else "") + "; "
             f"ours: policy {report['policy']}, cache {report['depth']} tokens"
             + (" in int8" if report.get("kv_cache") == "int8" else "") + f", p50 of {report['tokens']} decode "
             f"steps after {report['depth']} streamed tokens"
             + (f", matrix-vector launch shape {' '.join(report['matvec_overrides'])}" if report.get("matvec_overrides")
                else "") + f"; {report['seconds']} s.", "",
             "| model | ours: weights / LM head [/ embeddings [/ vision]] | ms/token p50 | tokens/s | roofline ms "
             "| of roofline | peak GiB "
             "| llama.cpp type | tokens/s | GPU memory GiB | ours / llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    theirs = {(r["model"], r["type"]): r for r in report["llama_cpp"]}
    for r in report["ours"]:
        for kind in [kind for kind in COUNTERPART[r["weights"]] if kind in report.get("types", GGUF_TYPES)]:
            other = theirs.get((r["model"], kind), {})
            tps = other.get("tokens_per_s")
            used = other.get("gpu_memory_used_bytes")
            ratio = f"{r['tokens_per_s'] / tps:.2f}x" if tps else "-"
            measured = f"{tps:.1f}" if tps else other.get("error", "not run")[:60].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['model']} | {setting_of(r).replace('/', ' / ')} | {r['decode_p50_ms']:.3f} | "
                         f"{r['tokens_per_s']:.1f} | {r['roofline_ms']:.3f} | {100 * r['roofline_fraction']:.0f}% | "
                         f"{r['peak_memory_bytes'] / gib:.2f} | {kind} | "
                         f"{measured} | {used / gib if used else float('nan'):.2f} | {ratio} |")
    lines += ["", "Memory of each part (ours, GiB): decoder blocks / embeddings / LM head / vision + projector / "
              "cache / peak while streaming", ""]
    for r in report["ours"]:
        p = r["parts_bytes"]
        lines.append(f"- {r['model']} {setting_of(r)}: {p['decoder_blocks'] / gib:.2f} / "
                     f"{p['embeddings'] / gib:.2f} / {p['lm_head'] / gib:.2f} / {p['vision_and_projector'] / gib:.2f} / "
                     f"{p['cache'] / gib:.2f} / {r['peak_memory_bytes'] / gib:.2f}")
    lines += ["", "Targets (issue 19):", ""]
    for model, row in report["summary"].items():
        lines.append(f"- {model}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(row.items())))
    path.write_text("\n".join(lines) + "\n")


def run_row_in_child(name: str, setting: str, args) -> None:
    """One of our rows timed in a fresh interpreter that adds it to the results file (``--resume``).
    Why: in one process the H200 run of 2026-12-02 saw the 7B rows' peak memory grow row by row
    (16.3, 26.0, 33.2, 40.3 GiB), by about each earlier row's model, so a row's peak was not its
    own (the cause, memory of earlier rows kept alive, was not pinned down); a child's memory,
    compiled code and CUDA graphs end with it."""
    command = [sys.executable, str(Path(__file__).resolve()), "--skip-llama-cpp", "--in-process", "--resume",
               "--models", name, "--ours", setting, "--depth", str(args.depth), "--tokens", str(args.tokens),
               "--ingest-frames", str(args.ingest_frames), "--policy", args.policy, "--out", str(args.out),
               "--name", args.name, "--kv-cache", args.kv_cache, "--types", *args.types] + (["--smoke"] if args.smoke else [])
    command += ["--matvec", *args.matvec] if args.matvec else []
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="llama-cpp-python sdist (.tar.gz) or a llama.cpp folder")
    parser.add_argument("--llama-bench", type=Path, help="an already built llama-bench (skips the build)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_llamacpp")
    parser.add_argument("--cuda-arch", default="90a")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["qwen2-1.5b", "llama2-7b"])
    parser.add_argument("--types", nargs="+", default=list(GGUF_TYPES), choices=GGUF_TYPES)
    parser.add_argument("--ours", nargs="+", default=[f"{w}/{h}" for w, h in OURS],
                        help="settings of ours to time: weights/LM-head[/embeddings[/vision]] (e.g. int4/int8, "
                             "int4/int8/int8/int8)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build llama-bench and write the GGUFs, time nothing (e.g. while the GPU does other work)")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--depth", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--ingest-frames", type=int, default=5)
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="model",
                        help="int8: our cache in int8 and llama.cpp's in Q8_0 (-ctk q8_0 -ctv q8_0 -fa on)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bench_llamacpp")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an earlier run's <out>/<name>.json and time only the missing ones")
    parser.add_argument("--in-process", action="store_true",
                        help="time our rows in this process (default: each row in a fresh interpreter)")
    parser.add_argument("--matvec", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="our decode matrix-vector op's launch shape (fields of decode_linear.MatvecTuning)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script, not speed")
    args = parser.parse_args(argv)
    for setting in args.ours:
        try:
            parse_setting(setting)
        except ValueError as error:
            parser.error(f"--ours {error}")
    with tuning_for_run(parser, decode_linear.TUNING, args.matvec):
        return run(args)


def run(args) -> int:
    """llama.cpp's rows, then ours, each saved to the results file as it is timed."""
    shapes = bench_gpu.SHAPES
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        shapes, args.models, args.cuda_arch = bench_gpu.SMOKE_SHAPES, list(bench_gpu.SMOKE_SHAPES), None
        args.depth, args.tokens, args.repetitions, args.ingest_frames = 128, 8, 1, 1
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    bandwidth = bench_gpu.copy_bandwidth(device, 16 if args.smoke else 2048)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor()})",
              "torch": torch.__version__, "bandwidth_bytes_per_s": bandwidth, "depth": args.depth,
              "tokens": args.tokens, "repetitions": args.repetitions, "policy": args.policy,
              "matvec_overrides": args.matvec, "kv_cache": args.kv_cache, "types": args.types,
              "llama_cpp": [], "ours": []}
    args.out.mkdir(parents=True, exist_ok=True)
    earlier = args.out / f"{args.name}.json"
    if args.resume and earlier.is_file():
        kept = json.loads(earlier.read_text())
        report["llama_cpp"] = [r for r in kept["llama_cpp"] if "tokens_per_s" in r]
        report["ours"] = kept["ours"]
        report["llama_cpp_commit"] = kept.get("llama_cpp_commit")
    done_theirs = {(r["model"], r["type"]) for r in report["llama_cpp"]}
    done_ours = {(r["model"], setting_of(r)) for r in report["ours"]}

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["summary"] = summarise(report)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        write_markdown(report, args.out / f"{args.name}.md")

    if not args.skip_llama_cpp:
        binary = args.llama_bench or build_llama_bench(llama_cpp_tree(args.source, args.work / "src"),
                                                       args.work / "build", args.cuda_arch, args.jobs)
        built_from = source_version(binary)  # where llama-bench reports its commit as unknown
        for name in args.models:
            for kind in args.types:
                gguf_path = args.work / f"{name}-{kind}.gguf"
                if not gguf_path.is_file():
                    write_random_gguf(gguf_path.with_suffix(".part"), shapes[name]["text"], kind)
                    gguf_path.with_suffix(".part").rename(gguf_path)
                if args.prepare_only or (name, kind) in done_theirs:
                    continue
                row = {"model": name, "type": kind, **run_llama_bench(binary, gguf_path, args.depth, args.tokens,
                                                                     args.repetitions, args.kv_cache)}
                report["llama_cpp"].append(row)
                commit = row.get("build_commit")
                report["llama_cpp_commit"] = (commit if commit not in (None, "unknown")
                                              else built_from or commit or report.get("llama_cpp_commit"))
                print(f"llama.cpp {name} {kind}: {row.get('tokens_per_s', row.get('error'))}", flush=True)
                save()
    if args.prepare_only:
        return 0
    if not args.skip_ours:
        for name in args.models:
            for setting in args.ours:
                if (name, setting) in done_ours:
                    continue
                if not args.in_process:
                    save()  # the child resumes from this file and adds its row
                    run_row_in_child(name, setting, args)
                    report["ours"] = json.loads((args.out / f"{args.name}.json").read_text())["ours"]
                    row = report["ours"][-1]
                else:
                    row = bench_ours(name, shapes[name], setting, args, device, bandwidth)
                    report["ours"].append(row)
                print(f"ours {name} {setting}: {row['decode_p50_ms']:.3f} ms "
                      f"({100 * row['roofline_fraction']:.0f}% of roofline), peak "
                      f"{row['peak_memory_bytes'] / (1 << 30):.2f} GiB", flush=True)
                save()
    save()
    print((args.out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
