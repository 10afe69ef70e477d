"""The service's own processes dying under load, on a real local Ray (cluster/serve.py,
cluster/service_actors.py): an engine core and two front doors sharing their ports.

- the engine core killed: /health turns 503 within a second, the streams in flight end
  UNAVAILABLE, Ray restarts the core, which rebuilds its groups, and the service answers
  again token-exact with nothing leaked;
- a front door killed: the other door keeps serving on the same ports, the dead door's
  requests are aborted in the core, Ray restarts the door.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from splitserve.router.messages import ErrorCode, RouterError
from splitserve.workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 33, 42, 90]


@pytest.fixture(scope="module")
def service(ray_local, tiny_models):
    from splitserve.cluster.serve import start_core, start_doors, stop_core, stop_doors
    from splitserve.cluster.serve_config import ServeConfig, ServerSpec

    folder, oracle = tiny_models("tiny-llama")
    cfg = ServeConfig(model=str(folder), mode="aggregated", device="cpu", num_kv_blocks=128, max_model_len=512,
                      server=ServerSpec(grpc_port=0, http_port=0)).validate()
    core = start_core(cfg, timeout_s=240)
    doors, grpc_port, http_port = start_doors(cfg, core.address, 2)
    yield core, doors, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", oracle
    stop_doors(doors)
    stop_core(core)


def _wait(predicate, what: str, timeout_s: float, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:g} s")


def _health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _no_leaks(core) -> None:
    import ray

    def clean() -> bool:
        state = ray.get(core.actor.kv_state.remote(), timeout=30)
        return all(free == total for free, total in state["groups"].values()) and state["live_requests"] == 0 \
            and state["inflight"] == 0
    _wait(clean, "every block free, no request live", 30, 0.2)


async def _long_streams(address: str, n: int, started: asyncio.Event):
    from splitserve import AsyncClient

    async def one(client):
        got = 0
        async for chunk in client.stream(PROMPT, LONG):
            got += len(chunk.token_ids)
            started.set()
        return got

    async with AsyncClient(address) as client:
        return await asyncio.gather(*[one(client) for _ in range(n)], return_exceptions=True)


def test_engine_core_killed_health_503_within_a_second_then_recovers(service):
    import ray

    core, _, address, url, oracle = service
    assert _health(url) == 200
    pid = ray.get(core.actor.pid.remote())

    async def scenario():
        started = asyncio.Event()
        streams = asyncio.create_task(_long_streams(address, 4, started))
        await asyncio.wait_for(started.wait(), 60)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        seen = await asyncio.to_thread(_wait, lambda: _health(url) == 503, "/health 503", 5.0, 0.02)
        return seen - killed, await asyncio.wait_for(streams, 30)

    took, results = asyncio.run(scenario())
    assert took < 1.0, took
    assert all(isinstance(r, RouterError) and r.code is ErrorCode.UNAVAILABLE for r in results), results
    # Ray restarts the core; it rebuilds its groups and the doors answer again.
    _wait(lambda: _started(core.actor), "the core restarted with its groups", 240, 0.5)
    # Each door hears the new core on its own (zmq reconnects every 100 ms): every door, on
    # connections the kernel spreads over them, must say 200.
    _wait(lambda: all(_health(url) == 200 for _ in range(8)), "/health 200 again on every door", 30)
    assert ray.get(core.actor.pid.remote()) != pid
    from splitserve import Client

    with Client(address) as client:
        assert client.generate(PROMPT, GREEDY).token_ids == oracle(PROMPT, GREEDY.max_tokens)
    _no_leaks(core)


def test_front_door_killed_the_other_serves_and_it_restarts(service):
    import ray

    core, doors, address, url, oracle = service
    pid = ray.get(doors[0].pid.remote())
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: _gone(pid), "the killed door's process gone", 10)  # its listener with it
    from splitserve import Client

    # New connections land on the living door (the kernel drops the dead listener). One retry:
    # while Ray restarts the killed door, its gRPC server joining the shared port can reset a
    # connection it took during start-up (a client's retry then lands on a listening door).
    for _ in range(4):
        assert _generate_once_retried(address) == oracle(PROMPT, GREEDY.max_tokens)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    _wait(lambda: _door_back(doors[0], pid), "the killed door restarted", 60, 0.5)
    for _ in range(4):  # both doors up again: no retry needed
        with Client(address) as client:
            assert client.generate(PROMPT, GREEDY).token_ids == oracle(PROMPT, GREEDY.max_tokens)
    _no_leaks(core)


def _generate_once_retried(address: str) -> list[int]:
    from splitserve import Client

    for attempt in range(2):
        try:
            with Client(address) as client:
                return client.generate(PROMPT, GREEDY).token_ids
        except RouterError as err:
            if err.code is not ErrorCode.UNAVAILABLE or attempt:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _started(actor) -> bool:
    import ray

    try:
        ray.get(actor.wait_started.remote(5), timeout=30)
        return True
    except (ray.exceptions.ActorUnavailableError, TimeoutError, ray.exceptions.GetTimeoutError):
        return False  # restarting, or still building its groups


def _door_back(door, old_pid: int) -> bool:
    import ray

    try:
        return ray.get(door.pid.remote(), timeout=5) != old_pid
    except Exception:  # noqa: BLE001 - still restarting
        return False
