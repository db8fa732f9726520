"""``bench_gpu.py`` settings timed alternately, each row a process of its own (A, B, A, B, ...), in one table.

Why: a launch setting moves the decode step by 1-3%, as much as two machines, or one machine an hour
apart, differ. Settings are therefore compared on one machine, in alternation, each repeated, so that
drift falls on all of them and the repeats show the spread. Earlier sessions wrote that alternation
as shell glue on the device machine each time, and lost it with the machine; this is it, tracked.

Each setting is a name and ``bench_gpu.py`` flags added after the common ones (argparse keeps the
last value of a flag, so a setting may override a common one, e.g. ``--weights float``). Writes
``results/<name>.{json,md}``:

- every row in run order: its p50 / p99 decode step, the roofline and peak memory bench_gpu.py
  reports, the machine's copy bandwidth;
- per setting: its p50s, their median, and the change from the first setting's median.

A row that fails is kept with its error's last lines and the run goes on (device time is short); the
exit status is then 1. Example (the int8 cache's two-pass pass with and without a register cap)::

    python benchmarks/bench_alternated.py --rounds 2 --name decode_maxnreg_h100 \\
        --common "--models llama2-7b --weights int4 --kv-cache int8 --lm-head int8 --policies h2o-kinds \\
                  --stream-tokens 4500 --decode-tokens 128 --skip-transformers" \\
        --setting shipped= --setting cap96="--decode-attention two_pass_maxnreg=96"
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_files import save_report

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_GPU = Path(__file__).resolve().with_name("bench_gpu.py")


def parse_setting(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS`` as the name and bench_gpu.py's flags (FLAGS may be empty: the common flags alone)."""
    name, sep, flags = text.partition("=")
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FLAGS, NAME of letters, digits, - and _")
    return name, shlex.split(flags)


def run_row(name: str, flags: list[str], work: Path, timeout: float) -> dict:
    """One bench_gpu.py process with ``flags``: the rows of its report (one per model, policy and
    stream length), or its error."""
    done = subprocess.run([sys.executable, str(BENCH_GPU), *flags, "--out", str(work), "--name", name],
                          capture_output=True, text=True, timeout=timeout)
    report_path = work / f"{name}.json"
    if done.returncode != 0 or not report_path.exists():
        return {"error": (done.stderr or done.stdout)[-1500:], "returncode": done.returncode}
    report = json.loads(report_path.read_text())
    points = []
    for model in report["models"]:
        for policy, result in model["policies"].items():
            for checkpoint in result["checkpoints"]:
                points.append({"model": model["model"], "policy": policy,
                               "streamed_tokens": checkpoint["streamed_tokens"],
                               "decode_p50_ms": checkpoint["decode_p50_ms"],
                               "decode_p99_ms": checkpoint["decode_p99_ms"],
                               "peak_memory_bytes": checkpoint["peak_memory_bytes"],
                               "roofline_ms": model["roofline_ms"]})
    return {"device": report["device"], "bandwidth_bytes_per_s": report["bandwidth_bytes_per_s"],
            "weights": report["weights"], "kv_cache": report["kv_cache"],
            "overrides": {key: report[key] for key in ("matvec_overrides", "prefill_mass_overrides",
                                                       "decode_attention_overrides")},
            "points": points}


def summarise(rows: list[dict], order: list[str]) -> list[dict]:
    """Per setting and point (model, policy, stream length): the p50s in run order, their median,
    and the change of that median from the first setting's."""
    by_key: dict[tuple, list[float]] = {}
    for row in rows:
        for point in row.get("points", []):
            key = (row["setting"], point["model"], point["policy"], point["streamed_tokens"])
            by_key.setdefault(key, []).append(point["decode_p50_ms"])
    summary = []
    for (setting, model, policy, tokens), p50s in by_key.items():
        median = statistics.median(p50s)
        base = by_key.get((order[0], model, policy, tokens))
        base_median = statistics.median(base) if base else None
        summary.append({"setting": setting, "model": model, "policy": policy, "streamed_tokens": tokens,
                        "p50s_ms": p50s, "median_p50_ms": median,
                        "change_ms": None if base_median is None else median - base_median,
                        "change_percent": None if base_median is None else 100 * (median / base_median - 1)})
    return sorted(summary, key=lambda s: (s["model"], s["policy"], s["streamed_tokens"], order.index(s["setting"])))


