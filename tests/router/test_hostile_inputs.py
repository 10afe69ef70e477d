"""Hostile input through the real front doors (the shared SmolLM2 service of conftest.py):
oversize bodies, huge prompts, stop-list bombs, over-long token prompts, duplicate ids and
deadlines from the far future. Each is refused quickly with a clear status, before any work on
it; then the service still answers a normal request token-exact, and the fixture's idle check
finds every group's KV blocks free. (Non-reading clients: test_slow_readers.py; random-path
probes with a key set: test_security.py.)"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from splitserve.router.client import Client
from splitserve.router.messages import ErrorCode, GenerateRequest, RouterError
from splitserve.workers.sampling_params import SamplingParams

PROMPT = "The capital of France is"
N = 6


def _post(servers, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{servers.http_url}/v1/completions", json=body, timeout=30, **kwargs)


def test_an_oversize_body_is_413_before_it_is_read(servers):
    limit = 8 * 1024 * 1024
    t = time.monotonic()
    r = _post(servers, {"prompt": "x" * (limit + 10)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "INVALID_ARGUMENT"
    # Chunked, with no Content-Length: refused once the bytes pass the limit.
    def chunks():
        yield b'{"prompt": "'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'
    r = httpx.post(f"{servers.http_url}/v1/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert time.monotonic() - t < 20


def test_a_client_still_writing_its_oversize_body_reads_the_413(servers):
    """The 413 goes out as soon as the headers are read; a client that only then writes its
    body (as httpx and requests do) must still read it: the server drains the rest before
    closing, since closing with unread bytes sends RST and the client would lose the answer."""
    limit = 8 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", servers.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n" % (limit + 10))
        time.sleep(0.2)  # the server has answered by now
        s.sendall(b"x" * (limit + 10))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].split()[1] == b"413", head
    assert b"connection: close" in head.lower() and b"INVALID_ARGUMENT" in body


def test_a_lying_content_length_is_refused(servers):
    with socket.create_connection(("127.0.0.1", servers.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 99999999999999999999\r\n\r\n{}")
        assert b" 413 " in s.recv(4096).split(b"\r\n", 1)[0] + b" "


@pytest.mark.parametrize("extra, words", [
    ({"prompt": "word " * 300_000}, "characters"),                      # 1.5 M characters: never tokenized
    ({"prompt": [5] * 10_000}, "too long"),                             # more tokens than max_model_len
    ({"stop": [f"s{i}" for i in range(10_000)]}, "stop strings"),       # a stop-list bomb
    ({"stop": ["x" * 100_000]}, "stop string of 100000"),
    ({"stop_token_ids": list(range(10_000))}, "stop token ids"),
])
def test_oversize_inputs_are_refused_quickly(servers, extra, words):
    body = {"prompt": PROMPT, "max_tokens": 4, **extra}
    t = time.monotonic()
    r = _post(servers, body)
    took = time.monotonic() - t
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text[:300]
    assert len(r.json()["error"]["message"]) < 300  # the input is not echoed back
    assert took < 5, took


def test_grpc_refuses_the_same(servers):
    with Client(servers.grpc_address) as client:
        for params in (SamplingParams(max_tokens=4, stop=[f"s{i}" for i in range(100)]),
                       SamplingParams(max_tokens=4, stop_token_ids=list(range(1000)))):
            with pytest.raises(RouterError) as err:
                client.generate(PROMPT, params)
            assert err.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(RouterError) as err:
            client.generate([7] * 10_000, SamplingParams(max_tokens=4))
        assert err.value.code is ErrorCode.INVALID_ARGUMENT and "too long" in err.value.message


def test_a_duplicate_live_id_over_grpc_is_already_exists(servers):
    params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)

    async def scenario():
        from splitserve import AsyncClient

        async with AsyncClient(servers.grpc_address) as client:
            first = asyncio.create_task(client.generate(PROMPT, params, request_id="same-id"))
            await asyncio.sleep(0.1)
            second = await asyncio.gather(client.generate(PROMPT, params, request_id="same-id"),
                                          return_exceptions=True)
            return await first, second[0]

    first, second = asyncio.run(scenario())
    assert len(first.token_ids) == N
    assert isinstance(second, RouterError) and second.code is ErrorCode.ALREADY_EXISTS


def test_a_deadline_from_the_far_future_is_clamped_not_trusted(servers):
    """timeout_s = 1e300 neither overflows nor outlives the server's own deadline."""
    router = servers.router
    request = GenerateRequest(text=PROMPT, sampling=SamplingParams(max_tokens=N, temperature=0.0),
                              timeout_s=1e300)

    async def run():
        return [c async for c in router.generate(request)]

    chunks = asyncio.run(run())
    assert chunks[-1].finished


