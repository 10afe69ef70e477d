"""Serving benchmark: latency (TTFT, TPOT, ITL, end-to-end), throughput and SLO goodput.

A seeded workload of random token-id prompts (greedy, ignore_eos: every request generates
exactly its output length) arrives as a Poisson process, or all at once, and is served by

- ``--backend offline``: an engine in this process, driven in real time: an `LLMEngine`
  (``--engine llm``), or a `DisaggEngine` of prefill + decode groups (``--engine disagg``) or
  of aggregated replicas (``--engine aggregated``), or
- ``--backend http``: a running OpenAI-compatible server (``POST /v1/completions``, streamed,
  token ids returned), or
- ``--backend grpc``: splitserve's gRPC front door (``--target HOST:PORT``, streamed), or
- ``--backend compare`` (``--compare``): the same workload (lengths, arrivals, token ids, per
  rate) against the engine in this process (the offline options) and against a server
  (``--url`` and/or ``--target``), with the ratios server / engine per rate.

The run:

    sample_lengths + poisson_arrivals + make_requests   # serve_workloads.py
    -> backend.check, warm-up requests                  # serve_backends.py
    -> backend.run per request rate (one, or --sweep-rates)
    -> summarize each run                                # serve_metrics.py (definitions there)
    -> JSON + PNG (latency CDFs; SLO attainment against rate) + a table

Comparison (``--backend compare``): by default the engine part runs first; the engine is then
shut down and its GPU memory released before any request goes to the server. A server that is
already running idles meanwhile (it holds its weights and KV cache: on one GPU both must fit,
as two Llama-3-8B copies with 2 GiB KV each do on an H200). With ``--server-cmd`` the
benchmark starts the server itself after the engine part (``--compare-order engine-first``) or
before it (``server-first``: the server is stopped before the engine is built), so the two
never hold one GPU at once; its output goes to ``<out>.server.log``. Both front doors of one
server share its prefix cache, so the second one measured gets the same prompts with their
first id moved (`serve_workloads.shift_first_tokens`): the same work, no cache hits. The
report holds every part's runs, the ratios per rate (TPOT mean and p99, TTFT p50 and its
difference, output tok/s, requests/s) and a plot of them against rate.

Examples:

    python benchmarks/serve_bench.py --model random:tiny-llama --input-len 64 --output-len 16 \\
        --num-prompts 32 --request-rate 4
    python benchmarks/serve_bench.py --workload chat --num-prompts 200 --sweep-rates 1 2 4 8
    python benchmarks/serve_bench.py --engine disagg --prefill-groups 1 --decode-groups 1 --workload chat
    python benchmarks/serve_bench.py --backend http --url http://127.0.0.1:8000 --vocab-size 49152
    python benchmarks/serve_bench.py --backend grpc --target 127.0.0.1:50051
    python benchmarks/serve_bench.py --compare --model random:llama-3-8b --device cuda --workload chat \\
        --sweep-rates 12 24 --url http://127.0.0.1:8000 --target 127.0.0.1:50051 \\
        --server-cmd "splitserve serve --model random:llama-3-8b --mode aggregated --device cuda"
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the serve_* modules, results_meta
import results_meta  # noqa: E402
from serve_backends import (ENGINES, GRPCBackend, HTTPBackend, OfflineBackend, ServerProcess,  # noqa: E402
                            make_offline_backend)
from serve_metrics import (SLO, SLO_TARGET_FRACTION, RequestRecord, max_rate_meeting_slo,  # noqa: E402
                           request_metrics, summarize)
from serve_workloads import (LengthSpec, make_requests, poisson_arrivals, sample_lengths,  # noqa: E402
                             shift_first_tokens)

#: Per-workload defaults of the length flags (explicit flags override them).
LENGTH_DEFAULTS = {"fixed": dict(input_len=1024, output_len=128),
                   "chat": dict(input_len=256, output_len=128, input_sigma=1.0, output_sigma=0.7,
                                min_input=16, max_input=4096, min_output=16, max_output=1024)}
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TARGET = "127.0.0.1:50051"
#: Prompt ids of the http backend are drawn below this unless --vocab-size says otherwise.
DEFAULT_HTTP_VOCAB = 32000
SERVER_KINDS = ("http", "grpc")
#: A run whose process used more than this share of one core had a busy client (table note).
BUSY_CLIENT = 0.9


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["offline", "http", "grpc", "compare"], default="offline")
    p.add_argument("--compare", action="store_true", help="the same as --backend compare")
    p.add_argument("--model", default=None,
                   help="offline and compare: a model spec (default model, a local folder, random:<name>); "
                        "http: the model name sent (default: the first one GET /v1/models lists); "
                        "grpc: the model the server must serve (default: any)")

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

    o = p.add_argument_group("offline backend (an LLMEngine in this process; also compare's engine part)")
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

    h = p.add_argument_group("server backends (http, grpc; compare's server part)")
    h.add_argument("--url", default=None, help=f"OpenAI-compatible server (http default {DEFAULT_URL}; "
                                               "compare: measured over HTTP when given)")
    h.add_argument("--target", default=None, help=f"gRPC front door HOST:PORT (grpc default {DEFAULT_TARGET}; "
                                                  "compare: measured over gRPC when given)")
    h.add_argument("--vocab-size", type=int, default=None,
                   help=f"prompt token ids are drawn below this (default: http {DEFAULT_HTTP_VOCAB}, fits "
                        "Llama-family vocabularies; grpc: the served model's; compare: --model's)")
    h.add_argument("--timeout", type=float, default=600.0, help="per-request deadline in seconds (default 600)")
    h.add_argument("--server-device", default=None, help="what the server runs on, for the report (e.g. 'H100')")
    h.add_argument("--server-cmd", default=None,
                   help="start this server command (e.g. 'splitserve serve ...') for the server part and stop "
                        "it after (SIGTERM); its output goes to <out>.server.log")
    h.add_argument("--server-wait", type=float, default=900.0,
                   help="seconds to wait for --server-cmd's front doors to be ready (default 900)")

    c = p.add_argument_group("compare")
    c.add_argument("--compare-order", choices=["engine-first", "server-first"], default="engine-first",
                   help="which part runs first (default engine-first; the engine is shut down before the server "
                        "part, and with --server-cmd the server is started only then)")

    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (a PNG goes beside it); default "
                        "benchmarks/results/serve_bench_<backend>-<device>_<date>.json")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.compare:
        args.backend = "compare"
    if args.num_prompts < 1 or args.num_warmup < 0:
        p.error("--num-prompts must be >= 1 and --num-warmup >= 0")
    if any(not r > 0 for r in args.sweep_rates or [args.request_rate]):
        p.error("request rates must be > 0 (inf: all at once)")
    if args.backend == "compare" and args.url is None and args.target is None:
        p.error("--backend compare needs the server: --url (HTTP) and/or --target (gRPC)")
    if args.server_cmd is not None and args.backend == "offline":
        p.error("--server-cmd needs a server backend (http, grpc or compare)")
    if args.backend == "http":
        args.url = args.url or DEFAULT_URL
    if args.backend == "grpc":
        args.target = args.target or DEFAULT_TARGET
    return args


def length_spec(args: argparse.Namespace) -> LengthSpec:
    chosen = {k: getattr(args, k) for k in LENGTH_DEFAULTS["chat"] if getattr(args, k) is not None}
    if args.workload == "fixed" and set(chosen) - {"input_len", "output_len"}:
        raise SystemExit(f"--workload fixed takes --input-len/--output-len only, got {sorted(chosen)}")
    return LengthSpec(kind=args.workload, **{**LENGTH_DEFAULTS[args.workload], **chosen})


def make_backend(args: argparse.Namespace, kind: str | None = None) -> OfflineBackend | HTTPBackend | GRPCBackend:
    """The backend ``kind`` (default ``args.backend``). Within a comparison the servers are not
    told a model: each reports what it serves, which the report checks against the engine's."""
    kind = kind or args.backend
    model = None if args.backend == "compare" else args.model
    if kind == "http":
        return HTTPBackend(args.url, model, args.vocab_size or DEFAULT_HTTP_VOCAB, args.timeout, args.server_device)
    if kind == "grpc":
        return GRPCBackend(args.target, model, args.vocab_size, args.timeout, args.server_device)
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


