"""What the router adds: per-request latency and the request rate it sustains.

The model path is made trivially cheap (a tiny random model, one output token, short prompts),
so what is left is the serving machinery. Two ways to run the same requests on the same kind
of group (rank processes behind connections, one group of tp 1):

    direct   the `DisaggEngine` stepped in this process, one request at a time (no Ray, no
             router): the floor
    router   the `Router` actor on a local Ray cluster, through `RouterHandle.generate` (a Ray
             streaming call per request), one request at a time
    grpc     the same router through its gRPC front door (served from the router actor's
             process, as `splitserve serve` runs it) with the Python `AsyncClient`: what a
             client sees

The overhead per request is each path's latency minus direct latency (p50 and p99 of each).
Then the sustained rate: ``--requests`` requests from ``--concurrency`` concurrent clients
through each path, requests per second completed, beside the direct engine given all of them
at once.

    python benchmarks/router_overhead.py                 # ~1 minute on 2 cores
    python benchmarks/router_overhead.py --mode disaggregated --requests 1000 --concurrency 64

Writes JSON + a PNG (latency CDFs) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
from results_meta import RESULTS_DIR, cpu_model, report_header, save_report, slug  # noqa: E402
from serve_metrics import percentile  # noqa: E402  (one definition of a percentile for every benchmark)

MODEL = "random:tiny-llama"


def summary(latencies_s: list[float]) -> dict[str, float]:
    return {"n": len(latencies_s), "mean_ms": 1e3 * statistics.fmean(latencies_s),
            "p50_ms": 1e3 * percentile(latencies_s, 50), "p99_ms": 1e3 * percentile(latencies_s, 99)}


def overhead(router: dict[str, float], direct: dict[str, float]) -> dict[str, float]:
    return {"p50_ms": router["p50_ms"] - direct["p50_ms"], "p99_ms": router["p99_ms"] - direct["p99_ms"],
            "mean_ms": router["mean_ms"] - direct["mean_ms"]}


def prompts(n: int, length: int = 8) -> list[list[int]]:
    return [[3 + (i * 7 + j) % 200 for j in range(length)] for i in range(n)]


def serve_config(mode: str):
    from splitserve.cluster.serve_config import RouterSpec, ServeConfig

    # No admission cap: the sustained-rate run measures the router, not its overload answer.
    return ServeConfig(model=MODEL, mode=mode, device="cpu", kv_cache_memory=64 * 1024**2,
                       router=RouterSpec(max_inflight=100_000)).validate()


# ---- direct: the engine in this process -------------------------------------------------------


def direct_engine(mode: str):
    from splitserve.cluster.groups import engine_config
    from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine

    cfg = serve_config(mode)
    if mode == "disaggregated":
        dc = DisaggConfig(prefill=engine_config(cfg, "prefill", "cpu"), decode=engine_config(cfg, "decode", "cpu"),
                          in_process=False)
    else:
        dc = DisaggConfig(prefill=None, decode=engine_config(cfg, "worker", "cpu"), in_process=False)
    return DisaggEngine(dc)


def run_direct(engine, ids: list[list[int]], at_once: bool) -> tuple[list[float], float]:
    from splitserve import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    latencies, t_start = [], time.perf_counter()
    if at_once:
        for i, p in enumerate(ids):
            engine.add_request(f"all-{i}", p, params)
        done = 0
        while done < len(ids):
            done += sum(o.finished for o in engine.step())
        return [], time.perf_counter() - t_start
    for i, p in enumerate(ids):
        t = time.perf_counter()
        engine.add_request(f"one-{i}", p, params)
        while not any(o.finished for o in engine.step()):
            pass
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - t_start


# ---- through the router -----------------------------------------------------------------------


async def one_request(handle, prompt: list[int]) -> float:
    from splitserve import SamplingParams
    from splitserve.router.messages import GenerateRequest

    t = time.perf_counter()
    async for _ in handle.generate(GenerateRequest(token_ids=prompt,
                                                   sampling=SamplingParams(max_tokens=1, ignore_eos=True))):
        pass
    return time.perf_counter() - t


async def one_grpc_request(client, prompt: list[int]) -> float:
    from splitserve import SamplingParams

    t = time.perf_counter()
    await client.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    return time.perf_counter() - t


async def run_router(handle, ids: list[list[int]], concurrency: int) -> tuple[list[float], float]:
    return await _clients(lambda p: one_request(handle, p), ids, concurrency)


async def run_grpc(address: str, ids: list[list[int]], concurrency: int) -> tuple[list[float], float]:
    from splitserve import AsyncClient

    async with AsyncClient(address) as client:
        return await _clients(lambda p: one_grpc_request(client, p), ids, concurrency)


async def _clients(send, ids: list[list[int]], concurrency: int) -> tuple[list[float], float]:
    """Each of ``concurrency`` clients sends its share one after another."""
    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for p in ids:
        queue.put_nowait(p)

    async def client() -> None:
        while not queue.empty():
            latencies.append(await send(queue.get_nowait()))

    t = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return latencies, time.perf_counter() - t


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from splitserve.cluster.ray_cluster import connect
    from splitserve.cluster.serve import start_router, stop_router
    from splitserve.cluster.serve_config import ServerSpec

    ids = prompts(max(args.sequential, args.requests))
    print(f"direct engine ({args.mode}) ...", flush=True)
    engine = direct_engine(args.mode)
    try:
        run_direct(engine, ids[:5], at_once=False)  # warm-up
        direct_lat, _ = run_direct(engine, ids[: args.sequential], at_once=False)
        _, direct_all_s = run_direct(engine, ids[: args.requests], at_once=True)
    finally:
        engine.shutdown()
    started_ray = not ray.is_initialized()
    connect(None, num_cpus=32)
    print("router on Ray ...", flush=True)
    handle = start_router(serve_config(args.mode))
    try:
        asyncio.run(run_router(handle, ids[:5], 1))  # warm-up
        router_lat, _ = asyncio.run(run_router(handle, ids[: args.sequential], 1))
        loaded_lat, loaded_s = asyncio.run(run_router(handle, ids[: args.requests], args.concurrency))
        print("gRPC front door ...", flush=True)
        grpc_port, _ = ray.get(handle.actor.start_front_doors.remote(ServerSpec(grpc_port=0, http_port=0)))
        address = f"127.0.0.1:{grpc_port}"
        asyncio.run(run_grpc(address, ids[:5], 1))  # warm-up
        grpc_lat, _ = asyncio.run(run_grpc(address, ids[: args.sequential], 1))
        grpc_loaded_lat, grpc_loaded_s = asyncio.run(run_grpc(address, ids[: args.requests], args.concurrency))
    finally:
        stop_router(handle)
        if started_ray:
            ray.shutdown()
    direct, router, grpc = summary(direct_lat), summary(router_lat), summary(grpc_lat)
    return {
        "sequential": {"direct": direct, "router": router, "grpc": grpc, "overhead": overhead(router, direct),
                       "grpc_overhead": overhead(grpc, direct)},
        "sustained": {"requests": args.requests, "concurrency": args.concurrency,
                      "router_req_s": args.requests / loaded_s, "router_latency": summary(loaded_lat),
                      "grpc_req_s": args.requests / grpc_loaded_s, "grpc_latency": summary(grpc_loaded_lat),
                      "direct_all_at_once_req_s": args.requests / direct_all_s},
        "latencies_ms": {"direct": [1e3 * x for x in direct_lat], "router": [1e3 * x for x in router_lat],
                         "grpc": [1e3 * x for x in grpc_lat], "router_loaded": [1e3 * x for x in loaded_lat],
                         "grpc_loaded": [1e3 * x for x in grpc_loaded_lat]},
    }


def format_table(report: dict[str, Any]) -> str:
    s, u = report["sequential"], report["sustained"]
    rows = [f"{'one at a time':<24}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}"]
    for name, label in (("direct", "direct"), ("router", "router (Ray call)"), ("grpc", "gRPC front door"),
                        ("overhead", "router - direct"), ("grpc_overhead", "gRPC - direct")):
        r = s[name]
        rows.append(f"{label:<24}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['mean_ms']:>10.2f}")
    rows.append(f"sustained ({u['concurrency']} clients, {u['requests']} requests): gRPC {u['grpc_req_s']:.1f} req/s "
                f"(p50 {u['grpc_latency']['p50_ms']:.1f} ms), Ray call {u['router_req_s']:.1f} req/s "
                f"(p50 {u['router_latency']['p50_ms']:.1f} ms), direct engine all at once "
                f"{u['direct_all_at_once_req_s']:.1f} req/s")
    return "\n".join(rows)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in report["latencies_ms"].items():
        if values:
            xs = sorted(values)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("request latency (ms), one output token")
    ax.set_ylabel("fraction of requests")
    o, u = report["sequential"]["grpc_overhead"], report["sustained"]
    ax.set_title(f"gRPC front door adds p50 {o['p50_ms']:.2f} ms, p99 {o['p99_ms']:.2f} ms; "
                 f"{u['grpc_req_s']:.0f} req/s sustained ({u['concurrency']} clients)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("aggregated", "disaggregated"), default="aggregated")
    p.add_argument("--sequential", type=int, default=200, help="requests sent one at a time (latency)")
    p.add_argument("--requests", type=int, default=500, help="requests of the sustained-rate run")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients of the sustained-rate run")
    p.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(1)
    now = datetime.now(timezone.utc)
    device = {"type": "cpu", "cpu": cpu_model(), "torch": torch.__version__}
    report = report_header("router_overhead", __file__, argv, now, device)
    report.update({"model": MODEL, "mode": args.mode, "output_tokens": 1})
    report.update(measure(args))
    out = args.out or RESULTS_DIR / f"router_overhead_{args.mode}_{slug(device['cpu'])}_{now:%Y-%m-%d}.json"
    save_report(out, report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
