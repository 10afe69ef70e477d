"""The front door's side of the engine core (router/engine_client.py, router/stream_text.py):
text and stop strings made at the door end exactly as the offline engine ends them, request ids
scoped per door, a door that dies loses its requests in the core, a core that dies is seen at
once. The served requests run on the shared SmolLM2 service of tests/router/conftest.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.router.messages import ErrorCode, GenerateRequest, RouterError
from splitserve.workers.sampling_params import SamplingParams

PROMPT = "Write one sentence about the sea:"
N = 24


async def _stream(router, request: GenerateRequest) -> tuple[list[int], str, str | None, int]:
    ids, text, reason, chunks = [], "", None, 0
    async for chunk in router.generate(request):
        ids += chunk.token_ids
        text += chunk.text
        reason = chunk.finish_reason if chunk.finished else reason
        chunks += 1
    return ids, text, reason, chunks


@pytest.fixture(scope="module")
def greedy_text(smol_llm) -> str:
    return smol_llm.generate([PROMPT], SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))[0].text


def _stop_cases(text: str) -> list[dict]:
    """Stop strings taken from the greedy answer itself, so they really match: one that ends a
    word mid-answer, one that spans a token boundary, one kept in the output, one held back
    by min_tokens, and one that never appears."""
    words = text.split()
    mid = words[len(words) // 2]
    span = text[len(text) // 3: len(text) // 3 + 5]
    return [dict(stop=[mid]), dict(stop=[span, "zzzz-never"]), dict(stop=[span], include_stop_str_in_output=True),
            dict(stop=[words[0]], min_tokens=6), dict(stop=["zzzz-never"])]


def test_stop_strings_end_served_streams_as_the_offline_engine_ends_them(servers, smol_llm, greedy_text):
    for case in _stop_cases(greedy_text):
        params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, **case)
        want = smol_llm.generate([PROMPT], params)[0]
        ids, text, reason, _ = asyncio.run(_stream(servers.router, GenerateRequest(text=PROMPT, sampling=params)))
        assert (ids, text, reason) == (want.token_ids, want.text, want.finish_reason), case


def test_eos_and_stop_token_ids_end_the_text_as_offline(servers, smol_llm, smollm2_tokenizer):
    """The core ends these; the door drops the stop token's own text like the engine does."""
    base = SamplingParams(max_tokens=N, temperature=0.0)
    first = smol_llm.generate([PROMPT], base)[0].token_ids
    for params in (base, base.with_(stop_token_ids=(first[3],)),
                   base.with_(stop_token_ids=(first[3],), include_stop_str_in_output=True)):
        want = smol_llm.generate([PROMPT], params)[0]
        ids, text, reason, _ = asyncio.run(_stream(servers.router, GenerateRequest(text=PROMPT, sampling=params)))
        assert (ids, text, reason) == (want.token_ids, want.text, want.finish_reason), params


def test_a_live_duplicate_id_is_refused_and_harms_nothing(servers, smollm2_tokenizer):
    router = servers.router
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompt = smollm2_tokenizer.encode(PROMPT)

    async def scenario():
        first = asyncio.create_task(_stream(router, GenerateRequest("dup-1", token_ids=prompt, sampling=params)))
        await asyncio.sleep(0.05)
        with pytest.raises(RouterError) as err:
            await _stream(router, GenerateRequest("dup-1", token_ids=prompt, sampling=params))
        return err.value, await first

    err, (ids, _, reason, _) = asyncio.run(scenario())
    assert err.code is ErrorCode.ALREADY_EXISTS
    assert len(ids) == 20 and reason == "length"  # the first one ran to its end


def test_a_slow_consumer_gets_the_tokens_merged_not_a_backlog(servers, smollm2_tokenizer):
    """A consumer that does not read for a while finds every token waiting in one chunk."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    request = GenerateRequest(token_ids=smollm2_tokenizer.encode(PROMPT), sampling=params)

    async def scenario():
        gen = servers.router.generate(request)
        first = await anext(gen)
        await asyncio.sleep(3.0)  # the request finishes meanwhile
        rest = [c async for c in gen]
        return first, rest

    first, rest = asyncio.run(scenario())
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 12
    assert len(rest) == 1 and rest[0].finished


def test_a_door_that_goes_silent_loses_its_requests_in_the_core(servers, smollm2_tokenizer):
    """A door that dies sends nothing more: the core aborts its requests once it has been
    silent for DOOR_DEAD_AFTER_S, and their blocks are free again."""
    import zmq

    from splitserve.router import core_messages as cm

    core = servers.router.core
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(core.address.input)
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)  # fits the test's KV budget
    sock.send(cm.encode(cm.AddRequest("ghost", "r1", smollm2_tokenizer.encode(PROMPT), params, 600.0)))
    deadline = time.monotonic() + 5
    while core.loop.num_live == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert core.loop.num_live == 1
    sock.send(b"\x93not a message")  # a malformed frame is dropped; the core goes on
    deadline = time.monotonic() + cm.DOOR_DEAD_AFTER_S + 5
    while core.loop.num_live and time.monotonic() < deadline:
        time.sleep(0.05)
    sock.close(linger=0)
    assert core.loop.num_live == 0  # aborted; the fixture's idle check sees its blocks free


def test_core_gone_ends_streams_unavailable_within_a_second():
    """A core that stops (here: closed under a running stream) is seen by its door within
    DEAD_AFTER_S: the stream ends UNAVAILABLE, health raises, new requests are refused."""
    import torch

    from splitserve.cluster.serve_config import ServeConfig
    from splitserve.router.core_messages import DEAD_AFTER_S
    from splitserve.cluster.groups import local_service
    from splitserve.router.local_handle import build_local_router

    torch.set_num_threads(1)
    router = build_local_router(local_service(ServeConfig(model="random:tiny-llama", mode="aggregated", device="cpu",
                                                          num_kv_blocks=64)))
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def scenario():
        assert await router.ready()
        gen = router.generate(GenerateRequest(token_ids=[5, 6, 7], sampling=params.with_(max_tokens=60)))
        await anext(gen)
        stopped = time.monotonic()
        await asyncio.to_thread(router.core.close)
        with pytest.raises(RouterError) as err:
            async for _ in gen:
                pass
        seen = time.monotonic() - stopped
        with pytest.raises(RouterError) as health:
            await router.health()
        with pytest.raises(RouterError) as refused:
            await _stream(router, GenerateRequest(token_ids=[5, 6], sampling=params))
        return err.value, seen, health.value, refused.value

    try:
        err, seen, health, refused = asyncio.run(scenario())
    finally:
        router.client.close()
    assert err.code is ErrorCode.UNAVAILABLE or err.code is ErrorCode.CANCELLED, err
    assert seen < DEAD_AFTER_S + 2.0
    assert health.code is ErrorCode.UNAVAILABLE and refused.code is ErrorCode.UNAVAILABLE
