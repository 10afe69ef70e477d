"""Where serve_bench sends its requests: an engine in this process, or a server (HTTP, gRPC).

Every backend takes a list of `Request`s (prompt ids, output length, arrival time), send each
when its arrival time has passed, and return one `RequestRecord` per request (in order) plus
the run's duration, all on one clock that starts when the run starts:

- `OfflineBackend` drives an engine in this process in real time: between steps it adds every
  request whose arrival time has passed, then steps; the tokens a step returns are stamped with
  the time the step returned. A request that arrives during a step waits for that step, as it
  would in a server's queue, so its latency counts from its arrival time. The engine is an
  `LLMEngine` (``--engine llm``) or a `DisaggEngine` (``disagg``: prefill groups + decode
  groups; ``aggregated``: replicas that each run requests whole), built by `make_offline_backend`.
  With a time cap, requests not sent by then are never sent and those still running are
  aborted: both end with an error, so they count as missing their objectives.
- `HTTPBackend` streams ``POST /v1/completions`` from an OpenAI-compatible server with httpx,
  one asyncio task per request, and asks for ``return_token_ids`` so tokens are counted from
  their ids (models without a tokenizer stream no text).
- `GRPCBackend` streams ``Generate`` calls from splitserve's gRPC front door with its
  `AsyncClient`, one asyncio task per request.

For both servers latency counts from the moment the request is sent, and each event (SSE
event, gRPC chunk) is stamped when this process reads it; how late the client sent requests
relative to the schedule is reported as ``max_start_lag_s``. The client is one asyncio loop
on one core: serve_bench reports its CPU time per run, to tell a saturated client from a slow
server. `ServerProcess` starts and stops a server command for serve_bench's comparison mode.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from serve_metrics import RequestRecord
from serve_workloads import Request


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not progress)


# --- offline: an engine in this process ------------------------------------------------------

#: What ``--engine`` may name: one `LLMEngine`, or a `DisaggEngine` with or without prefill groups.
ENGINES = ("llm", "disagg", "aggregated")
#: After the time cap, how long aborted requests may take to be reported before the run fails.
DRAIN_TIMEOUT_S = 60.0
NOT_SENT = "not sent before the time cap"
CUT_OFF = "unfinished at the time cap"

EngineFactory = Callable[[Any], Any]


def llm_engine(config: Any) -> Any:
    from splitserve.workers.engine import LLMEngine

    return LLMEngine(config)


def disagg_config(engine: str, cfg: Any, num_prefill: int = 1, num_decode: int = 1) -> Any:
    """``disagg``: ``num_prefill`` prefill groups and ``num_decode`` decode groups of ``cfg``;
    ``aggregated``: ``num_decode`` replicas of ``cfg``. Groups take GPUs in order (prefill
    groups first), one per rank: 1 + 1 groups of one rank are cuda:0 -> cuda:1, two replicas
    cuda:0 and cuda:1. Every group runs its ranks as processes, so groups compute at once
    (a rank in the driver's process would run each forward inside the driver's step)."""
    from dataclasses import replace

    from splitserve.workers.disagg_engine import DisaggConfig

    if engine == "disagg":
        return DisaggConfig(prefill=cfg, decode=cfg, num_prefill=num_prefill, num_decode=num_decode,
                            in_process=False)
    if engine == "aggregated":
        return DisaggConfig(prefill=None, decode=replace(cfg, rank_processes=True), num_decode=num_decode,
                            in_process=False)
    raise ValueError(f"engine must be one of {ENGINES[1:]} here, got {engine!r}")


def disagg_engine_factory(policy: str = "least_loaded") -> EngineFactory:
    """Builds a `DisaggEngine` whose groups are chosen by a router policy (the engine's own
    default takes the first healthy group, which would send every request to one replica)."""
    def make(config: Any) -> Any:
        from splitserve.router.policies import make_policy
        from splitserve.workers.disagg_engine import DisaggEngine

        return DisaggEngine(config, policy=make_policy(policy, config.decode.cache.block_size))
    return make


def make_offline_backend(engine: str, cfg: Any, num_prefill: int = 1, num_decode: int = 1,
                         policy: str = "least_loaded") -> "OfflineBackend":
    """The offline backend over ``engine`` (one of `ENGINES`) built from the group config ``cfg``."""
    if engine == "llm":
        return OfflineBackend(cfg)
    return OfflineBackend(disagg_config(engine, cfg, num_prefill, num_decode), disagg_engine_factory(policy))


def _engine_summary(cfg: Any, engine: Any) -> dict[str, Any]:
    from splitserve.workers.engine import resolve_dtype

    return {"model": cfg.model, "device": str(engine.device),
            "dtype": str(resolve_dtype(cfg.dtype, engine.device)).removeprefix("torch."),
            "max_model_len": engine.max_model_len, "num_kv_blocks": engine.kv_usage().num_blocks,
            "block_size": cfg.cache.block_size, "enable_prefix_caching": cfg.cache.enable_prefix_caching,
            "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
            "max_num_seqs": cfg.scheduler.max_num_seqs, "tp": cfg.parallel.tensor_parallel_size,
            "pp": cfg.parallel.pipeline_parallel_size}


def _group_devices(cfg: Any, engine: Any) -> list[str]:
    """The devices of a group's ranks (see `splitserve.workers.executor.rank_device`)."""
    if engine.device.type != "cuda":
        return [str(engine.device)] * cfg.parallel.world_size
    first = (engine.device.index or 0) + cfg.device_offset
    return [f"cuda:{first + r}" for r in range(cfg.parallel.world_size)]


