"""Clients that stop reading cannot hurt anyone else (router/engine_client.py buffers,
router/http_server.py's bounded stream, the core's deadlines).

64 SSE streams are opened from raw sockets that never read a byte, beside a few normal streams:
the normal streams' inter-token gaps stay within 2x of a run beside 64 streams that do read
(the same engine work: on a CPU a batch of 68 costs several times a batch of 4, which is not
what this test is about), this process's memory does not grow with what the stalled streams
were sent, and the stalled requests end at their deadline with every KV block free (their
connections dropped too). A tiny random model on the CPU keeps the run short.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time

import httpx
import pytest
from router_helpers import wait_idle

STALLED = 64
NORMAL = 4
DEADLINE_S = 4.0


@pytest.fixture(scope="module")
def tiny_service():
    import torch

    from splitserve.cluster.serve_config import RouterSpec, ServeConfig, ServerSpec
    from splitserve.router.http_server import start_http_server
    from splitserve.cluster.groups import local_service
    from splitserve.router.local_handle import build_local_router

    torch.set_num_threads(1)
    cfg = ServeConfig(model="random:tiny-llama", mode="aggregated", device="cpu", num_kv_blocks=8192,
                      max_num_seqs=128, router=RouterSpec(max_inflight=128))
    router = build_local_router(local_service(cfg))
    http = start_http_server(router, ServerSpec(grpc_port=0, http_port=0))
    yield router, http.port
    http.stop()
    router.close()


def _body(max_tokens: int, timeout_s: float | None = None) -> dict:
    body = {"prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    return body if timeout_s is None else {**body, "timeout_s": timeout_s}


async def _normal_gaps(port: int) -> list[float]:
    """Mean gap between token events of each of NORMAL concurrent streams."""
    async def one(client: httpx.AsyncClient) -> float:
        times = []
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=_body(200)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                    times.append(time.perf_counter())
        return statistics.fmean(b - a for a, b in zip(times, times[1:]))

    async with httpx.AsyncClient(timeout=60) as client:
        return list(await asyncio.gather(*[one(client) for _ in range(NORMAL)]))


def _stall(port: int, rcvbuf: int = 4096) -> socket.socket:
    """An SSE request whose client never reads its answer (a tiny receive buffer, too)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(_body(1000, DEADLINE_S)).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return sock


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _dropped(sock: socket.socket) -> bool:
    """The server closed this connection (reading drains what it had sent, then EOF)."""
    sock.settimeout(5)
    try:
        while sock.recv(1 << 16):
            pass
        return True
    except (TimeoutError, OSError):
        return False


def _beside_readers(router, port: int) -> float:
    """The normal streams' mean gap beside STALLED streams whose clients read everything."""
    import threading

    socks = [_stall(port, 1 << 16) for _ in range(STALLED)]
    readers = [threading.Thread(target=_dropped, args=(s,), daemon=True) for s in socks]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while asyncio.run(router.kv_state())["live_requests"] < STALLED and time.monotonic() < deadline:
            time.sleep(0.02)
        gap = statistics.fmean(asyncio.run(_normal_gaps(port)))
        wait_idle(router, timeout_s=DEADLINE_S + 10)
    finally:
        for s in socks:
            s.close()
    return gap


def test_non_reading_clients_do_not_slow_others_and_end_at_their_deadline(tiny_service):
    router, port = tiny_service
    asyncio.run(_normal_gaps(port))  # warm-up
    readers = _beside_readers(router, port)
    rss_before = _rss_mb()
    started = time.monotonic()
    stalled = [_stall(port) for _ in range(STALLED)]
    try:
        deadline = time.monotonic() + 10
        while asyncio.run(router.kv_state())["live_requests"] < STALLED and time.monotonic() < deadline:
            time.sleep(0.02)
        assert asyncio.run(router.kv_state())["live_requests"] >= STALLED  # all running in the engine
        beside = statistics.fmean(asyncio.run(_normal_gaps(port)))
        rss_grew = _rss_mb() - rss_before
        state = wait_idle(router, timeout_s=DEADLINE_S + 10)  # the core ends them at their deadline
        ended = time.monotonic() - started
        assert all(free == total for free, total in state["groups"].values()), state
        assert all(_dropped(s) for s in stalled)  # and the door let their connections go
    finally:
        for s in stalled:
            s.close()
    assert beside < 2 * readers, (beside, readers)
    assert ended < DEADLINE_S + 5, ended
    assert rss_grew < 100, rss_grew
