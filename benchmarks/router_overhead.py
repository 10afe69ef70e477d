"""What the serving machinery adds: per-request latency and the request rate it sustains.

The model path is made trivially cheap (a tiny random model, one output token, short prompts),
so what is left is the serving machinery. Three ways to run the same requests on the same kind
of group (rank processes behind connections, one group of tp 1):

    direct   the `DisaggEngine` stepped in this process, one request at a time (no Ray, no
             sockets): the floor
    core     the engine core (`EngineCoreActor`, as `splitserve serve` runs it) through an
             `EngineClient` in this process, over the core's ipc sockets: what a front door
             does, without gRPC
    grpc     the front-door processes (`start_doors`, ``--api-servers N`` of them sharing the
             port) with the Python `AsyncClient`: what a client sees

The overhead per request is each path's latency minus direct latency (p50 and p99 of each),
requests sent one at a time. Then the sustained rate: ``--requests`` requests from
``--concurrency`` concurrent clients, requests per second completed: through the core (all
clients in this process) and through gRPC, where the clients are spread over
``--client-processes K`` spawned processes (each its own `AsyncClient`, connection and share
of the requests and clients) so this process's GIL does not cap the figure; beside them the
direct engine given all requests at once. ``--api-servers`` and ``--client-processes`` take
several values: every combination is run (the doors restarted per count), and the fastest is
the headline. Each run also records the CPU seconds each process of the service spent (the
core, each door, the rank processes, the clients) to show where the machine's cores went.

Issue 14 (must-show #2): through gRPC, at least 4x the 361 req/s measured before the
engine-core split (`BASELINE_GRPC_REQ_S`), adding p50 <= 2 ms; the table, the JSON
(``issue14``) and the plot title say both.

    python benchmarks/router_overhead.py                 # ~1 minute on 2 cores
    python benchmarks/router_overhead.py --requests 2000 --concurrency 64 --api-servers 1 2 --client-processes 1 2
    python benchmarks/router_overhead.py ... --py-spy /tmp/prof   # + py-spy samples of the core and doors

Writes JSON + a PNG (latency CDFs) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
from results_meta import RESULTS_DIR, cpu_model, report_header, save_report, slug  # noqa: E402
from serve_metrics import percentile  # noqa: E402  (one definition of a percentile for every benchmark)

MODEL = "random:tiny-llama"
#: gRPC req/s before the engine-core split (router_overhead_aggregated_amd-epyc_2026-11-30.json:
#: 500 requests from 32 clients through the front door served in the Router actor).
BASELINE_GRPC_REQ_S = 361.0
BASELINE_FILE = "router_overhead_aggregated_amd-epyc_2026-11-30.json"
#: Issue 14, must-show #2.
TARGET_RATIO = 4.0
TARGET_P50_MS = 2.0
WARMUP = 5


def summary(latencies_s: list[float]) -> dict[str, float]:
    return {"n": len(latencies_s), "mean_ms": 1e3 * statistics.fmean(latencies_s),
            "p50_ms": 1e3 * percentile(latencies_s, 50), "p99_ms": 1e3 * percentile(latencies_s, 99)}


def overhead(path: dict[str, float], direct: dict[str, float]) -> dict[str, float]:
    return {"p50_ms": path["p50_ms"] - direct["p50_ms"], "p99_ms": path["p99_ms"] - direct["p99_ms"],
            "mean_ms": path["mean_ms"] - direct["mean_ms"]}


def prompts(n: int, length: int = 8) -> list[list[int]]:
    return [[3 + (i * 7 + j) % 200 for j in range(length)] for i in range(n)]


def serve_config(mode: str):
    from splitserve.cluster.serve_config import RouterSpec, ServeConfig, ServerSpec

    # No admission cap: the sustained-rate run measures the machinery, not its overload answer.
    return ServeConfig(model=MODEL, mode=mode, device="cpu", kv_cache_memory=64 * 1024**2,
                       router=RouterSpec(max_inflight=100_000),
                       server=ServerSpec(grpc_port=0, http_port=0)).validate()


def split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` near-equal shares (the first ones larger)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


# ---- direct: the engine in this process -------------------------------------------------------


def direct_engine(mode: str):
    from splitserve.workers.disagg_engine import DisaggEngine

    return DisaggEngine(serve_config(mode).service("cpu").engine.disagg_config(in_process=False))


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


# ---- through the engine core, and through gRPC -------------------------------------------------


async def one_core_request(client, prompt: list[int]) -> float:
    from splitserve import SamplingParams
    from splitserve.router.messages import GenerateRequest

    t = time.perf_counter()
    async for _ in client.generate(GenerateRequest(token_ids=prompt,
                                                   sampling=SamplingParams(max_tokens=1, ignore_eos=True))):
        pass
    return time.perf_counter() - t


async def one_grpc_request(client, prompt: list[int]) -> float:
    from splitserve import SamplingParams

    t = time.perf_counter()
    await client.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    return time.perf_counter() - t


async def warm_up_grpc(client, ids: list[list[int]], wait_s: float = 30.0) -> None:
    """A few requests, each retried while its door answers UNAVAILABLE: `start_doors` returns
    once the doors listen, which can be before a door's client has heard the core's first beat."""
    from splitserve.router.messages import ErrorCode, RouterError

    deadline = time.monotonic() + wait_s
    for p in ids:
        while True:
            try:
                await one_grpc_request(client, p)
                break
            except RouterError as err:
                if err.code is not ErrorCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


async def run_core(client, ids: list[list[int]], concurrency: int) -> tuple[list[float], float]:
    """Through an `EngineClient` in this process (the core handle's)."""
    return await _clients(lambda p: one_core_request(client, p), ids, concurrency)


async def run_grpc(address: str, ids: list[list[int]], concurrency: int,
                   warm_up: list[list[int]] = ()) -> tuple[list[float], float]:
    from splitserve import AsyncClient

    async with AsyncClient(address) as client:
        await warm_up_grpc(client, list(warm_up))
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


def _grpc_client_process(address: str, ids: list[list[int]], concurrency: int, barrier, results) -> None:
    """One client process of the sustained gRPC run (spawned): its own `AsyncClient` (so its own
    connection, which the kernel hands to one of the doors), warmed up, then its share of the
    requests from ``concurrency`` clients once every process is ready. Sends back (latencies,
    monotonic start, monotonic end, CPU seconds of this process during the run), then waits for
    the parent to have sampled every process's CPU time."""
    from splitserve import AsyncClient

    async def main():
        async with AsyncClient(address) as client:
            await warm_up_grpc(client, ids[:WARMUP])
            barrier.wait()  # nothing else runs on this loop yet: blocking is fine
            cpu0, t0 = time.process_time(), time.monotonic()
            latencies, _ = await _clients(lambda p: one_grpc_request(client, p), ids, concurrency)
            return latencies, t0, time.monotonic(), time.process_time() - cpu0

    try:
        results.put(("ok", asyncio.run(main())))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        results.put(("error", f"{type(err).__name__}: {err}"))
    try:
        barrier.wait(timeout=60)  # alive until the parent has read this process's CPU time
    except Exception:  # noqa: BLE001 - the parent gave up on us: just leave
        pass


def run_grpc_processes(address: str, ids: list[list[int]], concurrency: int, processes: int,
                       watch: "CpuWatch") -> dict[str, Any]:
    """The sustained gRPC run from ``processes`` spawned client processes; req/s completed
    from the first process's start to the last one's end."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    shares = [ids[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=_grpc_client_process, args=(address, share, c, barrier, results), daemon=True)
             for share, c in zip(shares, split(concurrency, processes))]
    for p in procs:
        p.start()
        watch.roles[p.pid] = "clients"
    try:
        barrier.wait(timeout=120)
        watch.start()
        outs = [results.get(timeout=600) for _ in procs]
        cpu = watch.stop(len(ids))
        barrier.wait(timeout=60)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [o for status, o in outs if status != "ok"]
    if errors:
        raise RuntimeError(f"a gRPC client process failed: {errors[0]}")
    latencies = [x for _, o in outs for x in o[0]]
    wall = max(o[2] for _, o in outs) - min(o[1] for _, o in outs)
    cpu["each_client"] = [round(o[3], 3) for _, o in outs]  # as each measured itself
    return {"latencies": latencies, "wall_s": wall, "cpu_s": cpu}


# ---- where the CPU went ---------------------------------------------------------------------


class CpuWatch:
    """CPU seconds each process of the service spends between `start` and `stop`: the core, each
    door and the client processes (by pid), the other processes this one started (Ray's rank
    actors by their title, Ray's own daemons together), this process, and the whole machine
    (which includes anything else running on it)."""

    def __init__(self, roles: dict[int, str]):
        self.roles = roles

    def _sample(self) -> dict[int, tuple[str, float]]:
        import psutil

        me = psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                role = self.roles.get(p.pid) or ("benchmark (this process)" if p.pid == me.pid else _title(p))
                out[p.pid] = (role, t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def start(self) -> None:
        import psutil

        self._t0, self._before, self._machine0 = time.monotonic(), self._sample(), psutil.cpu_times()

    def stop(self, requests: int) -> dict[str, Any]:
        """CPU seconds by role, and per request (ms): the cost of each process for one request,
        which other work on the machine does not change much (the wall time it does)."""
        import psutil

        after, machine = self._sample(), psutil.cpu_times()
        wall = time.monotonic() - self._t0
        by_role: dict[str, float] = {}
        for pid, (role, t) in after.items():
            by_role[role] = by_role.get(role, 0.0) + t - self._before.get(pid, (role, 0.0))[1]
        by_role = {k: v for k, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v >= 0.005}
        busy = sum(getattr(machine, f) - getattr(self._machine0, f) for f in ("user", "system", "nice", "irq",
                                                                               "softirq", "steal"))
        ours = sum(by_role.values())
        # The service's own processes: everything but the load generator (client processes, or
        # this process, which holds the clients of the core run).
        service = sum(v for k, v in by_role.items() if k not in ("clients", "benchmark (this process)"))
        return {"wall_s": round(wall, 3), "machine_cores": psutil.cpu_count(), "machine_busy_s": round(busy, 3),
                "not_ours_s": round(max(0.0, busy - ours), 3),  # other work on the machine meanwhile
                "processes": {k: round(v, 3) for k, v in by_role.items()},
                "ms_per_request": {**{k: round(1e3 * v / requests, 4) for k, v in by_role.items()},
                                   "total": round(1e3 * ours / requests, 4),
                                   "service": round(1e3 * service / requests, 4)}}


def _title(proc) -> str:
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001
        return "other"
    first = cmd[0] if cmd else proc.name()
    if first.startswith("ray::"):
        return first.split(".")[0].split(" ")[0]  # ray::RankActor (the method it runs dropped)
    return "ray daemons and others"


class PySpy:
    """``py-spy record`` (raw collapsed stacks, all threads) of the given processes while a run
    lasts; stopped with SIGINT, which makes it write its file."""

    def __init__(self, folder: Path | None, name: str, pids: dict[str, int]):
        self.procs: list[subprocess.Popen] = []
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("py-spy")
        for role, pid in pids.items():
            out = folder / f"{name}-{role}.txt"
            self.procs.append(subprocess.Popen([str(exe), "record", "--pid", str(pid), "--rate", "200",
                                                "--format", "raw", "--threads", "--nonblocking", "-o", str(out)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # attached before the run starts

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


# ---- the run -------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from splitserve.cluster.ray_cluster import connect
    from splitserve.cluster.serve import start_core, start_doors, stop_core, stop_doors

    ids = prompts(max(args.sequential, args.requests))
    print(f"direct engine ({args.mode}) ...", flush=True)
    engine = direct_engine(args.mode)
    try:
        run_direct(engine, ids[:WARMUP], at_once=False)
        direct_lat, _ = run_direct(engine, ids[: args.sequential], at_once=False)
        _, direct_all_s = run_direct(engine, ids[: args.requests], at_once=True)
    finally:
        engine.shutdown()
    started_ray = not ray.is_initialized()
    connect(None, num_cpus=32)
    cfg = serve_config(args.mode)
    print("engine core on Ray ...", flush=True)
    handle = start_core(cfg)
    variants: list[dict[str, Any]] = []
    try:
        core_pid = ray.get(handle.actor.pid.remote())
        asyncio.run(run_core(handle.client, ids[:WARMUP], 1))
        core_lat, _ = asyncio.run(run_core(handle.client, ids[: args.sequential], 1))
        watch = CpuWatch({core_pid: "core"})
        watch.start()
        core_loaded_lat, core_loaded_s = asyncio.run(run_core(handle.client, ids[: args.requests], args.concurrency))
        core_cpu = watch.stop(args.requests)
        grpc_lat: list[float] = []
        for doors_n in args.api_servers:
            print(f"gRPC through {doors_n} front door(s) ...", flush=True)
            doors, grpc_port, _ = _start_doors(start_doors, cfg, handle.address, doors_n)
            try:
                address = f"127.0.0.1:{grpc_port}"
                door_pids = ray.get([d.pid.remote() for d in doors])
                if not grpc_lat:  # one at a time: one connection, so one door whatever their number
                    grpc_lat, _ = asyncio.run(run_grpc(address, ids[: args.sequential], 1, warm_up=ids[:WARMUP]))
                    grpc_lat_doors = doors_n
                roles = {core_pid: "core", **{pid: f"door{i}" for i, pid in enumerate(door_pids)}}
                for procs_k in args.client_processes:
                    name = f"doors{doors_n}-clients{procs_k}"
                    spy = PySpy(args.py_spy, name, {"core": core_pid, **{f"door{i}": p for i, p in enumerate(door_pids)}})
                    try:
                        run = run_grpc_processes(address, ids[: args.requests], args.concurrency, procs_k,
                                                 CpuWatch(roles))
                    finally:
                        spy.stop()
                    variants.append({"api_servers": doors_n, "client_processes": procs_k,
                                     "req_s": args.requests / run["wall_s"], "latency": summary(run["latencies"]),
                                     "cpu_s": run["cpu_s"], "_latencies": run["latencies"]})
                    print(f"  {name}: {variants[-1]['req_s']:.0f} req/s", flush=True)
            finally:
                stop_doors(doors)
    finally:
        stop_core(handle)
        if started_ray:
            ray.shutdown()
    best = max(variants, key=lambda v: v["req_s"])
    grpc_loaded_lat = best["_latencies"]
    for v in variants:
        del v["_latencies"]
    direct, core, grpc = summary(direct_lat), summary(core_lat), summary(grpc_lat)
    grpc_overhead = overhead(grpc, direct)
    return {
        "sequential": {"direct": direct, "core": core, "grpc": grpc, "core_overhead": overhead(core, direct),
                       "grpc_overhead": grpc_overhead, "grpc_api_servers": grpc_lat_doors},
        "sustained": {"requests": args.requests, "concurrency": args.concurrency,
                      "core_req_s": args.requests / core_loaded_s, "core_latency": summary(core_loaded_lat),
                      "core_cpu_s": core_cpu,
                      "grpc_req_s": best["req_s"], "grpc_latency": best["latency"],
                      "grpc_api_servers": best["api_servers"], "grpc_client_processes": best["client_processes"],
                      "grpc_variants": variants,
                      "direct_all_at_once_req_s": args.requests / direct_all_s},
        "issue14": {"baseline_grpc_req_s": BASELINE_GRPC_REQ_S, "baseline_file": BASELINE_FILE,
                    "grpc_req_s": best["req_s"], "ratio": best["req_s"] / BASELINE_GRPC_REQ_S,
                    "ratio_target": TARGET_RATIO, "grpc_added_p50_ms": grpc_overhead["p50_ms"],
                    "added_p50_target_ms": TARGET_P50_MS,
                    "rate_met": best["req_s"] >= TARGET_RATIO * BASELINE_GRPC_REQ_S,
                    "latency_met": grpc_overhead["p50_ms"] <= TARGET_P50_MS},
        "latencies_ms": {"direct": [1e3 * x for x in direct_lat], "core": [1e3 * x for x in core_lat],
                         "grpc": [1e3 * x for x in grpc_lat], "core_loaded": [1e3 * x for x in core_loaded_lat],
                         "grpc_loaded": [1e3 * x for x in grpc_loaded_lat]},
    }


def _start_doors(start_doors, cfg, address, count: int, wait_s: float = 30.0):
    """`start_doors`, retried while the names of doors just stopped are still taken in Ray."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return start_doors(cfg, address, count)
        except ValueError as err:  # "The name ... is already taken"
            if "already" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def format_table(report: dict[str, Any]) -> str:
    s, u, g = report["sequential"], report["sustained"], report["issue14"]
    rows = [f"{'one at a time':<26}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}"]
    for name, label in (("direct", "direct"), ("core", "core (EngineClient)"), ("grpc", "gRPC front door"),
                        ("core_overhead", "core - direct"), ("grpc_overhead", "gRPC - direct")):
        r = s[name]
        rows.append(f"{label:<26}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['mean_ms']:>10.2f}")
    rows.append(f"sustained, {u['concurrency']} clients, {u['requests']} requests ({report['device'].get('cores', '?')}"
                f" cores):")
    rows.append(f"  {'path':<34}{'req/s':>9}{'x 361':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for v in u["grpc_variants"]:
        label = f"gRPC, {v['api_servers']} door(s), {v['client_processes']} client proc(s)"
        rows.append(f"  {label:<34}{v['req_s']:>9.0f}{v['req_s'] / BASELINE_GRPC_REQ_S:>8.2f}"
                    f"{v['latency']['p50_ms']:>9.1f}{v['latency']['p99_ms']:>9.1f}")
    for v in u["grpc_variants"]:
        per = v["cpu_s"]["ms_per_request"]
        cores = v["cpu_s"]["machine_cores"]
        parts = ", ".join(f"{k} {x:.2f}" for k, x in per.items() if k not in ("total", "service") and x >= 0.01)
        rows.append(f"    CPU ms/request ({v['api_servers']} door(s), {v['client_processes']} client proc(s)): {parts}; "
                    f"total {per['total']:.2f}, {cores} cores' ceiling {1e3 * cores / per['total']:.0f} req/s; "
                    f"without the clients {per['service']:.2f}, ceiling {1e3 * cores / per['service']:.0f} req/s; "
                    f"other work meanwhile {v['cpu_s']['not_ours_s']:.1f} CPU-s")
    rows.append(f"  {'core (EngineClient, this process)':<34}{u['core_req_s']:>9.0f}{'':>8}"
                f"{u['core_latency']['p50_ms']:>9.1f}{u['core_latency']['p99_ms']:>9.1f}")
    rows.append(f"  {'direct engine, all at once':<34}{u['direct_all_at_once_req_s']:>9.0f}")
    rows.append(f"issue 14: gRPC {g['grpc_req_s']:.0f} req/s = {g['ratio']:.2f}x the {g['baseline_grpc_req_s']:.0f} "
                f"req/s before (target {g['ratio_target']:g}x: {'met' if g['rate_met'] else 'NOT met'}); "
                f"gRPC adds p50 {g['grpc_added_p50_ms']:.2f} ms (target <= {g['added_p50_target_ms']:g} ms: "
                f"{'met' if g['latency_met'] else 'NOT met'})")
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
    g, u = report["issue14"], report["sustained"]
    ax.set_title(f"gRPC: {g['grpc_req_s']:.0f} req/s = {g['ratio']:.2f}x the {g['baseline_grpc_req_s']:.0f} req/s "
                 f"before (target {g['ratio_target']:g}x), {u['concurrency']} clients in "
                 f"{u['grpc_client_processes']} process(es), {u['grpc_api_servers']} door(s), "
                 f"{report['device'].get('cores', '?')} cores\nadds p50 {g['grpc_added_p50_ms']:.2f} ms "
                 f"(target <= {g['added_p50_target_ms']:g} ms), p99 {report['sequential']['grpc_overhead']['p99_ms']:.2f}"
                 f" ms over the engine alone", fontsize=8)
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
    p.add_argument("--api-servers", type=int, nargs="+", default=[1],
                   help="front-door processes; several values: one gRPC run per value")
    p.add_argument("--client-processes", type=int, nargs="+", default=[1],
                   help="processes the sustained gRPC run's clients are spread over; several: one run each")
    p.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                   help="record py-spy samples (raw, all threads) of the core and doors during each gRPC run")
    p.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    args = p.parse_args(argv)
    if min(args.api_servers + args.client_processes) < 1:
        p.error("--api-servers and --client-processes must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(1)
    now = datetime.now(timezone.utc)
    device = {"type": "cpu", "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}
    report = report_header("router_overhead", __file__, argv, now, device)
    report.update({"model": MODEL, "mode": args.mode, "output_tokens": 1})
    report.update(measure(args))
    out = args.out or RESULTS_DIR / f"router_overhead_{args.mode}_{slug(device['cpu'])}_{now:%Y-%m-%d}.json"
    save_report(out, report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