def greedy_params(output_len: int) -> Any:
    """What every backend asks for: greedy, exactly ``output_len`` tokens (EOS ignored)."""
    from splitserve.workers.sampling_params import SamplingParams

    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)


class OfflineBackend:
    """Drives an engine in this process; ``make_engine(config)`` builds it (default: an
    `LLMEngine`). Any engine with LLMEngine's request interface works: ``add_request(...,
    stream=True)``, ``step``, ``has_unfinished_requests``, ``abort_request``, ``validate``,
    ``model_cfg`` and ``shutdown`` (a `DisaggEngine`, see `make_offline_backend`)."""

    name = "offline"
    remote = False

    def __init__(self, config: Any, make_engine: EngineFactory | None = None):
        self.config = config
        self.engine = (make_engine or llm_engine)(config)
        self._ids = itertools.count()

    @property
    def is_disagg(self) -> bool:
        return hasattr(self.engine, "groups")

    @property
    def kind(self) -> str:
        if not self.is_disagg:
            return "llm"
        return "disagg" if self.engine.prefills else "aggregated"

    @property
    def device(self) -> Any:
        """The engine's device (a `DisaggEngine`: its first decode group's, without the offset)."""
        return self.engine.decode.device if self.is_disagg else self.engine.device

    @property
    def vocab_size(self) -> int:
        return self.engine.model_cfg.vocab_size

    @property
    def max_model_len(self) -> int:
        engines = [g.engine for g in self.engine.groups] if self.is_disagg else [self.engine]
        return min(e.max_model_len for e in engines)

    def describe(self) -> dict[str, Any]:
        if not self.is_disagg:
            return {"backend": self.name, "engine": "llm", **_engine_summary(self.config, self.engine)}
        groups = [{"name": g.name, "role": g.role, "devices": _group_devices(g.config, g.engine),
                   **_engine_summary(g.config, g.engine)} for g in self.engine.groups]
        return {"backend": self.name, "engine": self.kind, "model": self.config.decode.model,
                "device": str(self.device), "num_prefill": len(self.engine.prefills),
                "num_decode": len(self.engine.decodes), "policy": type(self.engine.policy).__name__,
                "groups": groups}

    def check(self, requests: list[Request]) -> None:
        """Refuse, before anything runs, a workload the engine would reject (too long, ...)."""
        check_fits(requests, None, self.vocab_size, "the engine's model")
        for i, r in enumerate(requests):
            try:
                self.engine.validate(r.prompt_ids, greedy_params(r.output_len))
            except ValueError as err:
                raise SystemExit(f"request {i} ({len(r.prompt_ids)} in, {r.output_len} out): {err}") from None

    def run(self, requests: list[Request], progress: bool = False, desc: str = "requests",
            time_cap_s: float | None = None) -> tuple[list[RequestRecord], float]:
        """Serve ``requests`` in real time; with ``time_cap_s``, stop sending and abort what is
        left once that many seconds have passed (those requests end with an error)."""
        engine, clock = self.engine, time.perf_counter
        cap = math.inf if time_cap_s is None else time_cap_s
        due = deque(sorted(range(len(requests)), key=lambda i: requests[i].arrival_s))
        records: list[RequestRecord | None] = [None] * len(requests)
        live: dict[str, RequestRecord] = {}
        with _bar(len(requests), desc, progress) as bar:
            t0 = clock()
            while due or engine.has_unfinished_requests():
                now = clock() - t0
                if now >= cap:
                    self._cut_off(requests, due, records, live)
                    if now >= cap + DRAIN_TIMEOUT_S:
                        raise RuntimeError(f"{len(live)} aborted requests still unreported "
                                           f"{DRAIN_TIMEOUT_S:.0f} s after the time cap")
                while due and requests[due[0]].arrival_s <= now:
                    i = due.popleft()
                    r = requests[i]
                    request_id = engine.add_request(f"bench-{next(self._ids)}", r.prompt_ids,
                                                    greedy_params(r.output_len), stream=True)
                    records[i] = live[request_id] = RequestRecord(
                        len(r.prompt_ids), r.output_len, r.arrival_s, start_s=r.arrival_s)
                if not engine.has_unfinished_requests():
                    if due:  # (empty once the time cap has passed and the aborts are done)
                        time.sleep(max(0.0, min(requests[due[0]].arrival_s, cap) - (clock() - t0)))
                    continue
                outputs = engine.step()
                t = clock() - t0
                for out in outputs:
                    self._record(live[out.request_id], out, t)
                    if out.finished:
                        del live[out.request_id]
                        bar.update(1)
            duration = clock() - t0
        return records, duration

    def _cut_off(self, requests: list[Request], due: deque[int], records: list[RequestRecord | None],
                 live: dict[str, RequestRecord]) -> None:
        """The time cap: what was not sent never is; what runs is aborted (once)."""
        while due:
            i = due.popleft()
            r = requests[i]
            records[i] = RequestRecord(len(r.prompt_ids), r.output_len, r.arrival_s, start_s=r.arrival_s,
                                       error=NOT_SENT)
        for request_id, rec in live.items():
            if rec.error is None:
                rec.error = CUT_OFF
                self.engine.abort_request(request_id)

    @staticmethod
    def _record(rec: RequestRecord, out: Any, t: float) -> None:
        if out.new_token_ids:
            rec.deliveries.append((t, len(out.new_token_ids)))
        if out.finished:
            rec.end_s = t
            if out.finish_reason == "abort":
                rec.error = rec.error or out.error or "aborted"

    def close(self) -> None:
        self.engine.shutdown()


