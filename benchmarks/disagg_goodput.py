"""Issue 9: goodput of disaggregated prefill/decode against aggregated replicas on the same GPUs.

Two systems serve the same seeded chat-like workload (lognormal prompt and output lengths,
see `serve_workloads.LengthSpec`) at increasing Poisson rates, one after the other in this
process, each on its own `DisaggEngine` driven in real time by `serve_backends.OfflineBackend`:

- ``disagg``: 1 prefill group + 1 decode group (``--prefill-groups/--decode-groups``), tp 1
  each: cuda:0 prefills, its KV goes over NCCL to cuda:1, which decodes;
- ``aggregated``: 2 replicas (``--replicas``), tp 1 each, on cuda:0 and cuda:1; each request
  runs whole on the least-loaded one.

Per system:

    build (rank processes; CUDA graphs captured at start-up)
    -> warm-up: the longest prompt of the sweep + a few workload requests, all at once
       (first chunked prefill, first KV transfer: NCCL communicators, allocator)
    -> per rate r, lowest first: min(--num-prompts, r * --window-s) requests, Poisson arrivals;
       the run stops at its time cap (below) and aborts what is left
    -> shutdown (rank processes exit, their GPU memory with them) before the next system.

SLO attainment of a run: requests with TTFT <= --slo-ttft and TPOT <= --slo-tpot over ALL
requests of the run (failed, aborted and never-sent ones miss). The time cap of a run is when
the last request would have to end to meet both objectives (its arrival + TTFT objective +
(output tokens - 1) x TPOT objective) plus a second, at most --max-run-s: a request unfinished
then has already missed, so cutting it off changes no figure (below --max-run-s). The goodput of
a system is the highest rate whose attainment is >= 90% with every lower rate also meeting it
(`serve_metrics.max_rate_meeting_slo`); also reported: the rate where attainment crosses 90%
by linear interpolation between the last passing and the first failing rate, and the most
requests per second that met the SLO in any run. Rates above one whose attainment fell below
--stop-below are skipped (they would fail too), as are rates once a system's share of
--budget-s is spent (its goodput is then a lower bound: ``complete`` is false).

Output: JSON + PNG (attainment, TTFT and TPOT p50/p99, SLO-meeting requests/s against rate,
both systems) via `results_meta`, and a table.

GPU (2 GPUs, about 7 minutes):
    python benchmarks/disagg_goodput.py --out benchmarks/results/disagg_goodput_h200.json
CPU smoke path (gloo between groups, well under a minute):
    python benchmarks/disagg_goodput.py --device cpu --model random:tiny-llama --rates 2 4 --num-prompts 6
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the serve_* modules, results_meta
import results_meta  # noqa: E402

results_meta.multicast_off()  # before the modules below load torch and NCCL
from serve_backends import OfflineBackend, make_offline_backend  # noqa: E402
from serve_bench import per_request, rounded  # noqa: E402
from serve_metrics import SLO, SLO_TARGET_FRACTION, max_rate_meeting_slo, summarize  # noqa: E402
from serve_workloads import LengthSpec, Request, make_requests, poisson_arrivals, sample_lengths  # noqa: E402

SYSTEMS = ("disagg", "aggregated")
#: Chat-like lengths per device: the GPU workload, and a small one for the CPU smoke path.
LENGTHS = {"cuda": dict(input_len=256, output_len=128, max_input=2048, max_output=512),
           "cpu": dict(input_len=48, output_len=12, max_input=256, max_output=32)}
#: KV-cache budget per group, GiB.
KV_GIB = {"cuda": 32.0, "cpu": 0.05}
#: Past the last request's SLO deadline before the run is cut off.
CAP_SLACK_S = 1.0


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama-3-8b")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--prefill-groups", type=int, default=1)
    p.add_argument("--decode-groups", type=int, default=1)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per group (default 1)")
    p.add_argument("--kv-gb", type=float, default=None, help="KV-cache GiB per group (default: 32 CUDA, 0.05 CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill chunk per step (default 2048)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--policy", default="least_loaded", help="router policy choosing a group (default least_loaded)")

    w = p.add_argument_group("workload (chat-like lognormal lengths; defaults depend on the device)")
    w.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 12, 16, 24, 32], metavar="R")
    w.add_argument("--num-prompts", type=int, default=200, help="most requests per rate (default 200)")
    w.add_argument("--window-s", type=float, default=10.0,
                   help="a rate sends min(--num-prompts, rate x this) requests (default 10)")
    for name in ("input_len", "output_len", "max_input", "max_output"):
        w.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {LENGTHS['cuda'][name]} (CPU {LENGTHS['cpu'][name]})")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--num-warmup", type=int, default=4, help="workload requests in the warm-up (default 4)")

    s = p.add_argument_group("objectives and time")
    s.add_argument("--slo-ttft", type=float, default=0.5)
    s.add_argument("--slo-tpot", type=float, default=0.05)
    s.add_argument("--max-run-s", type=float, default=45.0, help="hard cap of one rate's run (default 45)")
    s.add_argument("--budget-s", type=float, default=380.0,
                   help="whole benchmark; after building, each system's rates get an equal share (default 380)")
    s.add_argument("--stop-below", type=float, default=0.5,
                   help="skip a system's higher rates once attainment falls below this (default 0.5; 0: never)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (PNG beside it); default benchmarks/results/disagg_goodput_<device>_<date>.json")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.window_s <= 0 or any(not r > 0 or math.isinf(r) for r in args.rates):
        p.error("--num-prompts >= 1, --window-s > 0 and finite rates > 0")
    args.rates = sorted(set(args.rates))
    return args


def device_type(args: argparse.Namespace) -> str:
    if args.device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device.split(":")[0]


def length_spec(args: argparse.Namespace, kind: str) -> LengthSpec:
    chosen = {k: getattr(args, k) for k in LENGTHS[kind] if getattr(args, k) is not None}
    return LengthSpec(kind="chat", **{**LENGTHS[kind], **chosen})


def fit_spec(spec: LengthSpec, max_model_len: int) -> LengthSpec:
    """Clip the longest prompt so that prompt + output fit the model."""
    max_input = min(spec.max_input, max_model_len - spec.max_output)
    if max_input < spec.min_input:
        raise SystemExit(f"outputs of up to {spec.max_output} tokens leave no room for prompts "
                         f"in the model's {max_model_len} positions")
    return replace(spec, max_input=max_input)


def group_config(args: argparse.Namespace, kind: str) -> Any:
    from splitserve.workers.config import CacheConfig, ParallelConfig, SchedulerConfig
    from splitserve.workers.engine import EngineConfig

    kv_gib = args.kv_gb if args.kv_gb is not None else KV_GIB[kind]
    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                        cache=CacheConfig(memory_bytes=int(kv_gib * 1024**3)),
                        scheduler=SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs),
                        parallel=ParallelConfig(args.tp, 1), show_progress=False)


def build(system: str, args: argparse.Namespace, kind: str) -> OfflineBackend:
    cfg = group_config(args, kind)
    if system == "disagg":
        return make_offline_backend("disagg", cfg, args.prefill_groups, args.decode_groups, args.policy)
    return make_offline_backend("aggregated", cfg, 1, args.replicas, args.policy)


# --- the goodput math ------------------------------------------------------------------------


def prompts_for(rate: float, num_prompts: int, window_s: float) -> int:
    return max(1, min(num_prompts, math.ceil(rate * window_s)))


def time_cap(requests: list[Request], slo: SLO, max_run_s: float) -> float:
    """When every request has either ended or certainly missed its objectives (at most ``max_run_s``)."""
    last = max(r.arrival_s + slo.ttft_s + max(r.output_len - 1, 0) * slo.tpot_s for r in requests)
    return min(max_run_s, last + CAP_SLACK_S)


def crossing_rate(points: list[tuple[float, float]], target: float = SLO_TARGET_FRACTION) -> float | None:
    """Where attainment falls through ``target``, linear between the last passing rate and the
    first failing one; the highest rate when none fails (a lower bound), None when the lowest fails."""
    points = sorted(points)
    best = max_rate_meeting_slo(points, target)
    if best is None:
        return None
    above = [(r, a) for r, a in points if r > best]
    if not above:
        return best
    a1 = dict(points)[best]
    r2, a2 = above[0]
    return best + (a1 - target) / (a1 - a2) * (r2 - best)


def system_summary(runs: list[dict[str, Any]], target: float = SLO_TARGET_FRACTION) -> dict[str, Any]:
    """Goodput figures of one system from its runs (skipped rates carry no attainment)."""
    done = [r for r in runs if "slo" in r]
    points = [(r["request_rate"], r["slo"]["attainment"]) for r in done]
    stopped_by_budget = any(r.get("skipped") == "budget" for r in runs)
    best = max_rate_meeting_slo(points, target)
    failed = any(a < target for _, a in points)
    return {"goodput_rate": best, "goodput_rate_interpolated": crossing_rate(points, target),
            "max_slo_requests_per_s": max((r["slo"]["goodput_requests_per_s"] for r in done), default=None),
            #: False: a rate failed, so the goodput is exact on the sweep's grid (else a lower bound).
            "complete": failed or not stopped_by_budget, "saturated_within_sweep": failed}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    d, g = summaries.get("disagg"), summaries.get("aggregated")
    if d is None or g is None:
        return {}
    return {key: ratio(d[key], g[key])
            for key in ("goodput_rate", "goodput_rate_interpolated", "max_slo_requests_per_s")}


# --- the runs --------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def warm_up(backend: OfflineBackend, lengths: list[tuple[int, int]], spec: LengthSpec, count: int) -> None:
    """All at once: the sweep's longest prompt (the largest prefill) and a few workload requests."""
    longest = max(i for i, _ in lengths)
    shapes = [(longest, min(8, spec.max_output)), *lengths[:count]]
    warm = make_requests(shapes, [0.0] * len(shapes), backend.vocab_size, "warmup")
    backend.check(warm)
    records, duration = backend.run(warm)
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise SystemExit(f"warm-up requests failed: {failed[0]}")
    say(f"  warm-up: {len(warm)} requests in {duration:.1f} s")


