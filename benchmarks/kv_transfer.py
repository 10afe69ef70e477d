"""KV transfer: the cache-transmission service vs one raw torch.distributed send/recv.

Two processes on one host, a sender (prefill rank 0) and a receiver (decode rank 0), each
with a KV cache shaped like the engine's, ``[layers, 2, blocks, block_size, kv_heads,
head_dim]``. For each prompt length, in the same run and the same processes:

    service   the receiver posts a `RecvCommand` into shuffled, non-contiguous destination
              blocks (as decode does when it reserves), then the sender's `layer_hook` is
              called for every layer in order (as the forward would, with no model compute
              here: pure transfer: pack, send per layer group, receive into staging, unpack)
    raw       one ``send``/``recv`` of a contiguous tensor of exactly the same number of bytes
              on a pairwise process group of the same backend over the same TCPStore

Gloo on CPU tensors, NCCL on GPU tensors (sender cuda:0, receiver cuda:1). Service and raw
transfers alternate (one warm-up of each, then ``--repeats`` of each) so that noise on a
shared machine hits both alike. A transfer is timed from just before the sender starts
(after a barrier; the receive is already posted) to the moment the receiver holds the data
(the service's recv event, after the unpack; the raw recv's completion), both on the host's
CLOCK_MONOTONIC, which the two processes share. The service's first transfer of each prompt
length is checked: the receiver's destination blocks equal the sender's source blocks
(SHA-256 of both, exchanged through the store).

Prints GB/s (1e9 bytes/s, median of the repeats) of each and the ratio service/raw per
prompt length (target: >= 0.8 at 2k-token prompts), writes JSON and a PNG beside it.

``--profile`` adds one more service transfer per prompt length under `torch.profiler` in both
processes (after the timed ones, so it costs them nothing): a Chrome trace per side beside the
JSON, and in the JSON each side's timeline of the steps that matter (pack, send, receive,
unpack: host calls and device kernels, in microseconds from the side's first event), which
shows where a transfer's time goes (host issue, the wire, or the writes):

    python benchmarks/kv_transfer.py                                    # CPU, gloo, float32
    python benchmarks/kv_transfer.py --prompt-tokens 2048 16384 --device cuda   # 2 GPUs, NCCL, bf16
    python benchmarks/kv_transfer.py --model smollm2-135m --prompt-tokens 64 --repeats 2   # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import os
import platform
import queue
import random
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
import results_meta  # noqa: E402
from results_meta import BENCH_DIR, REPO_ROOT, RESULTS_DIR, git_commit, slug  # noqa: E402,F401
from results_meta import cpu_model  # noqa: E402

#: The service must reach this fraction of the raw send/recv figure ...
TARGET_RATIO = 0.8
#: ... at this prompt length.
TARGET_PROMPT_TOKENS = 2048

#: (num_layers, num_kv_heads, head_dim) of the named shapes (as in workers/model_source.py).
MODEL_SHAPES = {"llama-3-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}

DTYPES = ("float32", "bfloat16", "float16")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Shape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Case:
    """One prompt length: the blocks it fills on each side (shuffled, not contiguous)."""

    prompt_tokens: int
    num_blocks: int
    src_block_ids: list[int]
    dst_block_ids: list[int]


@dataclass(frozen=True)
class WorkerArgs:
    """Everything one process needs (picklable: it crosses the spawn)."""

    role: str  # "prefill" (sender) or "decode" (receiver)
    device: str  # "cpu" or "cuda:<i>"
    backend: str  # "gloo" or "nccl"
    dtype: str
    shape: Shape
    block_size: int
    cache_blocks: int
    cases: list[Case]
    layers_per_message: int
    repeats: int
    timeout_s: float
    store_port: int
    num_threads: int | None
    seed: int
    #: Where the profiled transfer's Chrome traces go (None: no profiled transfer).
    profile_dir: str | None = None


# --- setup (parent) ----------------------------------------------------------------------


def model_shape(name: str) -> Shape:
    if name in MODEL_SHAPES:
        return Shape(name, *MODEL_SHAPES[name])
    try:  # any other named shape of splitserve's random models (imports transformers)
        from splitserve.workers.model_source import random_config

        cfg = random_config(name)
    except ValueError as err:
        raise SystemExit(f"--model {name!r}: {err}") from None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Shape(name, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)


def element_size(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def kv_bytes(shape: Shape, num_blocks: int, block_size: int, dtype: str) -> int:
    """Bytes of ``num_blocks`` blocks of every layer, K and V, every KV head."""
    return shape.num_layers * 2 * num_blocks * block_size * shape.num_kv_heads * shape.head_dim * element_size(dtype)


def make_cases(prompt_tokens: list[int], block_size: int, cache_blocks: int, seed: int) -> list[Case]:
    """Seeded, shuffled block ids drawn from the whole cache, independently on each side."""
    rng = random.Random(seed)
    cases = []
    for tokens in prompt_tokens:
        n = math.ceil(tokens / block_size)
        cases.append(Case(tokens, n, rng.sample(range(cache_blocks), n), rng.sample(range(cache_blocks), n)))
    return cases


def default_cache_blocks(prompt_tokens: list[int], block_size: int) -> int:
    """Room for the longest prompt and half as much again, so the block ids are scattered."""
    return math.ceil(1.5 * math.ceil(max(prompt_tokens) / block_size)) + 1


# --- the two processes -------------------------------------------------------------------


class _Sync:
    """Barriers and small values between the two processes, through the TCPStore."""

    def __init__(self, store: Any, rank: int, timeout: timedelta):
        self.store, self.rank, self.timeout = store, rank, timeout

    def barrier(self, name: str) -> None:
        self.store.set(f"bar/{name}/{self.rank}", b"1")
        self.store.wait([f"bar/{name}/{1 - self.rank}"], self.timeout)

    def put(self, key: str, value: str) -> None:
        self.store.set(f"val/{key}", value.encode())

    def get(self, key: str) -> str:
        self.store.wait([f"val/{key}"], self.timeout)
        return self.store.get(f"val/{key}").decode()


def _digest(tensor: Any) -> str:
    import torch

    data = tensor.detach().contiguous().view(torch.uint8).cpu().numpy()
    return hashlib.sha256(data).hexdigest()


def _wait_event(reports: queue.Queue, transfer_id: int, side: str, timeout_s: float) -> Any:
    """The agent's report on this transfer; raises if it failed or never came."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            event = reports.get(timeout=max(0.001, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"no {side} report for transfer {transfer_id} within {timeout_s:.1f} s") from None
        if event.transfer_id == transfer_id and event.side == side:
            if not event.ok:
                raise RuntimeError(f"{side} of transfer {transfer_id} failed: {event.error}")
            return event