# --- servers: what the http and grpc backends share ------------------------------------------


def check_fits(requests: list[Request], max_model_len: int | None, vocab_size: int | None, where: str) -> None:
    """Refuse, before anything is sent, a workload the server would reject: a request longer
    than its ``max_model_len`` or a prompt id outside its vocabulary (None: not known)."""
    for i, r in enumerate(requests):
        if max_model_len is not None and len(r.prompt_ids) + r.output_len > max_model_len:
            raise SystemExit(f"request {i} ({len(r.prompt_ids)} in, {r.output_len} out) is longer than the "
                             f"max_model_len {max_model_len} of {where}")
        if vocab_size is not None and r.prompt_ids and max(r.prompt_ids) >= vocab_size:
            raise SystemExit(f"request {i} has prompt id {max(r.prompt_ids)}, outside the vocabulary of "
                             f"{vocab_size} ids of {where} (see --vocab-size)")


# --- http: an OpenAI-compatible server -------------------------------------------------------

DONE = object()


def parse_sse_line(line: str) -> dict[str, Any] | object | None:
    """One line of an SSE stream: a JSON chunk, `DONE` for ``data: [DONE]``, or None for
    anything that is not a data line (blank separators, comments, ``event:`` lines)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return DONE
    return json.loads(payload) if payload else None


def chunk_tokens(chunk: dict[str, Any]) -> tuple[int, bool]:
    """Tokens a streamed chunk carries, and whether that count is exact.

    Exact when the choice (or its ``delta``) lists ``token_ids`` (splitserve with
    ``return_token_ids``: every choice has them, one engine step's new tokens, an empty list
    for a step that added none); otherwise a chunk with non-empty text counts as one token, an
    estimate the final usage count corrects (and a model without a tokenizer, whose text is
    empty, would show no tokens at all).
    """
    count, exact = 0, True
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        ids = choice.get("token_ids", delta.get("token_ids"))
        if ids is not None:
            count += len(ids)
        elif choice.get("text") or delta.get("content"):
            count, exact = count + 1, False
    return count, exact


class HTTPBackend:
    """Streams ``POST /v1/completions`` with ``return_token_ids``: splitserve's server then
    puts each engine step's token ids in its event (one choice per event), so tokens are
    counted exactly and per event, and models without a tokenizer (``random:``) can be
    measured. Servers that ignore the field are counted from their text (see `chunk_tokens`)."""

    name = "http"
    remote = True

    def __init__(self, url: str, model: str | None, vocab_size: int, timeout_s: float = 600.0,
                 server_device: str | None = None):
        self.url, self.model, self.timeout_s = url.rstrip("/"), model, timeout_s
        self.server_device = server_device
        self._vocab_size = vocab_size
        #: What GET /v1/models says (splitserve lists it), once `check` has asked.
        self.max_model_len: int | None = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "url": self.url, "model": self.model, "vocab_size": self._vocab_size,
                "max_model_len": self.max_model_len, "server_device": self.server_device,
                "timeout_s": self.timeout_s}

    def check(self, requests: list[Request]) -> None:
        if self.model is None or self.max_model_len is None:
            served = self._served_model()
            self.model = self.model if self.model is not None else served.get("id")
            self.max_model_len = served.get("max_model_len")
        check_fits(requests, self.max_model_len, None, self.url)

    def _served_model(self) -> dict[str, Any]:
        """The first model the server lists (``GET /v1/models``), or {} if it lists none."""
        import httpx

        try:
            models = httpx.get(f"{self.url}/v1/models", timeout=10).json().get("data") or []
        except (httpx.HTTPError, ValueError):
            return {}
        return models[0] if models else {}

    def payload(self, r: Request) -> dict[str, Any]:
        body = {"prompt": r.prompt_ids, "max_tokens": r.output_len, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        return {"model": self.model, **body} if self.model is not None else body

    def run(self, requests: list[Request], progress: bool = False, desc: str = "requests"
            ) -> tuple[list[RequestRecord], float]:
        return asyncio.run(self._run(requests, progress, desc))

    async def _run(self, requests: list[Request], progress: bool, desc: str) -> tuple[list[RequestRecord], float]:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, limits=limits) as client:
            with _bar(len(requests), desc, progress) as bar:
                t0 = time.perf_counter()
                records = await asyncio.gather(*(self._send(client, r, t0, bar) for r in requests))
                duration = time.perf_counter() - t0
        return list(records), duration

    async def _send(self, client: Any, r: Request, t0: float, bar: Any) -> RequestRecord:
        import httpx

        clock = lambda: time.perf_counter() - t0  # noqa: E731
        await asyncio.sleep(max(0.0, r.arrival_s - clock()))
        rec = RequestRecord(len(r.prompt_ids), r.output_len, r.arrival_s, start_s=clock())
        try:
            async with client.stream("POST", "/v1/completions", json=self.payload(r)) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    rec.error = f"HTTP {resp.status_code}: {body[:200]}"
                else:
                    await self._read_stream(resp, rec, clock)
        except (httpx.HTTPError, ValueError) as err:  # ValueError: a chunk that is not JSON
            rec.error = f"{type(err).__name__}: {err}"
        bar.update(1)
        return rec

    @staticmethod
    async def _read_stream(resp: Any, rec: RequestRecord, clock: Any) -> None:
        all_exact, usage_tokens = True, None
        async for line in resp.aiter_lines():
            chunk = parse_sse_line(line)
            if chunk is DONE:
                rec.end_s = clock()
                break
            if chunk is None:
                continue
            if "error" in chunk:
                rec.error = f"server error: {chunk['error']}"
                return
            count, exact = chunk_tokens(chunk)
            if count:
                rec.deliveries.append((clock(), count))
            all_exact = all_exact and exact
            usage = chunk.get("usage") or {}
            usage_tokens = usage.get("completion_tokens", usage_tokens)
        if rec.end_s is None:
            rec.error = "stream ended before data: [DONE]"
        elif not all_exact and usage_tokens is not None:
            rec.num_output_tokens = usage_tokens

    def close(self) -> None:
        pass


# --- grpc: splitserve's gRPC front door ------------------------------------------------------


class GRPCBackend:
    """Streams ``Generate`` calls through `splitserve.router.client.AsyncClient` (one channel
    per run, one asyncio task per request), token ids as prompts. Each ``Chunk`` message carries one
    engine step's new tokens and is stamped when it arrives, as the HTTP backend stamps its
    events; the ``Complete`` message ends the request. The model, its vocabulary and its
    ``max_model_len`` come from ``GetModelInfo``."""

    name = "grpc"
    remote = True

    def __init__(self, target: str, model: str | None = None, vocab_size: int | None = None,
                 timeout_s: float = 600.0, server_device: str | None = None):
        self.target, self.expected_model, self.timeout_s = target, model, timeout_s
        self.server_device = server_device
        self._vocab_size = vocab_size
        self._info: Any = None

    def info(self) -> Any:
        """The server's `ModelInfo` (asked once); SystemExit if no server answers."""
        if self._info is None:
            from splitserve.router.client import Client
            from splitserve.router.messages import RouterError

            try:
                with Client(self.target, timeout_s=30.0) as client:
                    self._info = client.model_info()
            except RouterError as err:
                raise SystemExit(f"gRPC server at {self.target}: {err}") from None
        return self._info

    @property
    def model(self) -> str:
        return self.info().model

    @property
    def vocab_size(self) -> int:
        """Prompt ids are drawn below this: ``vocab_size`` if given, else the served model's."""
        return self._vocab_size if self._vocab_size is not None else self.info().vocab_size

    def describe(self) -> dict[str, Any]:
        info = self.info()
        return {"backend": self.name, "target": self.target, "model": info.model, "mode": info.mode,
                "groups": {role: dict(zip(("count", "tp", "pp"), g)) for role, g in info.groups.items()},
                "vocab_size": self.vocab_size, "max_model_len": info.max_model_len,
                "server_device": self.server_device, "timeout_s": self.timeout_s}

    def check(self, requests: list[Request]) -> None:
        info = self.info()
        if self.expected_model is not None and info.model != self.expected_model:
            raise SystemExit(f"the gRPC server at {self.target} serves {info.model!r}, not {self.expected_model!r}")
        check_fits(requests, info.max_model_len, info.vocab_size, self.target)

    def run(self, requests: list[Request], progress: bool = False, desc: str = "requests"
            ) -> tuple[list[RequestRecord], float]:
        return asyncio.run(self._run(requests, progress, desc))

    async def _run(self, requests: list[Request], progress: bool, desc: str) -> tuple[list[RequestRecord], float]:
        from splitserve.router.client import AsyncClient

        # The channel belongs to this run's event loop (each run is its own asyncio.run).
        async with AsyncClient(self.target, timeout_s=self.timeout_s) as client:
            with _bar(len(requests), desc, progress) as bar:
                t0 = time.perf_counter()
                records = await asyncio.gather(*(self._send(client, r, t0, bar) for r in requests))
                duration = time.perf_counter() - t0
        return list(records), duration

    @staticmethod
    async def _send(client: Any, r: Request, t0: float, bar: Any) -> RequestRecord:
        from contextlib import aclosing

        from splitserve.router.messages import RouterError

        clock = lambda: time.perf_counter() - t0  # noqa: E731
        await asyncio.sleep(max(0.0, r.arrival_s - clock()))
        rec = RequestRecord(len(r.prompt_ids), r.output_len, r.arrival_s, start_s=clock())
        try:
            async with aclosing(client.stream(r.prompt_ids, greedy_params(r.output_len))) as chunks:
                async for chunk in chunks:
                    t = clock()
                    if chunk.token_ids:
                        rec.deliveries.append((t, len(chunk.token_ids)))
                    if chunk.finished:
                        rec.end_s = t
                        if chunk.finish_reason == "abort":
                            rec.error = "aborted by the server"
            if rec.end_s is None:
                rec.error = "stream ended before its Complete message"
        except RouterError as err:
            rec.error = f"{err.code.value}: {err.message}"
        bar.update(1)
        return rec

    def close(self) -> None:
        pass


