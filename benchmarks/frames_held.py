"""Frames held in the cache at equal capacity, per visual-token reduction and per decoder layer.

A demo stream's frames (with a question every few frames, as the node would see) go through one
session per variant at the same capacity; after each frame past the first eviction, each layer's
live slots are mapped back to the frames they came from. A frame counts as held in a layer while
at least one of its visual tokens is live there. Reported per variant: frames held in the first,
middle and last layer, averaged over those samples, with the live visual tokens per held frame,
and the cache bytes (the same for every variant: the capacity is preallocated).

Variants are ``eval_demo.py``'s policy specs: ``h2o``, ``h2o+pool2``, ``h2o+pyramid``,
``h2o+merge``... (merging keeps the count of frames of ``h2o``: it changes what the kept slots
hold, not which). ``python benchmarks/frames_held.py --model demo-vlm --capacity 512 --frames 60``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from eval_demo import HELD_OUT_SEED, QUESTION_SETS, RESULTS, Evaluator, resolve_model
from results_files import save_report
from ros_infmllm.demo.episodes import make_episode
from ros_infmllm.session import StreamingSession

QUESTION_EVERY = 5  # frames between the short texts a stream carries (a question, no answer)


def frames_per_layer(session: StreamingSession, starts: list[int]) -> tuple[list[int], list[int]]:
    """Per layer: frames with a live visual token, and live visual tokens. ``starts``: each frame's
    first stream index, ascending."""
    cache = session.cache
    live = cache.live()[:, 0] & cache.visual[:, 0]  # a drop is per layer, not per head; head 0 speaks for all
    first = torch.tensor(starts)
    held, tokens = [], []
    for layer in range(live.shape[0]):
        origins = cache.origin[layer, 0][live[layer]].cpu()
        frames = torch.searchsorted(first, origins, right=True) - 1
        held.append(int(frames.unique().numel()))
        tokens.append(int(origins.numel()))
    return held, tokens


def measure(evaluator: Evaluator, spec: str, capacity: int, episode) -> dict:
    session = evaluator.session(spec, capacity)
    starts, samples, started = [], [], time.monotonic()
    for i, frame in enumerate(episode.frames):
        starts.append(session.cache.total_seen)
        session.ingest_frame(frame)
        if i % QUESTION_EVERY == QUESTION_EVERY - 1:
            session.feed_text(" what is in view ?")
        if session.cache.evictions:
            samples.append(frames_per_layer(session, starts))
    evicted = bool(samples)
    samples = samples or [frames_per_layer(session, starts)]  # it all fits: one sample, at the end
    layers = len(samples[0][0])
    picked = {"first": 0, "middle": layers // 2, "last": layers - 1}
    mean = lambda values: sum(values) / len(values)
    return {
        "spec": spec, "samples": len(samples) if evicted else 0, "seconds": round(time.monotonic() - started, 1),
        "tokens_per_frame": len(session.frame_ids()), "drop_layers": list(session.drop_layers),
        "frames_held": {where: round(mean([s[0][layer] for s in samples]), 2) for where, layer in picked.items()},
        "visual_tokens_per_frame": {where: round(mean([s[1][layer] / max(1, s[0][layer]) for s in samples]), 1)
                                    for where, layer in picked.items()},
        "frames_held_per_layer": [round(mean([s[0][layer] for s in samples]), 2) for layer in range(layers)],
        "cache_bytes": session.cache.nbytes,
    }


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Frames held in a {report['capacity']}-token cache, per visual-token reduction",
             "",
             f"From `benchmarks/frames_held.py` ({report['device']}, model `{report['model']}`, one stream of "
             f"{report['frames']} frames, seed {report['seed']}, a question's text every {QUESTION_EVERY} frames). "
             "Frames held: frames with at least one live visual token in that layer, averaged over the "
             "samples taken after each frame once eviction has begun (samples column; 0: the stream fit, "
             "counted at its end); tokens: live visual "
             "tokens per held frame. The cache's bytes are the same for every variant.",
             "",
             "| variant | stages at layers | slots per frame (prefill) | frames held: first / middle / last layer "
             "| visual tokens per held frame: first / middle / last | samples | cache MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        held, tokens = row["frames_held"], row["visual_tokens_per_frame"]
        lines.append(f"| {row['spec']} | {', '.join(map(str, row['drop_layers'])) or '-'} | {row['tokens_per_frame']} "
                     f"| {held['first']} / {held['middle']} / {held['last']} "
                     f"| {tokens['first']} / {tokens['middle']} / {tokens['last']} | {row['samples']} "
                     f"| {row['cache_bytes'] / 2**20:.1f} |")
    lines += ["", f"Run as: `{report['command']}`", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo-vlm", help="demo-vlm, tiny or a checkpoint folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--capacity", type=int, default=512)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--variants", nargs="+", default=["h2o", "h2o+pool2", "h2o+pyramid", "streamingllm",
                                                          "streamingllm+pyramid"])
    parser.add_argument("--name", default="frames_held")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    evaluator = Evaluator(model_dir, args.device)
    questions = QUESTION_SETS["terse" if args.model == "tiny" else "chat"]
    episode = make_episode(args.seed, args.frames, questions=questions)
    rows = [measure(evaluator, spec, args.capacity, episode) for spec in args.variants]
    report = {"model": model_dir.name, "device": args.device, "capacity": args.capacity, "frames": args.frames,
              "seed": args.seed, "command": "python benchmarks/frames_held.py " + " ".join(sys.argv[1:]), "rows": rows}
    save_report(args.out, args.name, report, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
