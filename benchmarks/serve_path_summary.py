"""One table and one plot of the serving path against the engine, from serve_bench JSONs.

The same seeded workload measured several ways (each file names its command and commit):
the engine in-process (the compare run's ``offline`` part), the engine driving its rank in
a separate process, and `splitserve serve` over HTTP and gRPC in each of its layouts. This
script only reads those files: per rate it reports TPOT mean/p99, TTFT p50 and output tok/s
of every series, and each series' ratio to the in-process engine.

    python benchmarks/serve_path_summary.py --engine benchmarks/results/serve_bench_compare-h200_2026-12-02-chat-rankproc.json \\
        --series "engine, rank process=benchmarks/results/serve_bench_offline-rankproc-h200_2026-12-02-chat.json" \\
        --series "server, rank process, HTTP=benchmarks/results/serve_bench_compare-h200_2026-12-02-chat-rankproc.json:http" \\
        --out benchmarks/results/serve_path_h200_2026-12-02-chat.json

A series is ``LABEL=FILE`` (a single-backend run) or ``LABEL=FILE:BACKEND`` (one part of a
compare run). Writes the JSON and a PNG beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import finish_figure, report_header, save_report  # noqa: E402


def load_runs(spec: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The runs of ``FILE`` or ``FILE:BACKEND``, and the file's header (command, commit)."""
    path, _, backend = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    data = json.loads(Path(path).read_text())
    runs = data["backends"][backend]["runs"] if backend else data["runs"]
    return runs, {"file": Path(path).name, "backend": backend or data.get("backend", {}).get("backend"),
                  "command": data.get("command"), "git_commit": data.get("git_commit"),
                  "workload_seed": data.get("workload", {}).get("seed")}


def figures(run: dict[str, Any]) -> dict[str, float]:
    return {"tpot_mean_ms": 1e3 * run["tpot_s"]["mean"], "tpot_p99_ms": 1e3 * run["tpot_s"]["p99"],
            "ttft_p50_ms": 1e3 * run["ttft_s"]["p50"], "output_tok_s": run["throughput"]["output_tokens_per_s"],
            "requests_per_s": run["throughput"]["requests_per_s"], "completed": run["num_completed"]}


def summarize(engine: list[dict], series: dict[str, list[dict]]) -> list[dict[str, Any]]:
    base = {r["request_rate"]: figures(r) for r in engine}
    rows = []
    for label, runs in series.items():
        for run in runs:
            rate, f = run["request_rate"], figures(run)
            e = base.get(rate)
            ratio = None if e is None else {
                "tpot_mean": f["tpot_mean_ms"] / e["tpot_mean_ms"], "tpot_p99": f["tpot_p99_ms"] / e["tpot_p99_ms"],
                "ttft_p50_diff_ms": f["ttft_p50_ms"] - e["ttft_p50_ms"],
                "output_tok_s": f["output_tok_s"] / e["output_tok_s"]}
            rows.append({"series": label, "request_rate": rate, **f, "vs_engine": ratio})
    return rows


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'series':<30}{'rate':>6}{'TPOT mean':>11}{'p99':>8}{'TTFT p50':>10}{'tok/s':>8}"
             f"{'TPOT x':>8}{'p99 x':>7}{'TTFT +ms':>9}{'tok/s x':>8}"]
    for r in report["rows"]:
        v = r["vs_engine"] or {}
        fmt = lambda k, spec: format(v[k], spec) if k in v else "-"  # noqa: E731
        lines.append(f"{r['series']:<30}{str(r['request_rate']):>6}{r['tpot_mean_ms']:>11.1f}{r['tpot_p99_ms']:>8.1f}"
                     f"{r['ttft_p50_ms']:>10.1f}{r['output_tok_s']:>8.0f}{fmt('tpot_mean', '>8.2f')}"
                     f"{fmt('tpot_p99', '>7.2f')}{fmt('ttft_p50_diff_ms', '>+9.1f')}{fmt('output_tok_s', '>8.2f')}")
    return "\n".join(lines)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_series: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_series.setdefault(r["series"], []).append(r)
    for label, rows in by_series.items():
        rows = sorted(rows, key=lambda r: r["request_rate"])
        rates = [r["request_rate"] for r in rows]
        axes[0].plot(rates, [r["tpot_mean_ms"] for r in rows], marker="o", label=label)
        axes[1].plot(rates, [r["ttft_p50_ms"] for r in rows], marker="o", label=label)
    axes[0].set_ylabel("TPOT mean (ms)")
    axes[1].set_ylabel("TTFT p50 (ms)")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    finish_figure(fig, path, report.get("title", "serving path vs engine"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="compare JSON whose offline part is the in-process engine")
    p.add_argument("--series", action="append", default=[], metavar="LABEL=FILE[:BACKEND]")
    p.add_argument("--title", default="serving path vs the engine in-process")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    engine, engine_src = load_runs(f"{args.engine}:offline")
    series, sources = {"engine, in-process": engine}, {"engine, in-process": engine_src}
    for spec in args.series:
        label, _, source = spec.partition("=")
        series[label], sources[label] = load_runs(source)
    report = report_header("serve_path_summary", __file__, argv, datetime.now(timezone.utc),
                           {"type": "from the source files"})
    report.update({"title": args.title, "sources": sources, "rows": summarize(engine, series)})
    save_report(args.out, report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