def test_after_the_hostile_inputs_the_service_answers_token_exact(servers, smollm2_tokenizer, smollm2_oracle):
    ids = smollm2_tokenizer.encode(PROMPT)
    with Client(servers.grpc_address) as client:
        out = client.generate(ids, SamplingParams(max_tokens=N, temperature=0.0))
    assert out.token_ids == smollm2_oracle(ids, N)


def test_a_client_deadline_cannot_outlive_the_servers():
    """A service whose requests may take 2 s ends one that asked for 1e6 s at 2 s, its blocks
    freed (the client's timeout_s is clamped to router.request_timeout_s)."""
    import torch

    from splitserve.cluster.serve_config import RouterSpec, ServeConfig
    from splitserve.cluster.groups import local_service
    from splitserve.router.local_handle import build_local_router

    torch.set_num_threads(1)
    router = build_local_router(local_service(ServeConfig(model="random:tiny-llama", mode="aggregated", device="cpu",
                                                          num_kv_blocks=128, router=RouterSpec(request_timeout_s=2.0))))
    # Long enough to outlast 2 s on this CPU: many tokens, each step slowed by a big batch.
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)

    async def run():
        async def one(i):
            return [c async for c in router.generate(GenerateRequest(token_ids=[5 + i, 6], sampling=params,
                                                                     timeout_s=1e6))]
        return await asyncio.gather(*[one(i) for i in range(24)], return_exceptions=True)

    try:
        t = time.monotonic()
        results = asyncio.run(run())
        took = time.monotonic() - t
        state = asyncio.run(router.kv_state())
    finally:
        router.close()
    ended = [r for r in results if isinstance(r, RouterError)]
    assert ended and all(r.code is ErrorCode.DEADLINE_EXCEEDED for r in ended), results[:2]
    assert took < 2.0 + 3.0, took
    assert all(free == total for free, total in state["groups"].values())


def test_a_request_that_makes_a_rank_raise_fails_alone_through_the_server(monkeypatch):
    """A query of death through the gRPC door: the request whose prompt makes the rank raise
    ends INTERNAL; requests beside it and after it are served, and no block is held."""
    import torch

    from splitserve.cluster.serve_config import ServeConfig, ServerSpec
    from splitserve.router.grpc_server import start_grpc_server
    from splitserve.cluster.groups import local_service
    from splitserve.router.local_handle import build_local_router
    from splitserve.workers.executor import RAISE_ON_TOKEN_ENV

    torch.set_num_threads(1)
    poison = 201
    monkeypatch.setenv(RAISE_ON_TOKEN_ENV, str(poison))  # read when the runner is built, below
    router = build_local_router(local_service(ServeConfig(model="random:tiny-llama", mode="aggregated", device="cpu",
                                                          num_kv_blocks=128)))
    server = start_grpc_server(router, ServerSpec(grpc_port=0, http_port=0))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def scenario():
        from splitserve import AsyncClient

        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            return await asyncio.gather(client.generate([5, 6, poison, 7], params),
                                        *[client.generate([5 + i, 6, 7], params) for i in range(3)],
                                        return_exceptions=True)

    try:
        bad, *good = asyncio.run(scenario())
        after = asyncio.run(scenario())[1:]
        state = asyncio.run(router.kv_state())
    finally:
        server.stop()
        router.close()
    assert isinstance(bad, RouterError) and bad.code is ErrorCode.INTERNAL, bad
    assert all(len(g.token_ids) == 8 for g in good + after), good + after
    assert all(free == total for free, total in state["groups"].values())
