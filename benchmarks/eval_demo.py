"""Evaluate the bundled demo model through StreamingSession on held-out synthetic streams.

1. Current-scene and memory questions with no eviction (policy ``full``, short streams):
   exact-match accuracy per question type.
2. Streams 4x-20x longer than the cache budget: exact-match accuracy per policy (``full`` with a
   cache large enough to hold the stream, ``streamingllm``, ``h2o``, ``inf-mllm`` at equal budget),
   for memory questions and current-scene questions asked once eviction has begun.

Writes ``benchmarks/results/demo_eval.{json,md}`` and a plot. Runs on CPU or GPU:
``python benchmarks/eval_demo.py [--device cuda] [--streams 40]``.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from plotting import pyplot
from ros_infmllm.cache import make_policy
from ros_infmllm.demo import bundled_model_path
from ros_infmllm.demo.episodes import make_episode
from ros_infmllm.demo.questions import CURRENT_TYPES, MEMORY_TYPES
from ros_infmllm.model import load_model
from ros_infmllm.session import ImagePreprocessor, SessionConfig, StreamingSession, template_for

HELD_OUT_SEED = 30_000_000  # training used seeds below 10M, the trainer's validation 10M..
RESULTS = Path(__file__).resolve().parent / "results"


class Evaluator:
    """The model loaded once per process; runs episodes through fresh sessions."""

    def __init__(self, model_dir: Path, device: str) -> None:
        from tokenizers import Tokenizer

        self.model = load_model(model_dir, device=device)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.template = template_for("auto", model_dir, self.model.cfg.text.model_type)
        self.preprocessor = ImagePreprocessor.for_model(model_dir, self.model.cfg.vision)
        self.tokens_per_frame = self.model.cfg.num_image_tokens + 1

    def run(self, policy: str, capacity: int, episode, budget_tokens: int) -> list[tuple[str, bool, bool]]:
        """(kind, correct, asked after the stream outgrew the budget) for every question."""
        config = SessionConfig(capacity=capacity, max_chunk=32, max_new_tokens=12)
        session = StreamingSession(self.model, self.tokenizer, make_policy(policy), config, self.template,
                                   self.preprocessor)
        results = []
        for kind, item in episode.events:
            if kind == "frame":
                session.ingest_frame(episode.frames[item])
            else:
                answer = session.answer(item.question)
                results.append((item.kind, answer == item.answer, session.cache.total_seen > budget_tokens))
        return results


def evaluate_setting(model_dir: Path, device: str, multiple: int, policy: str, streams: int,
                     budget: int) -> tuple[int, str, list]:
    """One (stream length, policy) cell; a separate process when --jobs > 1."""
    torch.set_num_threads(1)
    evaluator = Evaluator(model_dir, device)
    if multiple == 0:  # the no-eviction table: short streams, every kind of question
        rows = []
        for i in range(streams * 2):
            episode = make_episode(HELD_OUT_SEED + i, 4 + i % 13, question_rate=0.5, memory_share=0.4)
            rows += evaluator.run("full", 2048, episode, 10**9)
        return multiple, policy, rows
    frames = multiple * budget // evaluator.tokens_per_frame
    rows = []
    for i in range(streams):
        episode = make_episode(HELD_OUT_SEED + 1_000_000 * multiple + i, frames, question_rate=0.06,
                               memory_share=0.6)
        capacity = budget if policy != "full" else frames * evaluator.tokens_per_frame + 64 * frames
        rows += evaluator.run(policy, capacity, episode, budget)
    return multiple, policy, rows


def accuracy(rows: list[tuple[str, bool, bool]], kinds: tuple[str, ...], late_only: bool = False) -> tuple[float, int]:
    picked = [ok for kind, ok, late in rows if kind in kinds and (late or not late_only)]
    return (sum(picked) / len(picked) if picked else float("nan")), len(picked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=bundled_model_path())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", type=int, default=40, help="held-out streams per setting")
    parser.add_argument("--budget", type=int, default=256, help="cache capacity in tokens for the policies")
    parser.add_argument("--multiples", type=int, nargs="+", default=[4, 8, 20])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--jobs", type=int, default=1, help="settings evaluated in parallel processes")
    args = parser.parse_args()
    started = time.monotonic()
    settings = [(0, "full")] + [(m, p) for m in args.multiples for p in ("full", "streamingllm", "h2o", "inf-mllm")]
    jobs = [(args.model, args.device, m, p, args.streams, args.budget) for m, p in settings]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: each worker opens its own CUDA context; a forked one cannot
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(evaluate_setting, *zip(*jobs)))
    else:
        outcomes = [evaluate_setting(*job) for job in jobs]
    per_type: dict = {}
    long_results: dict[str, dict[str, dict]] = defaultdict(dict)
    for multiple, policy, rows in outcomes:
        if multiple == 0:
            per_type = {kind: accuracy(rows, (kind,)) for kind in CURRENT_TYPES + MEMORY_TYPES}
            continue
        long_results[f"{multiple}x"][policy] = {
            "memory": accuracy(rows, MEMORY_TYPES, late_only=True),
            "current": accuracy(rows, CURRENT_TYPES, late_only=True),
            **{kind: accuracy(rows, (kind,), late_only=True) for kind in MEMORY_TYPES},
        }
    tokens_per_frame = Evaluator(args.model, "cpu").tokens_per_frame

    report = {"model": str(args.model), "device": args.device, "budget_tokens": args.budget,
              "tokens_per_frame": tokens_per_frame, "streams_per_setting": args.streams,
              "seconds": round(time.monotonic() - started, 1), "no_eviction_per_type": per_type,
              "long_streams": long_results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_eval.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, args.out / "demo_eval.md")
    write_plot(report, args.out / "demo_eval.png")
    print((args.out / "demo_eval.md").read_text())
    return 0


def _cell(value: tuple[float, int]) -> str:
    acc, count = value
    return "n/a" if count == 0 else f"{100 * acc:.1f}% ({count})"


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Demo model evaluation", "",
             f"Produced by `benchmarks/eval_demo.py` on {report['device']} in {report['seconds']} s; "
             f"{report['streams_per_setting']} held-out streams per setting; exact match of the whole answer; "
             "(n) = questions.", "",
             "## No eviction (policy `full`, streams of 4-16 frames)", "", "| question type | accuracy |", "|---|---|"]
    lines += [f"| {kind} | {_cell(value)} |" for kind, value in report["no_eviction_per_type"].items()]
    lines += ["", f"## Long streams at equal budget ({report['budget_tokens']} tokens, "
                  f"{report['tokens_per_frame']} tokens per frame)", "",
              "Questions asked after the stream outgrew the budget. `full` holds the whole stream "
              "(an upper bound that needs memory growing with the stream).", "",
              "| stream | policy | memory questions | first_seen | did_you_see | before | current-scene |",
              "|---|---|---|---|---|---|---|"]
    for multiple, policies in report["long_streams"].items():
        for policy, values in policies.items():
            lines.append(f"| {multiple} | {policy} | {_cell(values['memory'])} | {_cell(values['first_seen'])} | "
                         f"{_cell(values['did_you_see'])} | {_cell(values['before'])} | {_cell(values['current'])} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    multiples = list(report["long_streams"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for policy in ("full", "streamingllm", "h2o", "inf-mllm"):
        ax.plot(multiples, [100 * report["long_streams"][m][policy]["memory"][0] for m in multiples], marker="o",
                label=policy)
    ax.set_xlabel("stream length / cache budget")
    ax.set_ylabel("memory questions, exact match %")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