def run_rate(backend: OfflineBackend, lengths: list[tuple[int, int]], rate: float, index: int,
             args: argparse.Namespace, slo: SLO) -> dict[str, Any]:
    n = prompts_for(rate, args.num_prompts, args.window_s)
    arrivals = poisson_arrivals(n, rate, args.seed)
    requests = make_requests(lengths[:n], arrivals, backend.vocab_size, token_seed=f"{args.seed}-run{index}")
    backend.check(requests)
    cap = time_cap(requests, slo, args.max_run_s)
    before = transfer_counts(backend)
    if hasattr(backend.engine, "stage_log"):
        backend.engine.stage_log.clear()
    records, duration = backend.run(requests, desc=f"rate {rate:g}/s", time_cap_s=cap)
    after = transfer_counts(backend)
    summary = summarize(records, duration, slo)
    cut = sum(r.error is not None and r.error.endswith("time cap") for r in records)
    # Where disaggregated requests spend their time to first token (ms per stage).
    stages = backend.engine.stage_summary(clear=True) if hasattr(backend.engine, "stage_summary") else {}
    return {"request_rate": rate, "time_cap_s": cap, "num_cut_off": cut, **summary,
            "kv_transfers": {k: after[k] - before[k] for k in after}, "transfer_stages_ms": stages,
            "requests": [per_request(r) for r in records]}


