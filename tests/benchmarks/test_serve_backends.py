"""benchmarks/serve_backends.py: the SSE client against a real HTTP server on 127.0.0.1, and the
offline backend's real-time driver on a tiny random model.

The server is a small starlette app under uvicorn that streams OpenAI-style completion chunks:
each chunk carries ``tokens_per_chunk`` tokens, with ``token_ids`` in the choice (when the body
asks for ``return_token_ids``) or (``text`` mode) text only, then a usage chunk, then ``data:
[DONE]``. The http and grpc backends also run against splitserve's own front doors over a tiny
random model (`tiny_servers`, conftest.py): no tokenizer, so only token ids count tokens.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package
from serve_backends import (DONE, GRPCBackend, HTTPBackend, OfflineBackend, chunk_tokens,  # noqa: E402
                            parse_sse_line)
from serve_workloads import Request  # noqa: E402


class FakeOpenAIServer:
    """A real HTTP server in a thread; ``mode`` and ``tokens_per_chunk`` shape its streams."""

    def __init__(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        self.mode, self.tokens_per_chunk, self.gap_s = "ids", 2, 0.01
        self.bodies: list[dict] = []

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def completions(request):
            body = await request.json()
            self.bodies.append(body)
            if body["max_tokens"] == 99:
                return JSONResponse({"error": {"message": "max_tokens too large"}}, status_code=400)
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def _stream(self, body):
        n, k = body["max_tokens"], self.tokens_per_chunk
        for start in range(0, n, k):
            await asyncio.sleep(self.gap_s)
            ids = list(range(start, min(start + k, n)))
            choice = {"index": 0, "text": "".join(f" t{i}" for i in ids), "finish_reason": None}
            if self.mode == "ids" and body.get("return_token_ids"):  # as splitserve's server does
                choice["token_ids"] = ids
            yield f"data: {json.dumps({'id': 'c', 'object': 'text_completion', 'choices': [choice]})}\n\n"
            if self.mode == "cut" and start >= k:
                return  # the connection ends mid-stream, without [DONE]
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
        yield f"data: {json.dumps({'id': 'c', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture
def fresh(server):
    server.mode, server.tokens_per_chunk, server.bodies[:] = "ids", 2, []
    return server


def requests_(*output_lens: int, gap_s: float = 0.0) -> list[Request]:
    return [Request([10 + i, 11, 12], n, i * gap_s) for i, n in enumerate(output_lens)]


def test_parse_sse_lines():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line('data:{"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") is DONE
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    assert parse_sse_line("event: message") is None


def test_chunk_tokens():
    assert chunk_tokens({"choices": [{"text": "ab", "token_ids": [5, 6, 7]}]}) == (3, True)
    assert chunk_tokens({"choices": [{"delta": {"content": "x", "token_ids": [5]}}]}) == (1, True)
    assert chunk_tokens({"choices": [{"text": "ab"}]}) == (1, False)
    assert chunk_tokens({"choices": [{"text": ""}]}) == (0, True)
    assert chunk_tokens({"choices": [], "usage": {"completion_tokens": 4}}) == (0, True)


def test_streams_with_token_ids(fresh):
    backend = HTTPBackend(fresh.url, model=None, vocab_size=1000)
    reqs = requests_(5, 1, 4, gap_s=0.05)
    backend.check(reqs)
    assert backend.model == "fake-model"  # discovered from GET /v1/models
    records, duration = backend.run(reqs)

    assert [r.error for r in records] == [None] * 3
    assert [[n for _, n in r.deliveries] for r in records] == [[2, 2, 1], [1], [2, 2]]
    assert [r.num_tokens for r in records] == [5, 1, 4]
    for r, q in zip(records, reqs):
        times = [t for t, _ in r.deliveries]
        assert q.arrival_s <= r.start_s < times[0] <= r.end_s <= duration
        assert times == sorted(times)
    body = min(fresh.bodies, key=lambda b: b["prompt"][0])
    assert body == {"model": "fake-model", "prompt": [10, 11, 12], "max_tokens": 5, "ignore_eos": True,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "return_token_ids": True}


def test_text_only_stream_takes_the_usage_count(fresh):
    fresh.mode, fresh.tokens_per_chunk = "text", 3
    records, _ = HTTPBackend(fresh.url, "m", 1000).run(requests_(7))
    assert [n for _, n in records[0].deliveries] == [1, 1, 1]  # one per text chunk: an estimate
    assert records[0].num_tokens == 7  # corrected by usage.completion_tokens


def test_errors_fail_only_their_request(fresh):
    records, _ = HTTPBackend(fresh.url, "m", 1000).run(requests_(3, 99))
    assert records[0].ok and records[0].num_tokens == 3
    assert not records[1].ok and records[1].error.startswith("HTTP 400") and "too large" in records[1].error

    fresh.mode = "cut"
    records, _ = HTTPBackend(fresh.url, "m", 1000).run(requests_(8))
    assert records[0].error == "stream ended before data: [DONE]"


def test_unreachable_server_is_an_error_not_a_hang():
    backend = HTTPBackend("http://127.0.0.1:9", "m", 1000, timeout_s=5)  # port 9: discard, closed
    records, _ = backend.run(requests_(2))
    assert records[0].error and not records[0].ok


# --- against splitserve's front doors (random:tiny-llama: 256 ids, no tokenizer) ---------------


def check_exact(records, reqs) -> None:
    """Every request completed with exactly its tokens, counted from ids, stamped in order."""
    assert [r.error for r in records] == [None] * len(reqs)
    for r, q in zip(records, reqs):
        assert r.num_output_tokens is None  # counted from the deliveries, not taken from usage
        assert r.num_tokens == sum(n for _, n in r.deliveries) == q.output_len
        times = [t for t, _ in r.deliveries]
        assert q.arrival_s <= r.start_s < times[0] and times == sorted(times) and times[-1] <= r.end_s


def test_splitserve_sse_events_carry_each_chunks_token_ids(tiny_servers):
    """What the http backend counts on: with return_token_ids every event has one choice whose
    token_ids are the tokens new since the last event (empty text: no tokenizer); together they
    are the whole answer; then the usage event, then [DONE]."""
    import httpx

    body = {"prompt": [40, 41, 42, 43, 44], "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    whole = httpx.post(f"{tiny_servers.url}/v1/completions", json={**body, "return_token_ids": True}).json()
    answer = whole["choices"][0]["token_ids"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    with httpx.stream("POST", f"{tiny_servers.url}/v1/completions", json=stream) as resp:
        events = [parse_sse_line(line) for line in resp.iter_lines()]
    events = [e for e in events if e is not None]
    assert events[-1] is DONE and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6
    token_events = events[:-2]
    assert all(len(e["choices"]) == 1 and e["choices"][0]["text"] == "" for e in token_events)
    assert [i for e in token_events for i in e["choices"][0]["token_ids"]] == answer and len(answer) == 6
    assert sum(chunk_tokens(e)[0] for e in token_events) == 6
    assert all(chunk_tokens(e)[1] for e in events[:-1])


def test_http_backend_against_splitserve(tiny_servers):
    backend = HTTPBackend(tiny_servers.url, model=None, vocab_size=256)
    reqs = [Request(list(range(40, 52)), 5, 0.0), Request(list(range(60, 66)), 3, 0.05)]
    backend.check(reqs)
    assert (backend.model, backend.max_model_len) == ("random:tiny-llama", 1024)  # from GET /v1/models
    records, _ = backend.run(reqs)
    check_exact(records, reqs)
    with pytest.raises(SystemExit, match="longer than the max_model_len 1024"):
        backend.check([Request([50] * 1020, 8, 0.0)])


def test_grpc_backend_against_splitserve(tiny_servers):
    backend = GRPCBackend(tiny_servers.target)
    assert backend.vocab_size == 256 and backend.model == "random:tiny-llama"  # from GetModelInfo
    assert backend.describe()["max_model_len"] == 1024 and backend.describe()["mode"] == "aggregated"
    reqs = [Request(list(range(40, 52)), 5, 0.0), Request(list(range(60, 66)), 3, 0.05), Request([70] * 4, 1, 0.05)]
    backend.check(reqs)
    records, duration = backend.run(reqs)
    check_exact(records, reqs)
    assert records[1].start_s >= 0.05 and duration >= max(r.end_s for r in records)

    with pytest.raises(SystemExit, match="longer than the max_model_len"):
        backend.check([Request([50] * 1020, 8, 0.0)])
    with pytest.raises(SystemExit, match="outside the vocabulary of 256"):
        backend.check([Request([50, 300], 2, 0.0)])
    with pytest.raises(SystemExit, match="serves 'random:tiny-llama', not 'other'"):
        GRPCBackend(tiny_servers.target, model="other").check(reqs)


def test_grpc_errors_fail_only_their_request(tiny_servers):
    records, _ = GRPCBackend(tiny_servers.target).run([Request([50] * 8, 2, 0.0), Request([50] * 2000, 2, 0.0)])
    assert records[0].ok and records[0].num_tokens == 2
    assert not records[1].ok and records[1].error.startswith("INVALID_ARGUMENT")


def test_grpc_unreachable_server_is_refused_at_once():
    with pytest.raises(SystemExit, match="127.0.0.1:9"):
        GRPCBackend("127.0.0.1:9").check([Request([50], 1, 0.0)])


def test_offline_backend_adds_requests_when_they_arrive():
    from splitserve.workers.config import CacheConfig
    from splitserve.workers.engine import EngineConfig

    backend = OfflineBackend(EngineConfig(model="random:tiny-llama", device="cpu", show_progress=False,
                                          cache=CacheConfig(num_blocks=64)))
    try:
        reqs = [Request(list(range(40, 52)), 4, 0.0), Request(list(range(60, 70)), 3, 0.3)]
        backend.check(reqs)
        records, duration = backend.run(reqs)
    finally:
        backend.close()
    assert [r.num_tokens for r in records] == [4, 3]
    assert all(n == 1 for r in records for _, n in r.deliveries)  # one token per engine step
    late = records[1]
    assert late.start_s == late.arrival_s == 0.3 and late.deliveries[0][0] >= 0.3  # not served before it arrived
    assert records[0].deliveries[0][0] < late.deliveries[0][0]
    assert duration >= max(r.end_s for r in records)


def test_offline_backend_refuses_a_workload_the_engine_cannot_run():
    from splitserve.workers.config import CacheConfig
    from splitserve.workers.engine import EngineConfig

    backend = OfflineBackend(EngineConfig(model="random:tiny-llama", device="cpu", show_progress=False,
                                          cache=CacheConfig(num_blocks=64)))
    try:
        with pytest.raises(SystemExit, match="request 1 .*too long"):
            backend.check([Request([50] * 8, 2, 0.0), Request([50] * 2000, 2, 0.0)])
    finally:
        backend.close()