#: Profiler events worth a line in the timeline: the pack and unpack copies, the NCCL or gloo
#: calls and kernels, the agent's stream waits and copies to the device.
TIMELINE_EVENTS = re.compile(r"kv_bench|index_select|index_copy|nccl|Nccl|gloo|SendRecv|c10d|record_param_comms|"
                             r"cudaStreamWaitEvent|cudaEventQuery|Memcpy", re.IGNORECASE)
#: At most this many lines per side (a 16k transfer has a few dozen messages).
TIMELINE_MAX = 400


def timeline(prof: Any) -> list[dict[str, Any]]:
    """The profiled transfer's events of interest, in start order, times in us from the first
    event of the profile (host calls and device kernels share the profiler's clock)."""
    events = list(prof.events())
    if not events:
        return []
    origin = min(e.time_range.start for e in events)
    picked = sorted((e for e in events if TIMELINE_EVENTS.search(e.name)), key=lambda e: e.time_range.start)
    return [{"name": e.name[:80], "on": str(e.device_type).rsplit(".", 1)[-1].lower(),
             "start_us": round(e.time_range.start - origin, 1),
             "dur_us": round(e.time_range.end - e.time_range.start, 1)} for e in picked[:TIMELINE_MAX]]


def profiled(device: Any):
    """A profiler of host calls on every thread (the agent posts, waits and unpacks on threads
    of its own), and of kernels on CUDA."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        config = _ExperimentalConfig(profile_all_threads=True)
    except TypeError:  # an older torch: the calling thread's host calls only
        config = None
    return profile(activities=activities, experimental_config=config)


def run_worker(w: WorkerArgs) -> dict[str, Any]:
    """One side of the benchmark; the receiver returns the timings, the sender its events."""
    import torch
    import torch.distributed as dist
    from splitserve.kvtransfer.agent import KVAgentSpec, KVTransferAgent
    from splitserve.kvtransfer.messages import RecvCommand, SendCommand
    from splitserve.kvtransfer.plan import make_routes
    from splitserve.kvtransfer.transport import wait_until
    from splitserve.mapping import Mapping
    from torch.profiler import record_function

    if w.num_threads is not None:
        torch.set_num_threads(w.num_threads)
    device = torch.device(w.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def settle() -> None:  # GPU work is asynchronous: the data is there only after this
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sender = w.role == "prefill"
    rank = 0 if sender else 1
    timeout = timedelta(seconds=w.timeout_s)
    dtype = getattr(torch, w.dtype)
    shape = w.shape
    store = dist.TCPStore(HOST, w.store_port, None, False, timeout)
    sync = _Sync(store, rank, timeout)

    cache = torch.zeros(shape.num_layers, 2, w.cache_blocks, w.block_size, shape.num_kv_heads, shape.head_dim,
                        dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(w.seed + rank)
    if sender:
        cache.normal_(generator=gen)
    max_bytes = max(kv_bytes(shape, c.num_blocks, w.block_size, w.dtype) for c in w.cases)
    raw_buf = torch.empty(max_bytes // element_size(w.dtype), dtype=dtype, device=device)
    raw_buf.normal_(generator=gen)  # real pages with real data on both sides (no zero-page reads)

    reports: queue.Queue = queue.Queue()
    # a stuck link fails this run within --timeout-s, not the service's long backstop
    spec = KVAgentSpec(w.role, w.backend, "", HOST, w.store_port, link_timeout_s=w.timeout_s)
    agent = KVTransferAgent(spec, 0, cache, 0, 0, reports.put)
    routes = make_routes(Mapping(1, 0), Mapping(1, 0), shape.num_layers, shape.num_kv_heads)
    agent.connect(routes)
    if w.backend == "nccl":
        raw_pg = dist.ProcessGroupNCCL(dist.PrefixStore("raw", store), rank, 2, dist.ProcessGroupNCCL.Options())
    else:
        raw_pg = dist.ProcessGroupGloo(dist.PrefixStore("raw", store), rank, 2, timeout)
    settle()

    transfer_ids = itertools.count(1)

    def service(case: Case, name: str, check: bool) -> dict[str, Any]:
        tid = next(transfer_ids)
        if sender:
            hook = agent.layer_hook([SendCommand(tid, case.src_block_ids, routes, w.layers_per_message)])
            sync.barrier(name)
            t0 = time.monotonic()
            with record_function("kv_bench:layer_hooks"):  # a mark in a profiled transfer's timeline
                for layer in range(shape.num_layers):
                    hook(layer)
            event = _wait_event(reports, tid, "send", w.timeout_s)
            settle()
            sync.put(f"{name}/t0", repr(t0))
            if check:
                src = torch.tensor(case.src_block_ids, device=device)
                sync.put(f"{name}/digest", _digest(cache.index_select(2, src)))
            return {"num_bytes": event.num_bytes}
        dst = torch.tensor(case.dst_block_ids, device=device)
        if check:  # whatever an earlier transfer left there must not pass for this one's data
            cache.index_fill_(2, dst, 0)
            settle()
        # posted before the sender starts, as decode posts its receive when it reserves (long
        # before prefill sends): the agent posts on its own thread, so wait until it has
        posted = agent.post_recv([RecvCommand(tid, case.dst_block_ids, routes, w.layers_per_message)])
        if not posted.wait(w.timeout_s):
            raise TimeoutError(f"{name}: the receives were not posted within {w.timeout_s:g} s")
        with record_function("kv_bench:barrier"):  # ends as the sender starts
            sync.barrier(name)
        event = _wait_event(reports, tid, "recv", w.timeout_s)
        settle()
        t1 = time.monotonic()
        out = {"seconds": t1 - float(sync.get(f"{name}/t0")), "num_bytes": event.num_bytes}
        if check:
            out["verified"] = _digest(cache.index_select(2, dst)) == sync.get(f"{name}/digest")
        return out

    def raw(case: Case, name: str, post_first: bool) -> dict[str, Any]:
        buf = raw_buf[: kv_bytes(shape, case.num_blocks, w.block_size, w.dtype) // element_size(w.dtype)]
        if sender:
            sync.barrier(name)
            t0 = time.monotonic()
            raw_pg.send([buf], 1, 0).wait(timeout)
            settle()
            sync.put(f"{name}/t0", repr(t0))
            return {}
        # The warm-up posts after the barrier: NCCL's lazy communicator set-up blocks the
        # first call until the peer makes its own, and the peer is at the barrier.
        work = raw_pg.recv([buf], 0, 0) if post_first else None
        sync.barrier(name)
        if work is None:
            work = raw_pg.recv([buf], 0, 0)
        if device.type == "cuda":
            # Polled, not work.wait(timeout): torch's timed wait checks each millisecond, which
            # would add up to 1 ms to a 1 ms transfer and flatter the service's ratio.
            wait_until(work.is_completed, timeout, "raw receive", spin_s=timeout.total_seconds())
            work.wait()
        else:
            work.wait(timeout)  # gloo's work completes inside wait: nothing to poll
        settle()
        t1 = time.monotonic()
        return {"seconds": t1 - float(sync.get(f"{name}/t0"))}

    results = []
    for case in w.cases:
        key = f"p{case.prompt_tokens}"
        first = service(case, f"{key}/service/warmup", check=True)
        raw(case, f"{key}/raw/warmup", post_first=False)
        service_runs, raw_runs = [], []
        for r in range(w.repeats):  # alternate, so that a noisy moment hits both alike
            service_runs.append(service(case, f"{key}/service/{r}", check=False))
            raw_runs.append(raw(case, f"{key}/raw/{r}", post_first=True))
        row = {"prompt_tokens": case.prompt_tokens, "first": first, "service": service_runs, "raw": raw_runs}
        if w.profile_dir is not None:  # after the timed transfers: the profiler costs them nothing
            with profiled(device) as prof:
                row["profiled"] = service(case, f"{key}/service/profiled", check=False)
            prof.export_chrome_trace(str(Path(w.profile_dir) / f"{w.role}-p{case.prompt_tokens}.trace.json"))
            row["timeline"] = timeline(prof)
        results.append(row)
    sync.barrier("done")
    agent.close()
    return {"role": w.role, "results": results}


def _worker(w: WorkerArgs, out: Any) -> None:
    """Process entry: run, report (result or traceback) to the parent, and leave at once."""
    import faulthandler

    # A side stuck past most of its deadline prints every thread's stack: the peer's error
    # alone (a barrier timeout) does not say where this side waits.
    faulthandler.dump_traceback_later(max(1.0, 0.8 * w.timeout_s), exit=False)
    try:
        out.put(("ok", w.role, run_worker(w)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put(("error", w.role, traceback.format_exc()))
    finally:
        out.close()
        out.join_thread()
        # No interpreter teardown: process-group destructors must not be able to hang the run.
        os._exit(0)


def run_processes(worker_args: list[WorkerArgs], run_timeout_s: float) -> dict[str, dict[str, Any]]:
    """Start both sides, collect their reports, and never wait past ``run_timeout_s``."""
    import multiprocessing

    _make_importable()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = {w.role: ctx.Process(target=_worker, args=(w, out), name=f"kv-bench-{w.role}", daemon=True)
             for w in worker_args}
    deadline = time.monotonic() + run_timeout_s
    reports: dict[str, dict[str, Any]] = {}
    finished = False
    try:
        for p in procs.values():
            p.start()
        while len(reports) < len(procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run took longer than {run_timeout_s:.0f} s (--run-timeout-s); "
                                   f"stopped the processes")
            try:
                status, role, payload = out.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in procs.items() if r not in reports and p.exitcode is not None]
                if dead:
                    time.sleep(0.5)  # a report may still be in the pipe
                    if out.empty():
                        raise RuntimeError(f"{', '.join(dead)} process died (exit code "
                                           f"{procs[dead[0]].exitcode}) without a report")
                continue
            if status == "error":
                raise RuntimeError(f"the {role} process failed:\n{payload}")
            reports[role] = payload
        finished = True
    finally:
        for p in procs.values():  # after a failure the other side would only wait for its deadline
            if finished:
                p.join(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        out.close()
    return reports


def _make_importable() -> None:
    """Spawned children import this file by module name; make sure they can find it."""
    if __name__ == "__main__":
        return  # spawn runs the main script itself in the child
    if __name__ != Path(__file__).stem:
        raise RuntimeError(f"load this file as module {Path(__file__).stem!r} (spawned processes import "
                           f"it by that name), not {__name__!r}")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))


# --- report ------------------------------------------------------------------------------


def summarize(case: Case, nbytes: int, recv: dict[str, Any], send: dict[str, Any]) -> dict[str, Any]:
    row = _summary(case, nbytes, recv, send)
    if "timeline" in recv:
        row["profiled"] = {"seconds": round(recv["profiled"]["seconds"], 6),
                           "sender_timeline": send["timeline"], "receiver_timeline": recv["timeline"]}
    return row


def _summary(case: Case, nbytes: int, recv: dict[str, Any], send: dict[str, Any]) -> dict[str, Any]:
    service_s = [r["seconds"] for r in recv["service"]]
    raw_s = [r["seconds"] for r in recv["raw"]]
    moved = {r["num_bytes"] for r in recv["service"]} | {recv["first"]["num_bytes"]}
    sent = {r["num_bytes"] for r in send["service"]} | {send["first"]["num_bytes"]}
    service_gbps = nbytes / statistics.median(service_s) / 1e9
    raw_gbps = nbytes / statistics.median(raw_s) / 1e9
    ratio = service_gbps / raw_gbps
    return {
        "prompt_tokens": case.prompt_tokens,
        "num_blocks": case.num_blocks,
        "num_bytes": nbytes,
        "service_bytes_match": moved == {nbytes} and sent == {nbytes},
        "verified": bool(recv["first"]["verified"]),
        "service_gb_per_s": round(service_gbps, 4),
        "raw_gb_per_s": round(raw_gbps, 4),
        "ratio": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
        "service_best_gb_per_s": round(nbytes / min(service_s) / 1e9, 4),
        "raw_best_gb_per_s": round(nbytes / min(raw_s) / 1e9, 4),
        "service_seconds": [round(s, 6) for s in service_s],
        "raw_seconds": [round(s, 6) for s in raw_s],
        "src_block_ids_head": case.src_block_ids[:8],
        "dst_block_ids_head": case.dst_block_ids[:8],
    }


def device_info(device: str, backend: str, num_threads: int | None) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    info: dict[str, Any] = {"type": device, "backend": backend, "torch_version": torch.__version__,
                            "python_version": platform.python_version(), "platform": platform.platform(),
                            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                            "num_threads_per_process": num_threads, "gloo_available": dist.is_gloo_available()}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in (0, 1)]
        info["cuda_version"] = torch.version.cuda
        try:
            info["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - informational only
            info["nccl_version"] = None
    return info


def default_out_path(device: dict[str, Any], now: datetime) -> Path:
    if device["type"] == "cuda":
        name = re.sub(r"^nvidia-", "", slug(device["gpus"][0])) or "gpu"
    else:
        name = slug(device["cpu_model"]) or "cpu"
    return results_meta.default_out_path("kv_transfer", name, now)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    rows = report["results"]
    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4))
    service = ax.bar([i - width / 2 for i in x], [r["service_gb_per_s"] for r in rows], width,
                     label="service (KVTransferAgent)", color="tab:blue")
    raw = ax.bar([i + width / 2 for i in x], [r["raw_gb_per_s"] for r in rows], width,
                 label=f"raw {report['device']['backend']} send/recv", color="tab:gray")
    ax.bar_label(service, labels=[f"{r['service_gb_per_s']:.2f}\n{r['ratio']:.2f}x" for r in rows], fontsize=8)
    ax.bar_label(raw, fmt="%.2f", fontsize=8)
    top = max(max(r["service_gb_per_s"], r["raw_gb_per_s"]) for r in rows)
    ax.set_ylim(0, 1.35 * top if top > 0 else 1)
    ax.set_xticks(list(x), [f"{r['prompt_tokens']} tok\n{r['num_bytes'] / 1e6:.0f} MB" for r in rows])
    ax.set_ylabel("GB/s (median)")
    p = report["parameters"]
    ax.set_title(f"KV transfer, {p['model']} {p['dtype']} on {report['device']['type']} "
                 f"({report['device']['backend']})\nblue labels: GB/s, service/raw (target {TARGET_RATIO} "
                 f"at {TARGET_PROMPT_TOKENS} tokens)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'prompt tok':>10}{'MB':>10}{'service GB/s':>14}{'raw GB/s':>10}{'ratio':>8}  target {TARGET_RATIO}"]
    for r in report["results"]:
        ok = "met" if r["target_met"] else "NOT met"
        check = "" if r["verified"] and r["service_bytes_match"] else "  DATA CHECK FAILED"
        rows.append(f"{r['prompt_tokens']:>10}{r['num_bytes'] / 1e6:>10.1f}{r['service_gb_per_s']:>14.3f}"
                    f"{r['raw_gb_per_s']:>10.3f}{r['ratio']:>8.2f}  {ok}{check}")
    t = report["target"]
    if t["ratio"] is None:
        rows.append(f"target: not measured ({TARGET_PROMPT_TOKENS}-token prompts were not in this run)")
    else:
        rows.append(f"target at {TARGET_PROMPT_TOKENS} tokens: {t['ratio']:.2f} >= {TARGET_RATIO}: "
                    f"{'met' if t['met'] else 'NOT met'}")
    rows.append(f"destination blocks == source blocks: {'yes' if report['all_verified'] else 'NO'}")
    return "\n".join(rows)


# --- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b",
                   help=f"KV shape by name: {', '.join(MODEL_SHAPES)} (or another of splitserve's "
                        "random model names); default llama-3-8b")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[TARGET_PROMPT_TOKENS],
                   help=f"prompt lengths to move, one or more (default {TARGET_PROMPT_TOKENS})")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--layers-per-message", type=int, default=4, help="layers per streamed message (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed transfers of each kind, after one warm-up (default 5)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo; cuda: NCCL, sender cuda:0, receiver cuda:1 (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--cache-blocks", type=int, default=None,
                   help="blocks in each side's cache (default 1.5x the longest prompt's, so ids scatter)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch threads per process (default on cpu: half the cores, the two processes "
                        "share them; on cuda: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="block ids and cache contents (default 0)")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="deadline of every wait inside the processes (default 60)")
    p.add_argument("--run-timeout-s", type=float, default=900.0,
                   help="the whole run; past it both processes are killed (default 900)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (a PNG goes beside it); default benchmarks/results/kv_transfer_<device>_<date>.json")
    p.add_argument("--profile", action="store_true",
                   help="one more service transfer per prompt length under torch.profiler: each side's "
                        "Chrome trace beside the JSON, and their timelines in it")
    args = p.parse_args(argv)
    for name in ("block_size", "layers_per_message", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.prompt_tokens) < 1:
        p.error("--prompt-tokens must be at least 1")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    need = math.ceil(max(args.prompt_tokens) / args.block_size)
    if args.cache_blocks is not None and args.cache_blocks < need:
        p.error(f"--cache-blocks {args.cache_blocks} cannot hold a {max(args.prompt_tokens)}-token prompt "
                f"({need} blocks of {args.block_size})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, write JSON and PNG, and return the report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    now = datetime.now(timezone.utc)

    import torch
    import torch.distributed as dist

    if args.device == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < 2:
            raise SystemExit(f"--device cuda needs 2 GPUs (sender on cuda:0, receiver on cuda:1; NCCL refuses "
                             f"two ranks on one device), found {count}")
        backend = "nccl"
    else:
        if not dist.is_gloo_available():
            raise SystemExit("this torch build has no gloo backend")
        backend = "gloo"
    num_threads = args.num_threads
    if num_threads is None and args.device == "cpu":
        num_threads = max(1, (os.cpu_count() or 2) // 2)

    shape = model_shape(args.model)
    cache_blocks = args.cache_blocks or default_cache_blocks(args.prompt_tokens, args.block_size)
    cases = make_cases(args.prompt_tokens, args.block_size, cache_blocks, args.seed)

    device = device_info(args.device, backend, num_threads)
    out_path = args.out or default_out_path(device, now)
    profile_dir = None
    if args.profile:
        profile_dir = out_path.with_name(out_path.stem + "-traces")
        profile_dir.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore(HOST, 0, None, True, timedelta(seconds=args.timeout_s), wait_for_workers=False)
    common = dict(backend=backend, dtype=args.dtype, shape=shape, block_size=args.block_size,
                  cache_blocks=cache_blocks, cases=cases, layers_per_message=args.layers_per_message,
                  repeats=args.repeats, timeout_s=args.timeout_s, store_port=store.port,
                  num_threads=num_threads, seed=args.seed,
                  profile_dir=None if profile_dir is None else str(profile_dir))
    devices = ("cuda:0", "cuda:1") if args.device == "cuda" else ("cpu", "cpu")
    started = time.monotonic()
    reports = run_processes([WorkerArgs(role="prefill", device=devices[0], **common),
                             WorkerArgs(role="decode", device=devices[1], **common)], args.run_timeout_s)
    wall_s = time.monotonic() - started
    del store

    results = [summarize(case, kv_bytes(shape, case.num_blocks, args.block_size, args.dtype), recv, send)
               for case, recv, send in zip(cases, reports["decode"]["results"], reports["prefill"]["results"])]
    at_target = next((r for r in results if r["prompt_tokens"] == TARGET_PROMPT_TOKENS), None)
    report = {
        **results_meta.report_header("kv_transfer", __file__, argv, now, device),
        "parameters": {"model": shape.name, "num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads,
                       "head_dim": shape.head_dim, "dtype": args.dtype, "block_size": args.block_size,
                       "layers_per_message": args.layers_per_message, "repeats": args.repeats,
                       "warmup": 1, "cache_blocks": cache_blocks, "seed": args.seed, "timeout_s": args.timeout_s,
                       "prompt_tokens": args.prompt_tokens,
                       "bytes_per_token": kv_bytes(shape, 1, 1, args.dtype),
                       "layout": "prefill tp1 pp1 -> decode tp1 pp1",
                       "timing": "sender's start (after a barrier, receive already posted) to the receiver "
                                 "holding the data; host CLOCK_MONOTONIC; GB = 1e9 bytes; median of repeats"},
        "results": results,
        "target": {"ratio_required": TARGET_RATIO, "prompt_tokens": TARGET_PROMPT_TOKENS,
                   "ratio": at_target["ratio"] if at_target else None,
                   "met": at_target["target_met"] if at_target else None},
        "all_verified": all(r["verified"] and r["service_bytes_match"] for r in results),
        "wall_seconds": round(wall_s, 2),
    }

    if profile_dir is not None:
        report["traces"] = str(profile_dir)
    results_meta.save_report(out_path, report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
