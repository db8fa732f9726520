"""Evaluate a demo model through StreamingSession on held-out synthetic streams.

``--model demo-vlm`` (default): the demo VLM (SmolLM2 + trained tower, see ros_infmllm.demo.vlm) on
the busy table with questions in English (``chat_questions``); ``--model tiny``: the tiny test model
on the small table with its terse questions; or a checkpoint folder (``--questions`` says which set).
A reply is right when it equals the reference sentence up to case, punctuation and spacing
(``chat_questions.judge``).

1. Current-scene and memory questions with no eviction (policy ``full``, short streams):
   accuracy per question type.
2. Streams 4x-20x longer than the cache budget: exact-match accuracy per policy (``full`` with a
   cache large enough to hold the stream, ``streamingllm``, ``h2o``, ``inf-mllm``, ``h2o-kinds`` at
   equal budget), for memory questions and current-scene questions asked once eviction has begun.

Writes ``benchmarks/results/demo_eval.{json,md}`` and a plot. Runs on CPU or GPU:
``python benchmarks/eval_demo.py [--device cuda] [--streams 40]``.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from intervals import wilson
from session_variants import session_variant
from streaming_workers import parse_policy
import weight_settings
from plotting import pyplot
from results_files import save_report
from ros_infmllm.backends import TorchBackend
from ros_infmllm.cache import make_policy
from ros_infmllm.demo import bundled_model_path
from ros_infmllm.demo.chat_questions import judge
from ros_infmllm.demo.episodes import CHAT, TERSE, make_episode
from ros_infmllm.model import load_model, locate
from ros_infmllm.model.checkpoint_text import load_tokenizer
from ros_infmllm.session import SessionConfig, StreamingSession, checkpoint_template
from ros_infmllm.session.preprocess import preprocessor_for

HELD_OUT_SEED = 30_000_000  # training used seeds below 10M, the trainer's validation 10M..
DEV_SEED = 20_000_000       # --split dev: for tuning policies; held-out streams report them (no seed is shared)
SPLITS = {"held-out": HELD_OUT_SEED, "dev": DEV_SEED}
RESULTS = Path(__file__).resolve().parent / "results"
QUESTION_SETS = {"chat": CHAT, "terse": TERSE}
POLICIES = ("full", "streamingllm", "h2o", "inf-mllm", "h2o-kinds", "inf-mllm-lt")


def resolve_model(name: str) -> Path:
    if name == "demo-vlm":
        from ros_infmllm.demo.vlm import demo_vlm_path

        return demo_vlm_path()
    return bundled_model_path() if name == "tiny" else Path(name)


def eager_backend(model) -> TorchBackend:
    """One backend for every session of a model, eager: capturing and compiling per short-lived
    session cost more than it saved (13 GPU workers finished 3 cells in 250 s)."""
    return TorchBackend(model, cuda_graphs=False, compile_decode=False, compile_prefill=False, compile_vision=False)


class Evaluator:
    """The model loaded once per process; runs episodes through fresh sessions."""

    def __init__(self, model_dir: Path, device: str) -> None:
        files = locate(model_dir)
        self.files, self.device = files, device
        self.model = load_model(files, device=device)
        self.tokenizer = load_tokenizer(files)
        self.template = checkpoint_template(files, self.model.cfg.text.model_type)
        self.preprocessor = preprocessor_for(files, self.model)
        self.backend = eager_backend(self.model)
        probe = StreamingSession(self.model, self.tokenizer, make_policy("full"), SessionConfig(capacity=64),
                                 self.template, self.preprocessor, self.backend)
        self.tokens_per_frame = len(probe.frame_ids())
        self._by_weights: dict[tuple[str, str], tuple] = {("float", "float"): (self.model, self.backend)}

    def model_and_backend(self, weights: str, vision_weights: str = "float") -> tuple:
        """The model with its decoder projections as ``weights`` and its tower and projector as
        ``vision_weights`` (float / float: the one loaded first; otherwise loaded packed on first
        use, then kept) and its eager backend."""
        key = (weights, vision_weights)
        if key not in self._by_weights:
            model, _ = weight_settings.load(self.files, weights, self.device, vision_weights=vision_weights)
            self._by_weights[key] = model, eager_backend(model)
        return self._by_weights[key]

    def session(self, policy: str, capacity: int) -> StreamingSession:
        """A fresh session for a policy spec (``name[options]+suffixes``, session_variants.py)."""
        spec, variant = session_variant(policy)
        model, backend = self.model_and_backend(variant.pop("weights", "float"), variant.pop("vision_weights", "float"))
        config = SessionConfig(capacity=capacity, max_chunk=128, max_new_tokens=32, **variant)
        name, options = parse_policy(spec)
        return StreamingSession(model, self.tokenizer, make_policy(name, **options), config, self.template,
                                self.preprocessor, backend)

    def run(self, policy: str, capacity: int, episode, budget_tokens: int) -> list[list]:
        """[kind, correct, asked after the stream outgrew the budget, question, reply, reference] for
        every question (the texts say what a wrong reply was)."""
        session = self.session(policy, capacity)
        results = []
        for kind, item in episode.events:
            if kind == "frame":
                session.ingest_frame(episode.frames[item])
            else:
                answer = session.answer(item.question)
                results.append([item.kind, judge(answer, item.answer), session.cache.total_seen > budget_tokens,
                                 item.question, answer, item.answer])
        return results


def cell_path(cells: Path, multiple: int, policy: str) -> Path:
    return cells / f"{multiple}x_{policy}.json"


def part_path(cells: Path, multiple: int, policy: str, start: int, stop: int) -> Path:
    return cells / f"{multiple}x_{policy}.streams{start:04d}-{stop:04d}.json"


def episode_count(multiple: int, streams: int) -> int:
    """The no-eviction cell asks on twice as many (short) streams as a long-stream cell."""
    return 2 * streams if multiple == 0 else streams


def shards(multiple: int, streams: int, size: int) -> list[tuple[int, int]]:
    """Stream ranges of one cell, ``size`` streams each (0: the whole cell in one piece)."""
    count = episode_count(multiple, streams)
    size = size or count
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def device_label(device: str) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else device


_EVALUATORS: dict[tuple[str, str], "Evaluator"] = {}


def evaluate_part(model_dir: Path, device: str, multiple: int, policy: str, streams: int, start: int, stop: int,
                  budget: int, questions: str, cells: Path, command: str = "",
                  seed: int = HELD_OUT_SEED) -> tuple[int, str, int, dict]:
    """Streams [start, stop) of one (stream length, policy) cell; a separate process when --jobs > 1.
    The part is written to ``cells`` as soon as it ends (rows, device, seconds), so a run cut short
    keeps what it finished, and parts run on different machines can make one report
    (--keep-cells, --report-only). The model is loaded once per process."""
    started = time.monotonic()
    torch.set_num_threads(1)
    key = (str(model_dir), device)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(model_dir, device)
    rows = _evaluate_streams(_EVALUATORS[key], multiple, policy, start, stop, budget, questions, seed)
    part = {"device": device_label(device), "seconds": round(time.monotonic() - started, 1), "streams": stop - start,
            "command": command, "rows": rows}
    cells.mkdir(parents=True, exist_ok=True)
    part_path(cells, multiple, policy, start, stop).write_text(json.dumps(part))
    print(f"{time.strftime('%H:%M:%S')} {multiple}x {policy} streams {start}-{stop}: {part['seconds']} s", flush=True)
    return multiple, policy, start, part


def _evaluate_streams(evaluator: "Evaluator", multiple: int, policy: str, start: int, stop: int, budget: int,
                      questions: str, seed: int) -> list:
    question_set = QUESTION_SETS[questions]
    rows = []
    if multiple == 0:  # the no-eviction table: short streams, every kind of question
        for i in range(start, stop):
            episode = make_episode(seed + i, 4 + i % 13, question_rate=0.5, memory_share=0.4,
                                   questions=question_set)
            rows += evaluator.run("full", 4096, episode, 10**9)
        return rows
    frames = multiple * budget // evaluator.tokens_per_frame
    for i in range(start, stop):
        episode = make_episode(seed + 1_000_000 * multiple + i, frames, question_rate=0.06,
                               memory_share=0.6, questions=question_set)
        capacity = budget if policy != "full" else frames * evaluator.tokens_per_frame + 64 * frames
        rows += evaluator.run(policy, capacity, episode, budget)
    return rows


def merge_parts(cells: Path, multiple: int, policy: str, streams: int) -> dict | None:
    """The whole cell from its saved parts (any split that covers every stream once), written as the
    cell file (the parts are then deleted); None while a stream is missing."""
    parts, paths = {}, list(cells.glob(glob.escape(f"{multiple}x_{policy}") + ".streams*-*.json"))
    for path in paths:
        start, stop = (int(x) for x in path.stem.rsplit(".streams", 1)[1].split("-"))
        parts[start] = (stop, json.loads(path.read_text()))
    position, rows, seconds, devices, commands = 0, [], 0.0, set(), set()
    while position in parts:
        stop, part = parts[position]
        rows += part["rows"]
        seconds += part["seconds"]
        devices.add(part["device"])
        commands.add(part.get("command", ""))
        position = stop
    if position != episode_count(multiple, streams):
        return None
    cell = {"device": ", ".join(sorted(devices)), "seconds": round(seconds, 1), "streams": streams,
            "command": "; ".join(sorted(commands - {""})), "rows": rows}
    cell_path(cells, multiple, policy).write_text(json.dumps(cell))
    for path in paths:
        path.unlink()
    return cell


def accuracy(rows: list[list], kinds: tuple[str, ...], late_only: bool = False) -> tuple[float, int]:
    picked = [ok for kind, ok, late, *_ in rows if kind in kinds and (late or not late_only)]
    return (sum(picked) / len(picked) if picked else float("nan")), len(picked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo-vlm", help="demo-vlm, tiny or a checkpoint folder")
    parser.add_argument("--questions", choices=sorted(QUESTION_SETS), default=None,
                        help="question set (default: terse for the tiny model, chat otherwise)")
    parser.add_argument("--name", default="demo_eval", help="results file name (without extension)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", type=int, default=40, help="held-out streams per setting")
    parser.add_argument("--budget", type=int, default=512, help="cache capacity in tokens for the policies")
    parser.add_argument("--multiples", type=int, nargs="*", default=[4, 8, 20],
                        help="stream lengths as multiples of the budget (none: only the no-eviction cell)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--jobs", type=int, default=1, help="parts evaluated in parallel processes")
    parser.add_argument("--shard-streams", type=int, default=0,
                        help="streams per part of a cell (0: one part per cell); smaller parts keep "
                             "parallel jobs even and lose less to a run cut short")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES[:5]),
                        help="policies of the long-stream table (full holds the whole stream); "
                             "name[option=value,...] sets a policy's config fields; suffixes set the session's "
                             "(session_variants.py): +merge, +poolN, +pyramid, +dropA-B, +keepX, and +int8 / "
                             "+int4 / +auto for the decoder's projections, +vision8 / +vision4 for the tower's, "
                             "+kv8 for an int8 cache")
    parser.add_argument("--split", choices=sorted(SPLITS), default="held-out",
                        help="held-out streams (reports) or development streams (tuning)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the cells a previous run saved (<out>/<name>_cells)")
    parser.add_argument("--keep-cells", action="store_true",
                        help="run only the cells not saved yet, and report them with the saved ones")
    args = parser.parse_args()
    questions = args.questions or ("terse" if args.model == "tiny" else "chat")
    question_set = QUESTION_SETS[questions]
    args.model = resolve_model(args.model)
    # longest cells first, so parallel jobs end together
    settings = [(m, p) for m in sorted(args.multiples, reverse=True) for p in args.policies]
    settings.insert(min(len(settings), 4), (0, "full"))
    cells = args.out / f"{args.name}_cells"
    command = "python benchmarks/eval_demo.py " + " ".join(sys.argv[1:])
    for spec in args.policies:  # a bad name or option fails here, not in a worker
        name, options = parse_policy(session_variant(spec)[0])
        make_policy(name, **options)
    # cells saved by an earlier (perhaps cut short) run: compiled as they are with --report-only,
    # kept and not run again with --keep-cells (parts of a cell too)
    kept = [(m, p, json.loads(cell_path(cells, m, p).read_text())) for m, p in settings
            if (args.report_only or args.keep_cells) and cell_path(cells, m, p).exists()]
    done = {(m, p) for m, p, _ in kept}
    jobs = [(args.model, args.device, m, p, args.streams, start, stop, args.budget, questions, cells, command,
             SPLITS[args.split])
            for m, p in settings if (m, p) not in done and not args.report_only
            for start, stop in shards(m, args.streams, args.shard_streams)
            if not (args.keep_cells and part_path(cells, m, p, start, stop).exists())]
    if not args.keep_cells:  # parts of an earlier run (perhaps split otherwise) must not mix with these
        for m, p in {(job[2], job[3]) for job in jobs}:
            for stale in cells.glob(glob.escape(f"{m}x_{p}") + ".streams*-*.json"):
                stale.unlink()
    if args.jobs > 1 and jobs:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: each worker opens its own CUDA context; a forked one cannot
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(evaluate_part, *zip(*jobs)))
    else:
        for job in jobs:
            evaluate_part(*job)
    outcomes = list(kept)
    for m, p in settings:
        if (m, p) not in done:  # this run's parts, or (--report-only) a cut run's, once they cover the cell
            cell = merge_parts(cells, m, p, args.streams)
            if cell is not None:
                outcomes.append((m, p, cell))
    per_type: dict = {}
    wrong: list = []
    long_results: dict[str, dict[str, dict]] = defaultdict(dict)
    cell_devices = {f"{m}x {p}": cell["device"] for m, p, cell in outcomes}
    cell_streams = {f"{m}x {p}": cell["streams"] for m, p, cell in outcomes}
    order = ["full"] + list(args.policies)
    for multiple, policy, cell in sorted(outcomes, key=lambda o: (o[0], order.index(o[1]))):
        rows = cell["rows"]
        if multiple == 0:
            per_type = {kind: accuracy(rows, (kind,)) for kind in question_set.current_types + question_set.memory_types}
            per_type["all current-scene"] = accuracy(rows, question_set.current_types)
            wrong = [{"kind": r[0], "question": r[3], "reply": r[4], "reference": r[5]} for r in rows if not r[1]]
            continue
        long_results[f"{multiple}x"][policy] = {
            "device": cell["device"], "streams": cell["streams"],
            "memory": accuracy(rows, question_set.memory_types, late_only=True),
            "current": accuracy(rows, question_set.current_types, late_only=True),
            **{kind: accuracy(rows, (kind,), late_only=True) for kind in question_set.memory_types},
        }
    tokens_per_frame = Evaluator(args.model, "cpu").tokens_per_frame

    report = {"model": str(args.model), "questions": questions, "memory_kinds": list(question_set.memory_types),
              "split": args.split, "device": ", ".join(sorted(set(cell_devices.values()))), "cell_devices": cell_devices,
              "cell_streams": cell_streams, "budget_tokens": args.budget,
              "commands": sorted({cell.get("command", "") for _, _, cell in outcomes} - {""}),
              "tokens_per_frame": tokens_per_frame,
              "cell_seconds": {f"{m}x {p}": cell["seconds"] for m, p, cell in outcomes},
              "no_eviction_per_type": per_type,
              "long_streams": long_results, "cells_not_run": [f"{m}x {p}" for m, p in settings if not any(
                  (m, p) == (o[0], o[1]) for o in outcomes)], "wrong_without_eviction": wrong}
    save_report(args.out, args.name, report, write_markdown)
    write_plot(report, args.out / f"{args.name}.png")
    return 0


def _cell(value: tuple[float, int], interval: bool = False) -> str:
    acc, count = value
    if count == 0:
        return "n/a"
    if not interval:
        return f"{100 * acc:.1f}% ({count})"
    right = round(acc * count)
    low, high = wilson(right, count)
    return f"{100 * acc:.1f}% ({right}/{count}; 95% CI {100 * low:.0f}-{100 * high:.0f}%)"


def write_markdown(report: dict, path: Path) -> None:
    kinds = report["memory_kinds"]
    lines = ["# Demo model evaluation", "",
             f"Produced by `benchmarks/eval_demo.py` on {report['device']}; model "
             f"`{Path(report['model']).name}`, questions `{report['questions']}`; "
             f"{report.get('split', 'held-out')} streams, as many per setting as given; a reply is right when it equals the "
             "reference answer up to case, punctuation and spacing; (n) = questions; intervals are 95% Wilson "
             "intervals of the proportion.", ""]
    lines += [f"Run as: `{c}`" for c in report.get("commands", [])] + ["",
             "## No eviction (policy `full`, streams of 4-16 frames)", ""]
    if "0x full" in report.get("cell_devices", {}):
        lines += [f"{2 * report['cell_streams']['0x full']} streams, run on {report['cell_devices']['0x full']}.", ""]
    lines += ["| question type | accuracy |", "|---|---|"]
    lines += [f"| {kind} | {_cell(value, interval=True)} |" for kind, value in report["no_eviction_per_type"].items()]
    lines += ["", f"## Long streams at equal budget ({report['budget_tokens']} tokens, "
                  f"{report['tokens_per_frame']} tokens per frame)", "",
              "Questions asked after the stream outgrew the budget. `full` holds the whole stream "
              "(an upper bound that needs memory growing with the stream).", "",
              "| stream | policy | streams | run on | memory questions | " + " | ".join(kinds) + " | current-scene |",
              "|---|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    for multiple, policies in report["long_streams"].items():
        for policy, values in policies.items():
            cells = " | ".join(_cell(values[k]) for k in kinds)
            lines.append(f"| {multiple} | {policy} | {values['streams']} | {values['device']} | "
                         f"{_cell(values['memory'], True)} | {cells} | "
                         f"{_cell(values['current'], True)} |")
    if report.get("cells_not_run"):
        lines += ["", "Not run (cut short, or left to another machine): " + ", ".join(report["cells_not_run"]) + "."]
    wrong = report.get("wrong_without_eviction", [])
    if wrong:
        lines += ["", "## Wrong replies without eviction", "", "| kind | question | reply | reference |", "|---|---|---|---|"]
        lines += [f"| {w['kind']} | {w['question']} | {w['reply']} | {w['reference']} |" for w in wrong]
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    multiples = list(report["long_streams"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for policy in dict.fromkeys(p for m in multiples for p in report["long_streams"][m]):
        shown = [m for m in multiples if policy in report["long_streams"][m]]
        ax.plot(shown, [100 * report["long_streams"][m][policy]["memory"][0] for m in shown], marker="o",
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