def transfer_counts(backend: OfflineBackend) -> dict[str, float]:
    """The engine's KV-transfer counters so far (all zero without prefill groups)."""
    m = backend.engine.metrics
    return {"num_transfers": m.num_transfers, "num_failures": m.num_failures, "num_timeouts": m.num_timeouts,
            "num_bytes": m.num_bytes, "seconds": m.seconds, "num_resent": backend.engine.num_resent}


def describe_run(r: dict[str, Any]) -> str:
    ttft, tpot = r["ttft_s"], r["tpot_s"]
    ms = lambda s, k: "-" if s[k] is None else f"{s[k] * 1000:.0f}"  # noqa: E731
    return (f"{r['num_completed']}/{r['num_requests']} done, {r['num_cut_off']} cut off, "
            f"{r['duration_s']:.1f} s, SLO met {r['slo']['attainment']:.0%}, "
            f"TTFT p50/p99 {ms(ttft, 'p50')}/{ms(ttft, 'p99')} ms, TPOT p50/p99 {ms(tpot, 'p50')}/{ms(tpot, 'p99')} ms"
            + _stages(r.get("transfer_stages_ms") or {}))


def _stages(stages: dict[str, dict[str, float]]) -> str:
    """The transfer stages' p50/p99 (ms), short: "| q>r 1/5 r>s 20/90 ..."."""
    if not stages:
        return ""
    short = {"queued": "q", "reserved": "r", "sending": "s", "first_token": "f", "acked": "a", "admitted": "d"}
    parts = []
    for name, st in stages.items():
        a, b = name.split("->")
        parts.append(f"{short[a]}>{short[b]} {st['p50']:.0f}/{st['p99']:.0f}")
    return " | stages p50/p99 ms: " + " ".join(parts)