def workload(lengths: list[tuple[int, int]], rate: float, seed: int, run_index: int, vocab_size: int,
             shift: int = 0) -> list:
    """Run ``run_index``'s requests: the same for every backend given the same vocabulary
    (``shift``: first ids moved, see `serve_workloads.shift_first_tokens`)."""
    arrivals = poisson_arrivals(len(lengths), rate, seed)
    requests = make_requests(lengths, arrivals, vocab_size, token_seed=f"{seed}-run{run_index}")
    return shift_first_tokens(requests, shift, vocab_size)


def run_rate(backend: Any, lengths: list[tuple[int, int]], rate: float, seed: int, run_index: int,
             slo: SLO, progress: bool, vocab_size: int | None = None, shift: int = 0) -> dict[str, Any]:
    """One timed pass of the workload at ``rate``; its summary and per-request figures.
    ``process_cpu_s``: CPU time this process used meanwhile (all its threads): near the
    duration, a server backend's client was busy and its latencies may include its own time."""
    requests = workload(lengths, rate, seed, run_index, vocab_size or backend.vocab_size, shift)
    backend.check(requests)
    cpu0 = time.process_time()
    records, duration = backend.run(requests, progress, desc=f"{backend.name} rate {rate:g}/s")
    cpu = time.process_time() - cpu0
    return {"request_rate": rate_json(rate), **summarize(records, duration, slo), "process_cpu_s": cpu,
            "requests": [per_request(r) for r in records]}


