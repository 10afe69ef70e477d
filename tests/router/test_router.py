"""The router on a real local Ray cluster: groups of rank actors, streamed requests, faults.

One service runs at a time (its actors have fixed names in the ``splitserve`` namespace); the
`service` fixture keeps the current one and swaps it when a test asks for another layout, so
tests of one layout sit together below. Every scenario ends with the leak check: on every
group all KV blocks free again, no transfer open, no request live or in flight.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.cluster.serve_config import GroupSpec, RouterSpec, ServeConfig
from splitserve.router.messages import ErrorCode, GenerateRequest, RouterError
from splitserve.workers.sampling_params import SamplingParams

TEXTS = [
    "The capital of France is", "def fibonacci(n):", "Water boils at", "List three colours:",
    "Once upon a time", "The best way to learn Python is", "import numpy as np\n", "Q: What is 2 + 2?\nA:",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
DEADLINE_S = 240.0


class Services:
    """At most one running router; `get` starts the asked-for layout (stopping another)."""

    def __init__(self):
        self.key: tuple | None = None
        self.handle = None

    def get(self, model, prefill: GroupSpec, decode: GroupSpec, max_inflight: int = 256, step_tokens: int = 2048):
        from splitserve.cluster.serve import start_core

        key = (str(model), prefill, decode, max_inflight, step_tokens)
        if key != self.key:
            self.stop()
            cfg = ServeConfig(model=str(model), device="cpu", kv_cache_memory=256 * 1024**2, prefill=prefill,
                              decode=decode, router=RouterSpec(max_inflight=max_inflight),
                              max_num_batched_tokens=step_tokens).validate()
            self.handle, self.key = start_core(cfg, timeout_s=DEADLINE_S), key
        return self.handle

    def stop(self) -> None:
        from splitserve.cluster.serve import stop_core

        if self.handle is not None:
            stop_core(self.handle)
            self.handle, self.key = None, None


@pytest.fixture(scope="module")
def services(ray_local):
    s = Services()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """A tiny model whose 2 KV heads split over tp 2 (SmolLM2's 3 do not), and its oracle."""
    folder, oracle = tiny_models("tiny-llama")
    return folder, oracle


@pytest.fixture(scope="module")
def prompts(tiny) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    vocab = tiny[1].model.config.vocab_size
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 9, 17, 23, 30, 41, 50, 64)]


@pytest.fixture(scope="module")
def smol_prompts(smollm2_tokenizer) -> list[list[int]]:
    return [smollm2_tokenizer.encode(t) for t in TEXTS]


# ---- helpers ----------------------------------------------------------------------------------


async def collect(handle, prompt_ids: list[int], params: SamplingParams = GREEDY, request_id=None,
                  first_chunk: asyncio.Event | None = None) -> list[int]:
    """Stream one request; its token ids (set ``first_chunk`` once the first tokens arrive)."""
    tokens: list[int] = []
    async for chunk in handle.generate(GenerateRequest(request_id=request_id, token_ids=prompt_ids,
                                                       sampling=params)):
        tokens += chunk.token_ids
        if first_chunk is not None and tokens:
            first_chunk.set()
    return tokens


def wait_until(predicate, what: str, timeout_s: float = DEADLINE_S, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last: {value!r})")
        time.sleep(every_s)


def assert_no_leaks(handle, timeout_s: float = 30.0) -> None:
    """Every group's blocks free, nothing open, live or in flight (polled: aborts are async)."""
    import ray

    def clean():
        state = ray.get(handle.actor.kv_state.remote(), timeout=30)
        ok = (all(free == total for free, total in state["groups"].values()) and state["open_transfers"] == 0
              and state["live_requests"] == 0 and state["inflight"] == 0)
        return ok or state
    state = wait_until(lambda: clean() is True, "no KV block, transfer or request left", timeout_s)
    assert state


def wait_all_ready(handle, min_restarts: dict[str, int] | None = None) -> None:
    import ray

    def ready():
        statuses = ray.get(handle.actor.health.remote(), timeout=30)
        restarted = all(s.restarts >= (min_restarts or {}).get(s.name, 0) for s in statuses)
        return (all(s.state == "ready" for s in statuses) and restarted) or statuses
    wait_until(lambda: ready() is True, "every group ready again")