def write_markdown(report: dict, path: Path) -> None:
    device = next((r["device"] for r in report["rows"] if "device" in r), "no row ran")
    lines = [f"# bench_gpu.py settings alternated ({device}, {report['rounds']} rounds)", "",
             f"Common flags: `{report['common']}`. Each row its own process, in this order; p50 / p99 of the decode "
             "step after the stream, roofline and peak as bench_gpu.py reports them.", "",
             "| row | setting | flags | model | policy | streamed | p50 ms | p99 ms | roofline ms | peak GiB | "
             "copy TB/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for index, row in enumerate(report["rows"], 1):
        flags = f"`{' '.join(row['flags'])}`" if row["flags"] else "–"
        if "error" in row:
            error = row["error"].strip().splitlines()[-1:] or [""]
            lines.append(f"| {index} | {row['setting']} | {flags} | failed: {error[0][:120]} | | | | | | | |")
            continue
        for p in row["points"]:
            lines.append(f"| {index} | {row['setting']} | {flags} | {p['model']} | {p['policy']} | "
                         f"{p['streamed_tokens']:,} | {p['decode_p50_ms']:.3f} | {p['decode_p99_ms']:.3f} | "
                         f"{p['roofline_ms']:.3f} | {p['peak_memory_bytes'] / 2**30:.2f} | "
                         f"{row['bandwidth_bytes_per_s'] / 1e12:.2f} |")
    lines += ["", f"Per setting: the p50s in run order, their median and its change from `{report['order'][0]}`'s.", "",
              "| model | policy | streamed | setting | p50s ms | median ms | change |", "|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        change = "" if s["change_ms"] is None else f"{s['change_ms']:+.3f} ms ({s['change_percent']:+.1f}%)"
        lines.append(f"| {s['model']} | {s['policy']} | {s['streamed_tokens']:,} | {s['setting']} | "
                     f"{' / '.join(f'{v:.3f}' for v in s['p50s_ms'])} | {s['median_p50_ms']:.3f} | {change} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--common", default="", help="bench_gpu.py flags every row takes (one string)")
    parser.add_argument("--setting", type=parse_setting, action="append", required=True, metavar="NAME=FLAGS",
                        help="a setting: its name and the bench_gpu.py flags it adds; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=2, help="times each setting runs, alternating")
    parser.add_argument("--row-timeout", type=float, default=600.0, help="seconds one row may take")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bench_alternated", help="results file name (without extension)")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.setting]
    if len(set(names)) != len(names):
        parser.error(f"setting names repeat: {names}")
    if args.rounds < 1:
        parser.error("--rounds takes 1 or more")
    common = shlex.split(args.common)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for round_index in range(args.rounds):
            for name, flags in args.setting:
                try:
                    row = run_row(f"{name}_{round_index}", common + flags, Path(work), args.row_timeout)
                except subprocess.TimeoutExpired:
                    row = {"error": f"timed out after {args.row_timeout:.0f} s", "returncode": None}
                rows.append({"setting": name, "round": round_index, "flags": flags, **row})
                print(f"{name} round {round_index}: " + (row["error"].strip().splitlines()[-1] if "error" in row else
                      ", ".join(f"{p['model']} {p['decode_p50_ms']:.3f} ms" for p in row["points"])), flush=True)
    report = {"common": args.common, "rounds": args.rounds, "order": names, "rows": rows,
              "summary": summarise(rows, names)}
    save_report(args.out, args.name, report, write_markdown)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