# --- a server this process starts (serve_bench --server-cmd) -----------------------------------


class ServerProcess:
    """A server command (e.g. ``splitserve serve ...``) run as a child in its own process
    group, its output in ``log_path``. `wait_ready` polls its front doors until they answer;
    `stop` sends SIGTERM (splitserve serve then shuts its groups and Ray down), then kills
    the group if it has not exited after ``grace_s``."""

    def __init__(self, command: str, log_path: Any):
        import shlex
        import subprocess
        from pathlib import Path

        self.command, self.log_path = command, Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(shlex.split(command), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, url: str | None, target: str | None, timeout_s: float) -> float:
        """Seconds until every given front door answers ready; SystemExit if the process exits
        or ``timeout_s`` passes first."""
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server command exited with {self.proc.returncode} before it was ready; "
                                 f"the end of {self.log_path}:\n{self.log_tail()}")
            if server_ready(url, target):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise SystemExit(f"the server was not ready after {timeout_s:g} s; the end of {self.log_path}:\n"
                                 f"{self.log_tail()}")
            time.sleep(1.0)

    def stop(self, grace_s: float = 60.0) -> int | None:
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def server_ready(url: str | None, target: str | None) -> bool:
    """Whether the HTTP front door answers ``GET /health`` with 200 and the gRPC one says ready
    (each only if given)."""
    if url is not None:
        import httpx

        try:
            if httpx.get(f"{url.rstrip('/')}/health", timeout=5).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    if target is not None:
        from splitserve.router.client import Client
        from splitserve.router.messages import RouterError

        try:
            with Client(target, timeout_s=5.0) as client:
                return client.health().ready
        except RouterError:
            return False
    return True
