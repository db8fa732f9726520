"""Tables, target summary and plot of a ``bench_gpu.py`` report (its JSON as a dict)."""
from __future__ import annotations

from pathlib import Path

from plotting import pyplot


def summarise(report: dict) -> dict:
    """Targets of issues 6 and 15, each with the measured figure: for the default policy ("ours", the
    first timed), and each policy's decode p50 at the end of the stream over streamingllm's."""
    out = {}
    default = report.get("ours", "inf-mllm")
    for m in report["models"]:
        ours = m["policies"][default]["checkpoints"]
        first, last = ours[0], ours[-1]
        row = {"roofline_fraction_p50": m["roofline_ms"] / last["decode_p50_ms"],
               "p50_last_over_first": last["decode_p50_ms"] / first["decode_p50_ms"],
               "peak_memory_growth": (last["peak_memory_bytes"] / ours[1]["peak_memory_bytes"] - 1)
               if len(ours) > 2 and ours[1]["peak_memory_bytes"] else float("nan"),
               "eviction_share_of_decode": m["policies"][default]["eviction_amortised_ms_per_token"]
               / last["decode_p50_ms"],
               "frame_ingest_p50_ms": m["policies"][default]["ingest_p50_ms"]}
        if "streamingllm" in m["policies"]:
            baseline = m["policies"]["streamingllm"]["checkpoints"][-1]["decode_p50_ms"]
            for policy, timed in m["policies"].items():
                if policy != "streamingllm":
                    row[f"decode_p50_over_streamingllm_{policy}"] = timed["checkpoints"][-1]["decode_p50_ms"] / baseline
        for hf in m.get("transformers", []):
            if "tokens_per_s" in hf:
                suffix = "" if hf.get("cache", "dynamic") == "dynamic" else "_static_compiled"
                row[f"speedup_vs_transformers_{hf['context']}{suffix}"] = ((1e3 / last["decode_p50_ms"])
                                                                          / hf["tokens_per_s"])
        out[m["model"]] = row
    return out


def write_markdown(report: dict, path: Path) -> None:
    gb = 1 << 30
    lines = ["# GPU benchmark", "",
             f"Produced by `benchmarks/bench_gpu.py` in one run on {report['device']} "
             f"({report['torch']}, transformers {report['transformers']}), {report['seconds']} s. "
             f"{report['dtype']}, decoder projections {report.get('weights', 'float')}, LM head "
             f"{report.get('lm_head', 'float')}, embeddings {report.get('embeddings', 'float')}, vision "
             f"{report.get('vision_weights', 'float')}, K/V cache "
             f"{'int8' if report.get('kv_cache') == 'int8' else 'in ' + report['dtype']}, batch 1, cache capacity "
             f"{report['capacity']}, prefill chunks of {report['max_chunk']}"
             + (f", {report['weights']} products against x's int8 codes"
                if report.get(f"{report.get('weights')}_activations") == "int8" else "")
             + (f", matrix-vector launch shape {' '.join(report['matvec_overrides'])}" if report.get("matvec_overrides")
                else "")
             + (f", prefill mass op {' '.join(report['prefill_mass_overrides'])}"
                if report.get("prefill_mass_overrides") else "")
             + (f", decode attention {' '.join(report['decode_attention_overrides'])}"
                if report.get("decode_attention_overrides") else "") + ". "
             f"Copy bandwidth (read + written): **{report['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s**.", "",
             "## Decode latency along the stream", "",
             "| model | roofline ms | policy | streamed tokens | p50 ms | p99 ms | roofline / p50 | first token ms | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for policy, p in m["policies"].items():
            for c in p["checkpoints"]:
                lines.append(f"| {m['model']} | {m['roofline_ms']:.3f} | {policy} | {c['streamed_tokens']:,} | "
                             f"{c['decode_p50_ms']:.3f} | {c['decode_p99_ms']:.3f} | "
                             f"{100 * m['roofline_ms'] / c['decode_p50_ms']:.0f}% | {c['first_token_ms']:.1f} | "
                             f"{c['peak_memory_bytes'] / gb:.2f} |")
    lines += ["", "## Frame ingest and eviction", "",
              "| model | policy | frame ingest p50 / p99 ms | evictions | eviction p50 ms | tokens freed each | "
              "amortised ms/token | share of decode p50 |", "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for policy, p in m["policies"].items():
            decode = p["checkpoints"][-1]["decode_p50_ms"]
            lines.append(f"| {m['model']} | {policy} | {p['ingest_p50_ms']:.1f} / {p['ingest_p99_ms']:.1f} | "
                         f"{p['evictions']} | {p['eviction_p50_ms']:.2f} | {p['tokens_freed_per_eviction']:.0f} | "
                         f"{p['eviction_amortised_ms_per_token']:.4f} | "
                         f"{100 * p['eviction_amortised_ms_per_token'] / decode:.2f}% |")
    lines += ["", "## transformers `generate` (same weights) against ours", "",
              "Dynamic: its default cache, eager. Static: a StaticCache, its decode forward compiled by "
              "torch.compile (CUDA graphs) where it runs on CUDA.", "",
              f"| model | context | cache | transformers ms/token | tokens/s | peak GiB | ours ({report.get('ours', 'inf-mllm')}, end of stream) tokens/s | ours / transformers |",
              "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        ours = 1e3 / m["policies"][report.get("ours", "inf-mllm")]["checkpoints"][-1]["decode_p50_ms"]
        for hf in m.get("transformers", []):
            cache = hf.get("cache", "dynamic") + (" + compile" if hf.get("compiled") else "")
            if "tokens_per_s" not in hf:
                lines.append(f"| {m['model']} | {hf['context']:,} | {cache} | {hf['error']} | | | {ours:.0f} | |")
                continue
            lines.append(f"| {m['model']} | {hf['context']:,} | {cache} | {hf['decode_ms']:.2f} | {hf['tokens_per_s']:.0f} | "
                         f"{hf['peak_memory_bytes'] / gb:.2f} | {ours:.0f} | {ours / hf['tokens_per_s']:.1f}x |")
    lines += ["", "## Targets", "", "| model | figure | value |", "|---|---|---|"]
    for model, row in report["summary"].items():
        for key, value in row.items():
            lines.append(f"| {model} | {key} | {value:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in report["models"]:
        for policy, p in m["policies"].items():
            xs = [c["streamed_tokens"] for c in p["checkpoints"]]
            left.plot(xs, [c["decode_p50_ms"] for c in p["checkpoints"]], marker="o", label=f"{m['model']} {policy}")
            right.plot(xs, [c["peak_memory_bytes"] / (1 << 30) for c in p["checkpoints"]], marker="o",
                       label=f"{m['model']} {policy}")
        left.axhline(m["roofline_ms"], linestyle=":", color="grey")
    for ax, label in ((left, "decode p50 ms/token (dotted: rooflines)"), (right, "peak GPU memory GiB")):
        ax.set_xscale("log")
        ax.set_xlabel("tokens streamed into the session")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
