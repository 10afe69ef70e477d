"""Serving benchmark: latency (TTFT, TPOT, ITL, end-to-end), throughput and SLO goodput.

A seeded workload of random token-id prompts (greedy, ignore_eos: every request generates
exactly its output length) arrives as a Poisson process, or all at once, and is served by

- ``--backend offline``: an engine in this process, driven in real time: an `LLMEngine`
  (``--engine llm``), or a `DisaggEngine` of prefill + decode groups (``--engine disagg``) or
  of aggregated replicas (``--engine aggregated``), or
- ``--backend http``: a running OpenAI-compatible server (``POST /v1/completions``, streamed).

The run:

    sample_lengths + poisson_arrivals + make_requests   # serve_workloads.py
    -> backend.check, warm-up requests                  # serve_backends.py
    -> backend.run per request rate (one, or --sweep-rates)
    -> summarize each run                                # serve_metrics.py (definitions there)
    -> JSON + PNG (latency CDFs; SLO attainment against rate) + a table

Examples:

    python benchmarks/serve_bench.py --model random:tiny-llama --input-len 64 --output-len 16 \\
        --num-prompts 32 --request-rate 4
    python benchmarks/serve_bench.py --workload chat --num-prompts 200 --sweep-rates 1 2 4 8
    python benchmarks/serve_bench.py --engine disagg --prefill-groups 1 --decode-groups 1 --workload chat
    python benchmarks/serve_bench.py --backend http --url http://127.0.0.1:8000 --vocab-size 49152
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the serve_* modules, results_meta
import results_meta  # noqa: E402
from serve_backends import ENGINES, HTTPBackend, OfflineBackend, make_offline_backend  # noqa: E402
from serve_metrics import (SLO, SLO_TARGET_FRACTION, RequestRecord, max_rate_meeting_slo,  # noqa: E402
                           request_metrics, summarize)
from serve_workloads import LengthSpec, make_requests, poisson_arrivals, sample_lengths  # noqa: E402

#: Per-workload defaults of the length flags (explicit flags override them).
LENGTH_DEFAULTS = {"fixed": dict(input_len=1024, output_len=128),
                   "chat": dict(input_len=256, output_len=128, input_sigma=1.0, output_sigma=0.7,
                                min_input=16, max_input=4096, min_output=16, max_output=1024)}


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["offline", "http"], default="offline")
    p.add_argument("--model", default=None,
                   help="offline: a model spec (default model, a local folder, random:<name>); "
                        "http: the model name sent (default: the first one GET /v1/models lists)")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=["fixed", "chat"], default="fixed",
                   help="fixed lengths, or a chat-like lognormal mix (see serve_workloads.LengthSpec)")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--input-len", type=int, default=None, help="prompt tokens (chat: the median); default 1024, chat 256")
    w.add_argument("--output-len", type=int, default=None, help="output tokens (chat: the median); default 128")
    for name in ("input_sigma", "output_sigma"):
        w.add_argument("--" + name.replace("_", "-"), type=float, default=None,
                       help=f"chat: log-space spread; default {LENGTH_DEFAULTS['chat'][name]}")
    for name in ("min_input", "max_input", "min_output", "max_output"):
        w.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"chat: clip bound; default {LENGTH_DEFAULTS['chat'][name]}")
    w.add_argument("--seed", type=int, default=0, help="seeds lengths, arrivals and token ids (default 0)")
    w.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals, requests/s; inf (default) sends all at once")
    w.add_argument("--sweep-rates", type=float, nargs="+", default=None, metavar="R",
                   help="run the workload once per rate and report the highest rate meeting the SLO")
    w.add_argument("--num-warmup", type=int, default=2, help="untimed requests sent first (default 2)")

    s = p.add_argument_group("service-level objectives")
    s.add_argument("--slo-ttft", type=float, default=0.5, help="seconds to the first token (default 0.5)")
    s.add_argument("--slo-tpot", type=float, default=0.05, help="seconds per output token after it (default 0.05)")

    o = p.add_argument_group("offline backend (an LLMEngine in this process)")
    o.add_argument("--engine", choices=ENGINES, default="llm",
                   help="llm: one LLMEngine; disagg: prefill + decode groups; aggregated: replicas (default llm)")
    o.add_argument("--prefill-groups", type=int, default=1, help="disagg: prefill groups (default 1)")
    o.add_argument("--decode-groups", type=int, default=1, help="disagg: decode groups (default 1)")
    o.add_argument("--replicas", type=int, default=2, help="aggregated: replicas (default 2)")
    o.add_argument("--policy", default="least_loaded", help="disagg/aggregated: router policy choosing groups")
    o.add_argument("--device", default="auto")
    o.add_argument("--dtype", default="auto")
    o.add_argument("--max-model-len", type=int, default=None)
    o.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (processes; default 1)")
    o.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks (processes; default 1)")
    o.add_argument("--max-num-batched-tokens", type=int, default=2048)
    o.add_argument("--max-num-seqs", type=int, default=256)
    o.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV-cache budget per group (default 2.0)")
    o.add_argument("--no-prefix-caching", action="store_true")
    o.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    h = p.add_argument_group("http backend (an OpenAI-compatible server)")
    h.add_argument("--url", default="http://127.0.0.1:8000")
    h.add_argument("--vocab-size", type=int, default=32000,
                   help="prompt token ids are drawn below this (default 32000: fits Llama-family vocabularies)")
    h.add_argument("--timeout", type=float, default=600.0, help="per-request deadline in seconds (default 600)")
    h.add_argument("--server-device", default=None, help="what the server runs on, for the report (e.g. 'H100')")

    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (a PNG goes beside it); default benchmarks/results/serve_bench_<backend>-<device>_<date>.json")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.num_warmup < 0:
        p.error("--num-prompts must be >= 1 and --num-warmup >= 0")
    if any(not r > 0 for r in args.sweep_rates or [args.request_rate]):
        p.error("request rates must be > 0 (inf: all at once)")
    return args


def length_spec(args: argparse.Namespace) -> LengthSpec:
    chosen = {k: getattr(args, k) for k in LENGTH_DEFAULTS["chat"] if getattr(args, k) is not None}
    if args.workload == "fixed" and set(chosen) - {"input_len", "output_len"}:
        raise SystemExit(f"--workload fixed takes --input-len/--output-len only, got {sorted(chosen)}")
    return LengthSpec(kind=args.workload, **{**LENGTH_DEFAULTS[args.workload], **chosen})


def make_backend(args: argparse.Namespace) -> OfflineBackend | HTTPBackend:
    if args.backend == "http":
        return HTTPBackend(args.url, args.model, args.vocab_size, args.timeout, args.server_device)
    from splitserve.workers.config import CacheConfig, ParallelConfig, SchedulerConfig
    from splitserve.workers.engine import EngineConfig

    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    cfg = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        cache=CacheConfig(memory_bytes=int(args.kv_cache_gib * 1024**3),
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs),
        parallel=ParallelConfig(args.tp, args.pp),
        show_progress=False)
    num_decode = args.replicas if args.engine == "aggregated" else args.decode_groups
    return make_offline_backend(args.engine, cfg, args.prefill_groups, num_decode, args.policy)


# --- the run ---------------------------------------------------------------------------------


def run_rate(backend: Any, lengths: list[tuple[int, int]], rate: float, seed: int, run_index: int,
             slo: SLO, progress: bool) -> dict[str, Any]:
    """One timed pass of the workload at ``rate``; its summary and per-request figures."""
    arrivals = poisson_arrivals(len(lengths), rate, seed)
    requests = make_requests(lengths, arrivals, backend.vocab_size, token_seed=f"{seed}-run{run_index}")
    backend.check(requests)
    records, duration = backend.run(requests, progress, desc=f"rate {rate:g}/s")
    return {"request_rate": rate_json(rate), **summarize(records, duration, slo),
            "requests": [per_request(r) for r in records]}


def warm_up(backend: Any, lengths: list[tuple[int, int]], count: int) -> None:
    """Untimed requests of the workload's first shapes, all at once (compiles, allocates)."""
    if count:
        warm = make_requests(lengths[:count], [0.0] * min(count, len(lengths)), backend.vocab_size, "warmup")
        backend.check(warm)
        records, _ = backend.run(warm)
        failed = [r.error for r in records if not r.ok]
        if failed:
            raise SystemExit(f"warm-up requests failed: {failed[0]}")


