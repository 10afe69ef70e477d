"""Where serve_bench sends its requests: an engine in this process, or an HTTP server.

Both backends take a list of `Request`s (prompt ids, output length, arrival time), send each
when its arrival time has passed, and return one `RequestRecord` per request (in order) plus
the run's duration, all on one clock that starts when the run starts:

- `OfflineBackend` drives an `LLMEngine` in real time: between steps it adds every request
  whose arrival time has passed, then steps; the tokens a step returns are stamped with the
  time the step returned. A request that arrives during a step waits for that step, as it would
  in a server's queue, so its latency counts from its arrival time.
- `HTTPBackend` streams ``POST /v1/completions`` from an OpenAI-compatible server with httpx,
  one asyncio task per request. Latency counts from the moment the request is sent; how late
  the client sent requests relative to the schedule is reported as ``max_start_lag_s``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from typing import Any

from serve_metrics import RequestRecord
from serve_workloads import Request


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not progress)


# --- offline: an engine in this process ------------------------------------------------------


class OfflineBackend:
    name = "offline"

    def __init__(self, config: Any):
        from splitserve.workers.engine import LLMEngine

        self.config = config
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def vocab_size(self) -> int:
        return self.engine.model_cfg.vocab_size

    def describe(self) -> dict[str, Any]:
        from splitserve.workers.engine import resolve_dtype

        c, e = self.config, self.engine
        return {"backend": self.name, "model": c.model, "device": str(e.device),
                "dtype": str(resolve_dtype(c.dtype, e.device)).removeprefix("torch."),
                "max_model_len": e.max_model_len, "num_kv_blocks": e.block_manager.num_blocks,
                "block_size": c.cache.block_size, "enable_prefix_caching": c.cache.enable_prefix_caching,
                "max_num_batched_tokens": c.scheduler.max_num_batched_tokens,
                "max_num_seqs": c.scheduler.max_num_seqs, "tp": c.parallel.tensor_parallel_size,
                "pp": c.parallel.pipeline_parallel_size}

    @staticmethod
    def params(output_len: int) -> Any:
        from splitserve.workers.sampling_params import SamplingParams

        return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def check(self, requests: list[Request]) -> None:
        """Refuse, before anything runs, a workload the engine would reject (too long, ...)."""
        for i, r in enumerate(requests):
            try:
                self.engine.validate(r.prompt_ids, self.params(r.output_len))
            except ValueError as err:
                raise SystemExit(f"request {i} ({len(r.prompt_ids)} in, {r.output_len} out): {err}") from None

    def run(self, requests: list[Request], progress: bool = False, desc: str = "requests"
            ) -> tuple[list[RequestRecord], float]:
        engine, clock = self.engine, time.perf_counter
        due = deque(sorted(range(len(requests)), key=lambda i: requests[i].arrival_s))
        records: list[RequestRecord | None] = [None] * len(requests)
        by_id: dict[str, RequestRecord] = {}
        with _bar(len(requests), desc, progress) as bar:
            t0 = clock()
            while due or engine.has_unfinished_requests():
                now = clock() - t0
                while due and requests[due[0]].arrival_s <= now:
                    i = due.popleft()
                    r = requests[i]
                    request_id = engine.add_request(f"bench-{next(self._ids)}", r.prompt_ids,
                                                    self.params(r.output_len), stream=True)
                    records[i] = by_id[request_id] = RequestRecord(
                        len(r.prompt_ids), r.output_len, r.arrival_s, start_s=r.arrival_s)
                if not engine.has_unfinished_requests():
                    time.sleep(max(0.0, requests[due[0]].arrival_s - (clock() - t0)))
                    continue
                outputs = engine.step()
                t = clock() - t0
                for out in outputs:
                    self._record(by_id[out.request_id], out, t)
                    if out.finished:
                        bar.update(1)
            duration = clock() - t0
        return records, duration

    @staticmethod
    def _record(rec: RequestRecord, out: Any, t: float) -> None:
        if out.new_token_ids:
            rec.deliveries.append((t, len(out.new_token_ids)))
        if out.finished:
            rec.end_s = t
            if out.finish_reason == "abort":
                rec.error = out.error or "aborted"

    def close(self) -> None:
        self.engine.shutdown()


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

    Exact when the choice (or its ``delta``) lists ``token_ids``; otherwise a chunk with
    non-empty text counts as one token, an estimate the final usage count corrects.
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
    name = "http"

    def __init__(self, url: str, model: str | None, vocab_size: int, timeout_s: float = 600.0,
                 server_device: str | None = None):
        self.url, self.model, self.timeout_s = url.rstrip("/"), model, timeout_s
        self.server_device = server_device
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "url": self.url, "model": self.model, "vocab_size": self._vocab_size,
                "server_device": self.server_device, "timeout_s": self.timeout_s}

    def check(self, requests: list[Request]) -> None:
        if self.model is None:
            self.model = self._served_model()

    def _served_model(self) -> str | None:
        """The first model the server lists (``GET /v1/models``), or None if it lists none."""
        import httpx

        try:
            models = httpx.get(f"{self.url}/v1/models", timeout=10).json().get("data") or []
        except (httpx.HTTPError, ValueError):
            return None
        return models[0].get("id") if models else None

    def payload(self, r: Request) -> dict[str, Any]:
        body = {"prompt": r.prompt_ids, "max_tokens": r.output_len, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
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