def run_system(system: str, args: argparse.Namespace, kind: str, spec: LengthSpec, slo: SLO,
               budget_end: float, num_left: int) -> tuple[dict[str, Any], LengthSpec]:
    """Build, warm up, sweep the rates, shut down; the system's report (and the spec fitted
    to its model length). Its rates get an equal share of the budget left once the systems
    still to come have had as long as this one took to build and warm up."""
    t0 = time.monotonic()
    say(f"{system}: building")
    backend = build(system, args, kind)
    try:
        spec = fit_spec(spec, backend.max_model_len)
        lengths = sample_lengths(spec, args.num_prompts, args.seed)
        say(f"{system}: built in {time.monotonic() - t0:.1f} s; {described_groups(backend)}")
        warm_up(backend, lengths, spec, args.num_warmup)
        now = time.monotonic()
        deadline = now + (budget_end - now - (now - t0) * (num_left - 1)) / num_left
        runs = sweep(backend, system, lengths, args, slo, deadline)
        described = backend.describe()
    finally:
        backend.close()
        del backend
        free_memory()
    say(f"{system}: done in {time.monotonic() - t0:.1f} s")
    return {"backend": described, "runs": runs, **system_summary(runs)}, spec


def sweep(backend: OfflineBackend, system: str, lengths: list[tuple[int, int]], args: argparse.Namespace,
          slo: SLO, deadline: float) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    stopped = False  # a lower rate fell below --stop-below: higher ones would fail too
    for index, rate in enumerate(args.rates):
        if stopped or time.monotonic() >= deadline:
            reason = "below_stop" if stopped else "budget"
            say(f"  {system} rate {rate:g}/s: skipped ({reason})")
            runs.append({"request_rate": rate, "skipped": reason})
            continue
        run = run_rate(backend, lengths, rate, index, args, slo)
        say(f"  {system} rate {rate:g}/s: {describe_run(run)}")
        runs.append(run)
        stopped = run["slo"]["attainment"] < args.stop_below
    return runs


def described_groups(backend: OfflineBackend) -> str:
    return ", ".join(f"{g['name']} on {'+'.join(g['devices'])} ({g['num_kv_blocks']} KV blocks)"
                     for g in backend.describe().get("groups", []))