def warm_up(backend: Any, lengths: list[tuple[int, int]], count: int, vocab_size: int | None = None,
            shift: int = 0) -> None:
    """Untimed requests of the workload's first shapes, all at once (compiles, allocates)."""
    if count:
        vocab = vocab_size or backend.vocab_size
        warm = make_requests(lengths[:count], [0.0] * min(count, len(lengths)), vocab, "warmup")
        warm = shift_first_tokens(warm, shift, vocab)
        backend.check(warm)
        records, _ = backend.run(warm)
        failed = [r.error for r in records if not r.ok]
        if failed:
            raise SystemExit(f"{backend.name}: warm-up requests failed: {failed[0]}")


def sweep(backend: Any, lengths: list[tuple[int, int]], args: argparse.Namespace, slo: SLO,
          vocab_size: int | None = None, shift: int = 0) -> dict[str, Any]:
    """Warm-up, then one run per rate: what one backend reports (its description, device, runs)."""
    rates = args.sweep_rates or [args.request_rate]
    warm_up(backend, lengths, args.num_warmup, vocab_size, shift)
    runs = [run_rate(backend, lengths, rate, args.seed, k, slo, not args.no_progress, vocab_size, shift)
            for k, rate in enumerate(rates)]
    part = {"backend": backend.describe(), "device": device_info(backend), "runs": runs}
    if shift:
        part["prompt_first_id_shift"] = shift
    if args.sweep_rates:
        best = max_rate_meeting_slo([(rate_value(r["request_rate"]), r["slo"]["attainment"]) for r in runs])
        part["max_rate_meeting_slo"] = None if best is None else rate_json(best)
    return part


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
    if backend.remote:
        return {"type": "remote", "server": backend.server_device, **info}
    import torch

    device = backend.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else results_meta.cpu_model()
    return {"type": device.type, "name": name, "num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, **info}


def default_out_path(name: str, device: dict[str, Any], now: datetime) -> Path:
    where = device.get("server") if device["type"] == "remote" else device["name"]
    tag = f"{name}-{results_meta.slug(where or device['type'])}"
    return results_meta.default_out_path("serve_bench", tag, now)


def server_log_path(args: argparse.Namespace, now: datetime) -> Path:
    out = args.out or results_meta.RESULTS_DIR / f"serve_bench_{args.backend}_{now:%Y-%m-%d}.json"
    return out.with_suffix(".server.log")


class _Server:
    """``--server-cmd``: starts the server on entry (and waits until its front doors answer),
    stops it on exit; without it, nothing (the server is already running). What happened is
    kept in ``self.record`` for the report."""

    def __init__(self, args: argparse.Namespace, log_path: Path):
        self.args, self.log_path, self.proc = args, log_path, None
        self.record: dict[str, Any] | None = None

    def __enter__(self) -> "_Server":
        if self.args.server_cmd is not None:
            print(f"starting the server: {self.args.server_cmd} (output: {self.log_path})", flush=True)
            self.proc = ServerProcess(self.args.server_cmd, self.log_path)
            ready_s = self.proc.wait_ready(self.args.url, self.args.target, self.args.server_wait)
            self.record = {"command": self.args.server_cmd, "log": str(self.log_path), "ready_after_s": ready_s}
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.record["exit_code"] = self.proc.stop()


def release_engine() -> dict[str, Any]:
    """Free what a shut-down engine left in this process (its tensors, the CUDA cache), so the
    server part that follows has the GPU to itself; what this process still holds on each GPU
    afterwards (its CUDA context aside), for the report."""
    gc.collect()
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    torch.cuda.empty_cache()
    return {"cuda_memory_reserved_after_release": {f"cuda:{i}": torch.cuda.memory_reserved(i)
                                                   for i in range(torch.cuda.device_count())}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, write JSON and PNG, and return the report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.backend == "compare":
        return compare(args, argv)
    spec, slo = length_spec(args), SLO(args.slo_ttft, args.slo_tpot)
    lengths = sample_lengths(spec, args.num_prompts, args.seed)
    now = datetime.now(timezone.utc)

    with _Server(args, server_log_path(args, now)) as server:
        backend = make_backend(args)
        try:
            part = sweep(backend, lengths, args, slo)
        finally:
            backend.close()

    report = {
        **results_meta.report_header("serve_bench", __file__, argv, now, part["device"]),
        "backend": part["backend"],
        **workload_fields(args, spec, lengths, slo),
        "runs": part["runs"],
    }
    if server.record is not None:
        report["server"] = server.record
    if "max_rate_meeting_slo" in part:
        report["max_rate_meeting_slo"] = part["max_rate_meeting_slo"]
    report = rounded(report)
    results_meta.save_report(args.out or default_out_path(backend.name, part["device"], now), report,
                             write_plot, format_table)
    return report


def workload_fields(args: argparse.Namespace, spec: LengthSpec, lengths: list[tuple[int, int]],
                    slo: SLO) -> dict[str, Any]:
    return {"workload": {**spec.__dict__, "num_prompts": args.num_prompts, "seed": args.seed,
                         "total_input_tokens": sum(i for i, _ in lengths),
                         "total_output_tokens": sum(o for _, o in lengths), "num_warmup": args.num_warmup},
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "target_attainment": SLO_TARGET_FRACTION}}


# --- comparison: the engine in this process vs a server ---------------------------------------


def compare_vocab_size(args: argparse.Namespace) -> int:
    """One vocabulary for every part, so their prompt ids are the same: --vocab-size, else the
    engine's model's (its configuration only: no weights are loaded here)."""
    if args.vocab_size is not None:
        return args.vocab_size
    from splitserve.workers.model_source import resolve_model

    return resolve_model(args.model).hf_config.vocab_size


def ratio_row(engine_run: dict[str, Any], server_run: dict[str, Any]) -> dict[str, Any]:
    """Server / engine at one rate (None where either lacks the figure, e.g. nothing completed)."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    e, s = engine_run, server_run
    ttft_e, ttft_s = e["ttft_s"]["p50"], s["ttft_s"]["p50"]
    return {"request_rate": s["request_rate"],
            "tpot_mean": ratio(s["tpot_s"]["mean"], e["tpot_s"]["mean"]),
            "tpot_p99": ratio(s["tpot_s"]["p99"], e["tpot_s"]["p99"]),
            "ttft_p50": ratio(ttft_s, ttft_e),
            "ttft_p50_diff_ms": None if ttft_s is None or ttft_e is None else (ttft_s - ttft_e) * 1000,
            "output_tokens_per_s": ratio(s["throughput"]["output_tokens_per_s"],
                                         e["throughput"]["output_tokens_per_s"]),
            "requests_per_s": ratio(s["throughput"]["requests_per_s"], e["throughput"]["requests_per_s"]),
            "num_completed": {"engine": e["num_completed"], "server": s["num_completed"]}}


def compare(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The engine part and the server part (each front door given) on one workload; see the
    module docstring for the order and why."""
    spec, slo = length_spec(args), SLO(args.slo_ttft, args.slo_tpot)
    lengths = sample_lengths(spec, args.num_prompts, args.seed)
    vocab = compare_vocab_size(args)
    now = datetime.now(timezone.utc)
    kinds = [k for k, given in (("http", args.url), ("grpc", args.target)) if given is not None]
    args.vocab_size = vocab  # the servers' backends draw (and report) the same ids
    parts: dict[str, dict[str, Any]] = {}
    server_record = None

    def engine_part() -> None:
        backend = make_backend(args, "offline")
        try:
            parts["offline"] = sweep(backend, lengths, args, slo, vocab)
        finally:
            backend.close()
        del backend
        parts["offline"]["released"] = release_engine()

    def server_part() -> None:
        nonlocal server_record
        with _Server(args, server_log_path(args, now)) as server:
            for shift, kind in enumerate(kinds):  # a second front door: fresh prompts for the shared cache
                backend = make_backend(args, kind)
                try:
                    parts[kind] = sweep(backend, lengths, args, slo, vocab, shift)
                finally:
                    backend.close()
        server_record = server.record

    for part in ((engine_part, server_part) if args.compare_order == "engine-first" else (server_part, engine_part)):
        part()

    engine = parts["offline"]
    device = {**engine["device"], "server": args.server_device}
    warnings = [f"{k} serves {parts[k]['backend']['model']!r}, the engine ran {engine['backend']['model']!r}"
                for k in kinds if args.model is not None and parts[k]["backend"]["model"] != args.model]
    warnings += [f"{k}: {r['num_failed']} of {r['num_requests']} requests failed at {r['request_rate']}/s: "
                 f"{r['errors'][:2]}" for k in ["offline", *kinds] for r in parts[k]["runs"] if r["num_failed"]]
    report = {
        **results_meta.report_header("serve_bench", __file__, argv, now, device),
        "mode": "compare",
        "order": list(parts),
        **workload_fields(args, spec, lengths, slo),
        "vocab_size": vocab,
        "backends": {k: parts[k] for k in ["offline", *kinds]},
        "ratios": {k: [ratio_row(e, s) for e, s in zip(engine["runs"], parts[k]["runs"])] for k in kinds},
        "warnings": warnings,
    }
    if server_record is not None:
        report["server"] = server_record
    report = rounded(report)
    out = args.out or default_out_path("compare", engine["device"], now)
    results_meta.save_report(out, report, write_compare_plot, format_compare_table)
    return report


# --- table and plot --------------------------------------------------------------------------


def _ms(stats: dict[str, Any], *keys: str) -> str:
    return "/".join("-" if stats[k] is None else f"{stats[k] * 1000:.1f}" for k in keys)


def format_table(report: dict[str, Any]) -> str:
    w, b = report["workload"], report["backend"]
    lengths = (f"{w['input_len']} in / {w['output_len']} out" if w["kind"] == "fixed" else
               f"chat: median {w['input_len']} in / {w['output_len']} out")
    where = report["device"].get("name") or b.get("url") or b.get("target")
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
        rows.extend(_run_notes(r, "        ", report["device"]["type"] == "remote"))
    slo = report["slo"]
    rows.append(f"SLO: TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_s']} s")
    if "max_rate_meeting_slo" in report:
        best = report["max_rate_meeting_slo"]
        rows.append(f"highest rate with >= {slo['target_attainment']:.0%} of requests meeting it: "
                    + ("none of the rates tried" if best is None else f"{best} req/s"))
    return "\n".join(rows)


def _run_notes(r: dict[str, Any], indent: str, client: bool) -> list[str]:
    notes = []
    if r["num_failed"] or r["num_wrong_length"]:
        notes.append(f"{indent}{r['num_failed']} failed, {r['num_wrong_length']} with a different output "
                     f"length than asked; errors: {r['errors']}")
    busy = r.get("process_cpu_s", 0.0) / r["duration_s"] if r["duration_s"] else 0.0
    if client and busy > BUSY_CLIENT:
        notes.append(f"{indent}this process was busy {busy:.0%} of the run (one core is 100%): its latencies "
                     f"may include the client's own time")
    return notes


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
    results_meta.finish_figure(fig, path, f"serve_bench {report['backend']['backend']} {report['backend']['model'] or ''}: "
                               f"{w['num_prompts']} prompts ({w['kind']}), seed {w['seed']}")


def _plot_attainment(ax: Any, report: dict[str, Any]) -> None:
    """SLO attainment against rate."""
    xs = _rate_axis(ax, [r["request_rate"] for r in report["runs"]])
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ax.plot([xs[i] for i in order], [report["runs"][i]["slo"]["attainment"] for i in order], marker="o")
    ax.axhline(report["slo"]["target_attainment"], color="gray", linestyle="--", linewidth=1, label="target")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction meeting TTFT and TPOT SLO")
    ax.legend(fontsize=7)


# --- comparison: table and plot --------------------------------------------------------------

#: (label, key in a ratio row, format) of the comparison table's ratio columns.
RATIO_COLUMNS = [("TPOT mean", "tpot_mean", "{:.2f}x"), ("TPOT p99", "tpot_p99", "{:.2f}x"),
                 ("TTFT p50", "ttft_p50", "{:.2f}x"), ("TTFT p50 +ms", "ttft_p50_diff_ms", "{:+.1f}"),
                 ("out tok/s", "output_tokens_per_s", "{:.2f}x"), ("req/s", "requests_per_s", "{:.2f}x")]


def _where(part: dict[str, Any]) -> str:
    b = part["backend"]
    if b["backend"] == "offline":
        return f"engine ({b['engine']}, {part['device']['name']})"
    return f"{b['backend']} {b.get('url') or b.get('target')}"


def format_compare_table(report: dict[str, Any]) -> str:
    w, parts = report["workload"], report["backends"]
    lengths = (f"{w['input_len']} in / {w['output_len']} out" if w["kind"] == "fixed" else
               f"chat: median {w['input_len']} in / {w['output_len']} out")
    engine = parts["offline"]
    rows = [f"serve_bench compare {engine['backend']['model'] or ''}: {w['num_prompts']} prompts, {lengths}, "
            f"seed {w['seed']}; order: {' -> '.join(report['order'])}",
            "  " + "; ".join(f"{k} = {_where(p)}" for k, p in parts.items()),
            f"{'rate/s':>7} {'backend':>8} {'done':>9} {'req/s':>7} {'out tok/s':>10} {'TTFT ms p50/p99':>16} "
            f"{'TPOT ms mean/p99':>17} {'ITL ms p50/p99':>15} {'SLO met':>8}"]
    for k, engine_run in enumerate(engine["runs"]):
        for name, part in parts.items():
            r = part["runs"][k]
            rows.append(
                f"{r['request_rate']:>7} {name:>8} {r['num_completed']:>4}/{r['num_requests']:<4} "
                f"{r['throughput']['requests_per_s']:>7.2f} {r['throughput']['output_tokens_per_s']:>10.1f} "
                f"{_ms(r['ttft_s'], 'p50', 'p99'):>16} {_ms(r['tpot_s'], 'mean', 'p99'):>17} "
                f"{_ms(r['itl_s'], 'p50', 'p99'):>15} {r['slo']['attainment']:>8.0%}")
            rows.extend(_run_notes(r, " " * 17, name != "offline"))
    rows.append("server / engine per rate:")
    rows.append(f"{'rate/s':>7} {'backend':>8} " + " ".join(f"{label:>12}" for label, _, _ in RATIO_COLUMNS))
    for name, ratios in report["ratios"].items():
        for row in ratios:
            cells = ["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in RATIO_COLUMNS]
            rows.append(f"{row['request_rate']:>7} {name:>8} " + " ".join(f"{c:>12}" for c in cells))
    rows.extend(f"warning: {text}" for text in report["warnings"])
    return "\n".join(rows)


def _rate_axis(ax: Any, rates: list[float | str]) -> list[float]:
    """x positions of the rates; an `inf` rate is drawn one step past the largest finite one."""
    values = [rate_value(r) for r in rates]
    finite = [r for r in values if math.isfinite(r)] or [1.0]
    xs = [r if math.isfinite(r) else max(finite) * 1.25 for r in values]
    ax.set_xticks(xs, [f"{r:g}" for r in values], fontsize=7)
    ax.set_xlabel("request rate (req/s)")
    ax.grid(alpha=0.3)
    return xs


def write_compare_plot(path: Path, report: dict[str, Any]) -> None:
    """TPOT mean and p99, TTFT p50 and output tok/s against rate, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = [("TPOT mean (ms)", lambda r: r["tpot_s"]["mean"], 1000, report["slo"]["tpot_s"]),
              ("TPOT p99 (ms)", lambda r: r["tpot_s"]["p99"], 1000, report["slo"]["tpot_s"]),
              ("TTFT p50 (ms)", lambda r: r["ttft_s"]["p50"], 1000, report["slo"]["ttft_s"]),
              ("output tok/s", lambda r: r["throughput"]["output_tokens_per_s"], 1, None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (title, value, scale, objective) in zip(axes, panels):
        top = 0.0
        for name, part in report["backends"].items():
            xs = _rate_axis(ax, [r["request_rate"] for r in part["runs"]])
            points = sorted((x, value(r) * scale) for x, r in zip(xs, part["runs"]) if value(r) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=name if name != "offline" else "engine")
                top = max(top, *(y for _, y in points))
        if objective is not None and objective * scale <= 2 * top:  # (far above the data it would flatten it)
            ax.axhline(objective * scale, color="gray", linestyle="--", linewidth=1, label="SLO")
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    w = report["workload"]
    results_meta.finish_figure(fig, path, f"serve_bench compare {report['backends']['offline']['backend']['model'] or ''}: "
                               f"engine in-process vs server; {w['num_prompts']} prompts ({w['kind']}), seed {w['seed']}")


if __name__ == "__main__":
    main()