def kill(actor_name: str) -> None:
    import ray

    from splitserve.cluster.ray_cluster import NAMESPACE

    ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)


async def _until_busy(handle, group: str, timeout_s: float = 120.0) -> None:
    """Until the group reports requests queued or running on it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = {s.name: s for s in await handle.health()}[group]
        if status.num_running + status.num_waiting > 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{group} never got work within {timeout_s:.0f} s")


async def _concurrent(handle, prompts, n: int, params: SamplingParams = GREEDY):
    jobs = [collect(handle, prompts[i % len(prompts)], params) for i in range(n)]
    return await asyncio.gather(*jobs, return_exceptions=True)


def _expected(oracle, prompts, n: int, max_tokens: int = GREEDY.max_tokens) -> list[list[int]]:
    return [oracle(prompts[i % len(prompts)], max_tokens) for i in range(n)]


# ---- tiny model, one side tp 2: 1P1D, 1P2D, 2P1D -----------------------------------------------

P_TP2, D_TP2, ONE, TWO = GroupSpec(count=1, tp=2), GroupSpec(count=1, tp=2), GroupSpec(count=1), GroupSpec(count=2)
CAP = 32


@pytest.mark.parametrize(("prefill", "decode"), [(P_TP2, ONE), (P_TP2, TWO), (TWO, D_TP2)],
                         ids=["1P1D-ptp2", "1P2D-ptp2", "2P1D-dtp2"])
def test_32_concurrent_streams_match_transformers(services, tiny, prompts, prefill, decode):
    handle = services.get(tiny[0], prefill, decode, max_inflight=CAP)
    got = asyncio.run(_concurrent(handle, prompts, 32))
    assert got == _expected(tiny[1], prompts, 32)
    assert_no_leaks(handle)


def test_overload_beyond_the_cap_is_refused_and_service_goes_on(services, tiny, prompts):
    handle = services.get(tiny[0], TWO, D_TP2, max_inflight=CAP)
    long = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    results = asyncio.run(_concurrent(handle, prompts, CAP + 8, long))
    refused = [r for r in results if isinstance(r, RouterError)]
    assert len(refused) == 8, results
    assert all(r.code is ErrorCode.RESOURCE_EXHAUSTED and "overloaded" in r.message for r in refused)
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(served) == CAP and all(len(r) == 64 for r in served)
    # Still serving, and correctly.
    assert asyncio.run(collect(handle, prompts[0])) == tiny[1](prompts[0], GREEDY.max_tokens)
    assert_no_leaks(handle)


def test_cancelling_mid_stream_frees_blocks_on_both_sides(services, tiny, prompts):
    import ray

    handle = services.get(tiny[0], TWO, D_TP2, max_inflight=CAP)
    params = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)

    async def cancel_after(i: int, chunks: int) -> int:
        gen = handle.generate(GenerateRequest(token_ids=prompts[i], sampling=params))
        seen = 0
        async for _ in gen:
            seen += 1
            if seen == chunks:
                break
        await gen.aclose()  # the client goes away: the request is aborted on every group
        return seen

    async def abort_after(i: int) -> BaseException | list[int]:
        started = asyncio.Event()
        task = asyncio.create_task(collect(handle, prompts[i], params, request_id=f"abort-{i}", first_chunk=started))
        await asyncio.wait_for(started.wait(), 120)
        await handle.abort(f"abort-{i}")
        done = await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 60)
        return done[0]

    async def scenario():
        closed = await asyncio.gather(*[cancel_after(i, 3) for i in range(4)])
        aborted = await asyncio.gather(*[abort_after(i) for i in range(4, 6)])
        return closed, aborted

    closed, aborted = asyncio.run(scenario())
    assert closed == [3] * 4
    assert all(isinstance(e, RouterError) and e.code is ErrorCode.CANCELLED for e in aborted), aborted
    state = ray.get(handle.actor.kv_state.remote())
    assert set(state["groups"]) == {"prefill-0", "prefill-1", "decode-0"}
    assert_no_leaks(handle)


# ---- SmolLM2, 2 prefill + 2 decode groups: a decode group, then a prefill group killed --------
# The real model is slow enough on CPU that a kill lands while requests are mid-stream; small
# steps (64 tokens) spread each prompt's prefill over several steps, so a kill finds some there.
SMALL_STEPS = 64


@pytest.mark.slow  # ~60 s; the engine-level migration: tests/workers/test_disagg_faults.py
def test_decode_group_killed_mid_stream_requests_migrate_token_exact(services, smollm2_dir, smol_prompts,
                                                                     smollm2_oracle):
    import ray

    handle = services.get(smollm2_dir, TWO, TWO, step_tokens=SMALL_STEPS)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    before = ray.get(handle.actor.kv_state.remote())["resent"]

    async def scenario():
        started = [asyncio.Event() for _ in range(12)]
        jobs = [asyncio.create_task(collect(handle, smol_prompts[i % 8], params, first_chunk=started[i]))
                for i in range(12)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        kill("decode-0")
        return await asyncio.wait_for(asyncio.gather(*jobs), DEADLINE_S)

    got = asyncio.run(scenario())
    assert got == [smollm2_oracle(smol_prompts[i % 8], 32) for i in range(12)]
    assert ray.get(handle.actor.kv_state.remote())["resent"] > before  # some really moved
    wait_all_ready(handle, {"decode-0": 1})  # rebuilt on Ray, rejoined
    assert asyncio.run(_concurrent(handle, smol_prompts, 8)) == _expected(smollm2_oracle, smol_prompts, 8)
    assert_no_leaks(handle)


def test_prefill_group_killed_requests_are_resent_and_complete(services, smollm2_dir, smollm2_tokenizer,
                                                               smollm2_oracle):
    import ray

    handle = services.get(smollm2_dir, TWO, TWO, step_tokens=SMALL_STEPS)
    # Long prompts keep both prefill groups busy when the kill lands.
    base = smollm2_tokenizer.encode(" ".join(TEXTS) * 6)
    long_prompts = [base[i:] for i in range(12)]
    before = ray.get(handle.actor.kv_state.remote())["resent"]

    async def scenario():
        jobs = [asyncio.create_task(collect(handle, p, GREEDY)) for p in long_prompts]
        await _until_busy(handle, "prefill-0")  # the kill lands while it computes prompts
        kill("prefill-0")
        return await asyncio.wait_for(asyncio.gather(*jobs), DEADLINE_S)

    got = asyncio.run(scenario())
    assert got == [smollm2_oracle(p, GREEDY.max_tokens) for p in long_prompts]
    assert ray.get(handle.actor.kv_state.remote())["resent"] > before
    wait_all_ready(handle, {"prefill-0": 1})
    assert_no_leaks(handle)


# ---- tiny model, 2 prefill + 2 decode groups: groups of both roles lost while streams run ------


@pytest.mark.slow  # ~25 s; the same losses at the engine level: tests/workers/test_disagg_faults.py
def test_prefill_and_decode_groups_lost_one_after_the_other_then_together(services, tiny, prompts):
    """Streams keep going token-exact while a prefill group and then a decode group die, and
    again while one of each dies at once; requests sent during the rebuilds go to the healthy
    groups; the lost groups rejoin; nothing leaks."""
    handle = services.get(tiny[0], TWO, TWO, step_tokens=SMALL_STEPS)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    want = _expected(tiny[1], prompts, 12, params.max_tokens)

    async def scenario(kills: list[list[str]]):
        started = [asyncio.Event() for _ in range(12)]
        jobs = [asyncio.create_task(collect(handle, prompts[i % len(prompts)], params, first_chunk=started[i]))
                for i in range(12)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started[:4])), 120)
        late = []
        for names in kills:
            for name in names:
                kill(name)
            await asyncio.sleep(0.5)
            # Sent while the lost groups are down: they must go to the healthy ones.
            late.append(asyncio.create_task(collect(handle, prompts[len(late)], params)))
        return await asyncio.wait_for(asyncio.gather(*jobs), DEADLINE_S), \
            await asyncio.wait_for(asyncio.gather(*late), DEADLINE_S)

    got, late = asyncio.run(scenario([["prefill-0"], ["decode-0"]]))
    assert got == want and late == want[:2]
    wait_all_ready(handle, {"prefill-0": 1, "decode-0": 1})
    got, late = asyncio.run(scenario([["prefill-1", "decode-1"]]))
    assert got == want and late == want[:1]
    wait_all_ready(handle, {"prefill-1": 1, "decode-1": 1})
    assert_no_leaks(handle)