def per_request(r: RequestRecord) -> dict[str, Any]:
    row = {"input_len": r.input_len, "output_len": r.output_len, "arrival_s": r.arrival_s, "start_s": r.start_s,
           "error": r.error}
    if r.ok:
        m = request_metrics(r)
        row.update(output_tokens=m.num_output_tokens, ttft_s=m.ttft_s, tpot_s=m.tpot_s, e2e_s=m.e2e_s)
    return row


def rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def rate_value(rate: float | str) -> float:
    return math.inf if rate == "inf" else float(rate)


def rounded(x: Any, digits: int = 6) -> Any:
    """Floats rounded to microseconds (and millionths) for a readable JSON."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def device_info(backend: Any) -> dict[str, Any]:
    info = {"client_cpu": results_meta.cpu_model(), "cpu_count": os.cpu_count(),
            "python_version": platform.python_version(), "platform": platform.platform()}
    if isinstance(backend, HTTPBackend):
        return {"type": "remote", "server": backend.server_device, **info}
    import torch

    device = backend.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else results_meta.cpu_model()
    return {"type": device.type, "name": name, "num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, **info}


def default_out_path(backend: Any, device: dict[str, Any], now: datetime) -> Path:
    where = device.get("server") if device["type"] == "remote" else device["name"]
    tag = f"{backend.name}-{results_meta.slug(where or device['type'])}"
    return results_meta.default_out_path("serve_bench", tag, now)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, write JSON and PNG, and return the report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    spec, slo = length_spec(args), SLO(args.slo_ttft, args.slo_tpot)
    rates = args.sweep_rates or [args.request_rate]
    lengths = sample_lengths(spec, args.num_prompts, args.seed)
    now = datetime.now(timezone.utc)

    backend = make_backend(args)
    try:
        warm_up(backend, lengths, args.num_warmup)
        runs = [run_rate(backend, lengths, rate, args.seed, k, slo, not args.no_progress)
                for k, rate in enumerate(rates)]
        device, described = device_info(backend), backend.describe()
    finally:
        backend.close()

    report = {
        **results_meta.report_header("serve_bench", __file__, argv, now, device),
        "backend": described,
        "workload": {**spec.__dict__, "num_prompts": args.num_prompts, "seed": args.seed,
                     "total_input_tokens": sum(i for i, _ in lengths),
                     "total_output_tokens": sum(o for _, o in lengths), "num_warmup": args.num_warmup},
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "target_attainment": SLO_TARGET_FRACTION},
        "runs": runs,
    }
    if args.sweep_rates:
        best = max_rate_meeting_slo([(rate_value(r["request_rate"]), r["slo"]["attainment"]) for r in runs])
        report["max_rate_meeting_slo"] = None if best is None else rate_json(best)
    report = rounded(report)
    results_meta.save_report(args.out or default_out_path(backend, device, now), report, write_plot, format_table)
    return report


# --- table and plot --------------------------------------------------------------------------


def _ms(stats: dict[str, Any], *keys: str) -> str:
    return "/".join("-" if stats[k] is None else f"{stats[k] * 1000:.1f}" for k in keys)


def format_table(report: dict[str, Any]) -> str:
    w, b = report["workload"], report["backend"]
    lengths = (f"{w['input_len']} in / {w['output_len']} out" if w["kind"] == "fixed" else
               f"chat: median {w['input_len']} in / {w['output_len']} out")
    where = report["device"].get("name") or b.get("url")
    rows = [f"serve_bench {b['backend']} {b['model'] or ''} on {where}: {w['num_prompts']} prompts, {lengths}, "
            f"seed {w['seed']}"]
    rows.append(f"{'rate/s':>7} {'done':>9} {'req/s':>7} {'out tok/s':>10} {'TTFT ms mean/p50/p99':>22} "
                f"{'TPOT ms mean/p50/p99':>22} {'ITL ms p50/p99':>16} {'E2E s mean/p99':>15} {'SLO met':>8}")
    for r in report["runs"]:
        e2e = r["e2e_s"]
        e2e_text = "-" if e2e["mean"] is None else f"{e2e['mean']:.2f}/{e2e['p99']:.2f}"
        rows.append(
            f"{r['request_rate']:>7} {r['num_completed']:>4}/{r['num_requests']:<4} "
            f"{r['throughput']['requests_per_s']:>7.2f} {r['throughput']['output_tokens_per_s']:>10.1f} "
            f"{_ms(r['ttft_s'], 'mean', 'p50', 'p99'):>22} {_ms(r['tpot_s'], 'mean', 'p50', 'p99'):>22} "
            f"{_ms(r['itl_s'], 'p50', 'p99'):>16} {e2e_text:>15} {r['slo']['attainment']:>8.0%}")
        if r["num_failed"] or r["num_wrong_length"]:
            rows.append(f"        {r['num_failed']} failed, {r['num_wrong_length']} with a different output "
                        f"length than asked; errors: {r['errors']}")
    slo = report["slo"]
    rows.append(f"SLO: TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_s']} s")
    if "max_rate_meeting_slo" in report:
        best = report["max_rate_meeting_slo"]
        rows.append(f"highest rate with >= {slo['target_attainment']:.0%} of requests meeting it: "
                    + ("none of the rates tried" if best is None else f"{best} req/s"))
    return "\n".join(rows)


def _cdf(ax: Any, values: list[float], label: str) -> None:
    xs = sorted(values)
    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    runs, slo = report["runs"], report["slo"]
    panels = [("ttft_s", "TTFT (s)", slo["ttft_s"]), ("tpot_s", "TPOT (s)", slo["tpot_s"]), ("e2e_s", "end-to-end (s)", None)]
    sweep = len(runs) > 1
    fig, axes = plt.subplots(1, len(panels) + sweep, figsize=(4.2 * (len(panels) + sweep), 3.8))
    for ax, (key, title, objective) in zip(axes, panels):
        for r in runs:
            values = [q[key] for q in r["requests"] if q.get(key) is not None]
            if values:
                _cdf(ax, values, f"{r['request_rate']}/s")
        if objective is not None:
            ax.axvline(objective, color="gray", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if sweep:
        _plot_attainment(axes[-1], report)
    w = report["workload"]
    fig.suptitle(f"serve_bench {report['backend']['backend']} {report['backend']['model'] or ''}: "
                 f"{w['num_prompts']} prompts ({w['kind']}), seed {w['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_attainment(ax: Any, report: dict[str, Any]) -> None:
    """SLO attainment against rate; an `inf` rate is drawn one step past the largest finite one."""
    rates = [rate_value(r["request_rate"]) for r in report["runs"]]
    finite = [r for r in rates if math.isfinite(r)] or [1.0]
    xs = [r if math.isfinite(r) else max(finite) * 1.25 for r in rates]
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ax.plot([xs[i] for i in order], [report["runs"][i]["slo"]["attainment"] for i in order], marker="o")
    ax.axhline(report["slo"]["target_attainment"], color="gray", linestyle="--", linewidth=1, label="target")
    ax.set_xticks(xs, [f"{r:g}" for r in rates], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("fraction meeting TTFT and TPOT SLO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