def free_memory() -> None:
    """After a system's rank processes are gone: drop this process's cached CUDA memory too."""
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def device_info(kind: str) -> dict[str, Any]:
    import torch

    info = {"type": kind, "cpu": results_meta.cpu_model(), "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "env": results_meta.multicast_off()}
    if kind == "cuda":
        n = torch.cuda.device_count()
        info.update(name=f"{n}x {torch.cuda.get_device_name(0)}", num_gpus=n)
    else:
        info.update(name=results_meta.cpu_model(), num_threads=torch.get_num_threads())
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with quiet_warnings():
        return _main(args, argv)


@contextlib.contextmanager
def quiet_warnings():
    """One warning per aborted transfer at a time cap would bury the progress lines; the
    per-run ``kv_transfers`` counters keep failures visible. Errors still show."""
    log = logging.getLogger("splitserve")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _main(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    start, now = time.monotonic(), datetime.now(timezone.utc)
    kind, slo = device_type(args), SLO(args.slo_ttft, args.slo_tpot)
    spec = length_spec(args, kind)
    device = device_info(kind)
    say(f"disagg_goodput: {args.model} on {device['name']}, rates {args.rates}, systems {args.systems}")
    systems: dict[str, dict[str, Any]] = {}
    for k, system in enumerate(args.systems):
        systems[system], spec = run_system(system, args, kind, spec, slo, start + args.budget_s,
                                           len(args.systems) - k)
    report = {
        **results_meta.report_header("disagg_goodput", __file__, argv, now, device),
        "model": args.model,
        "workload": {**spec.__dict__, "seed": args.seed, "rates": args.rates, "num_prompts": args.num_prompts,
                     "window_s": args.window_s, "prompts_per_rate": [prompts_for(r, args.num_prompts, args.window_s)
                                                                     for r in args.rates]},
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "target_attainment": SLO_TARGET_FRACTION},
        "systems": systems,
        "disagg_over_aggregated": compare(systems),
        "wall_s": time.monotonic() - start,
    }
    report = rounded(report)
    out = args.out or results_meta.default_out_path("disagg_goodput", results_meta.slug(device["name"]), now)
    results_meta.save_report(out, report, write_plot, format_table)
    return report


# --- table and plot --------------------------------------------------------------------------


def _cell(run: dict[str, Any]) -> str:
    if "slo" not in run:
        return f"{'(skipped: ' + run['skipped'] + ')':<36}"
    ms = lambda s, k: "-" if s[k] is None else f"{s[k] * 1000:.0f}"  # noqa: E731
    t, p = run["ttft_s"], run["tpot_s"]
    return (f"{run['slo']['attainment']:>5.0%} {ms(t, 'p50'):>6}/{ms(t, 'p99'):<6} "
            f"{ms(p, 'p50'):>5}/{ms(p, 'p99'):<5} {run['num_cut_off']:>3}")


def _fmt(x: float | None, unit: str = "") -> str:
    return "none" if x is None else f"{x:.3g}{unit}"


def format_table(report: dict[str, Any]) -> str:
    w, slo, systems = report["workload"], report["slo"], report["systems"]
    rows = [f"disagg_goodput {report['model']} on {report['device']['name']}: chat median {w['input_len']} in / "
            f"{w['output_len']} out (<= {w['max_input']} / {w['max_output']}), seed {w['seed']}; SLO TTFT <= {slo['ttft_s']} s, "
            f"TPOT <= {slo['tpot_s'] * 1000:.0f} ms, target {slo['target_attainment']:.0%}"]
    names = list(systems)
    rows.append(f"{'rate/s':>7} {'n':>4}  " + "  ".join(f"{n + ': met TTFT p50/p99 TPOT p50/p99 cut':<36}"
                                                       for n in names))
    for i, rate in enumerate(w["rates"]):
        cells = [_cell(systems[n]["runs"][i]) for n in names]
        rows.append(f"{rate:>7g} {w['prompts_per_rate'][i]:>4}  " + "  ".join(cells))
    for n in names:
        s = systems[n]
        rows.append(f"{n}: goodput {_fmt(s['goodput_rate'], ' req/s')} (interpolated "
                    f"{_fmt(s['goodput_rate_interpolated'], ' req/s')}), most SLO-meeting "
                    f"{_fmt(s['max_slo_requests_per_s'], ' req/s')}"
                    + ("" if s["complete"] else "; budget ran out before a rate failed: a lower bound"))
    r = report["disagg_over_aggregated"]
    if r:
        rows.append(f"disagg / aggregated: goodput {_fmt(r['goodput_rate'], 'x')}, interpolated "
                    f"{_fmt(r['goodput_rate_interpolated'], 'x')}, SLO-meeting req/s "
                    f"{_fmt(r['max_slo_requests_per_s'], 'x')} (aim 1.5x)")
    return "\n".join(rows)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slo = report["slo"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    for i, (name, s) in enumerate(report["systems"].items()):
        color = f"C{i}"  # one colour per system; p50 solid, p99 dashed
        runs = [r for r in s["runs"] if "slo" in r]
        rates = [r["request_rate"] for r in runs]
        axes[0].plot(rates, [r["slo"]["attainment"] for r in runs], marker="o", color=color, label=name)
        for ax, key in ((axes[1], "ttft_s"), (axes[2], "tpot_s")):
            for pct, style in (("p50", "-"), ("p99", "--")):
                pts = [(x, r[key][pct]) for x, r in zip(rates, runs) if r[key][pct] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{name} {pct}")
        axes[3].plot(rates, [r["slo"]["goodput_requests_per_s"] for r in runs], marker="o", color=color, label=name)
    axes[0].axhline(slo["target_attainment"], color="gray", linestyle=":", label="target")
    axes[0].set_ylim(0, 1.05)
    axes[1].axhline(slo["ttft_s"], color="gray", linestyle=":", label="SLO")
    axes[2].axhline(slo["tpot_s"], color="gray", linestyle=":", label="SLO")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    titles = ("fraction meeting TTFT and TPOT SLO", "TTFT (s)", "TPOT (s)", "requests/s meeting SLO")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    w = report["workload"]
    results_meta.finish_figure(fig, path, f"disaggregated vs aggregated on {report['device']['name']}: chat median "
                               f"{w['input_len']} in / {w['output_len']} out, seed {w['seed']}")


if __name__ == "__main__":
    main()
