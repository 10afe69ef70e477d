"""The gRPC front door through a real channel: greedy output token-exact with transformers,
streamed and not, every input kind; abort, cancel, deadline and overload each end the request
(and free its blocks: the idle check in conftest.py); health and model info."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from splitserve.router.client import AsyncClient, Client
from splitserve.router.messages import ErrorCode, RouterError
from splitserve.workers.sampling_params import SamplingParams

from router_helpers import MAX_INFLIGHT, NUM_KV_BLOCKS

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
N = 12
GREEDY = SamplingParams(max_tokens=N, temperature=0.0)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


def test_generate_is_token_exact_with_transformers(servers, smollm2_tokenizer, smollm2_oracle):
    with Client(servers.grpc_address) as client:
        for prompt in PROMPTS:
            out = client.generate(prompt, GREEDY)
            ids = smollm2_tokenizer.encode(prompt)
            assert out.token_ids == smollm2_oracle(ids, N)
            assert (out.prompt_tokens, out.completion_tokens) == (len(ids), len(out.token_ids))
            assert out.finish_reason == ("length" if len(out.token_ids) == N else "stop")
            assert out.text == smollm2_tokenizer.decode(out.token_ids, skip_special_tokens=True)
            assert out.request_id


def test_stream_token_ids_and_chat_are_token_exact(servers, smollm2_tokenizer, smollm2_oracle):
    from splitserve.workers.llm import chat_prompt_ids

    ids = smollm2_tokenizer.encode(PROMPTS[0])
    chat = [{"role": "user", "content": "What is 2 + 2?"}]

    async def run():
        async with AsyncClient(servers.grpc_address) as client:
            streamed = [c async for c in client.stream(ids, GREEDY, request_id="grpc-stream-1")]
            chatted = await client.generate(chat, GREEDY)
            return streamed, chatted

    streamed, chatted = asyncio.run(run())
    *chunks, last = streamed
    assert len(chunks) > 1 and all(c.token_ids and not c.finished for c in chunks)  # token by token
    assert [t for c in chunks for t in c.token_ids] == smollm2_oracle(ids, N)
    assert last.finished and last.completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert {c.request_id for c in streamed} == {"grpc-stream-1"}
    assert chatted.token_ids == smollm2_oracle(chat_prompt_ids(smollm2_tokenizer, chat), N)


def test_abort_by_id_ends_the_stream_as_cancelled(servers):
    with Client(servers.grpc_address) as client, Client(servers.grpc_address) as other:
        stream = client.stream(PROMPTS[0], LONG)
        first = next(stream)
        other.abort(first.request_id)
        with pytest.raises(RouterError) as err:
            list(stream)
    assert err.value.code is ErrorCode.CANCELLED and first.request_id in err.value.message


def test_cancel_and_deadline_abort_the_request(servers):
    async def run():
        async with AsyncClient(servers.grpc_address) as client:
            async with aclosing(client.stream(PROMPTS[1], LONG)) as stream:
                async for _ in stream:
                    break  # leaving the stream cancels the call
            with pytest.raises(RouterError) as err:
                await client.generate(PROMPTS[1], LONG, timeout_s=0.5)
            return err.value

    err = asyncio.run(run())
    assert err.code is ErrorCode.DEADLINE_EXCEEDED


def test_overload_is_resource_exhausted_and_the_others_go_on(servers):
    async def run():
        async with AsyncClient(servers.grpc_address) as client:
            streams = [client.stream(PROMPTS[0], LONG) for _ in range(MAX_INFLIGHT)]
            try:
                for s in streams:  # each admitted: its first token arrived
                    await anext(s)
                with pytest.raises(RouterError) as err:
                    await client.generate(PROMPTS[0], GREEDY)
                more = await anext(streams[0])  # the admitted ones still stream
            finally:
                for s in streams:
                    await s.aclose()
            return err.value, more

    err, more = asyncio.run(run())
    assert err.code is ErrorCode.RESOURCE_EXHAUSTED and "overloaded" in err.message
    assert more.token_ids


def test_health_and_model_info(servers):
    with Client(servers.grpc_address) as client:
        health, info = client.health(), client.model_info()
    assert health.ready and {g.role for g in health.groups} == {"prefill", "decode"}
    assert all(g.state == "ready" and g.num_blocks == NUM_KV_BLOCKS for g in health.groups)
    assert (info.model, info.mode, info.vocab_size) == ("SmolLM2-135M-Instruct", "disaggregated", 49152)
    assert info.groups == {"prefill": (1, 1, 1), "decode": (1, 1, 1)}


def test_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1", timeout_s=5) as client, pytest.raises(RouterError) as err:
        client.generate("hi", GREEDY)
    assert err.value.code is ErrorCode.UNAVAILABLE


def test_a_string_that_is_not_utf8_is_invalid_argument(servers):
    """Bytes that do not parse as the request (here a text field holding invalid UTF-8) are the
    client's fault: INVALID_ARGUMENT, not INTERNAL."""
    import grpc

    from splitserve.router import splitserve_pb2 as pb

    good = pb.GenerateRequest(text="xx").SerializeToString()
    bad = good.replace(b"xx", b"\xff\xfe")
    with grpc.insecure_channel(servers.grpc_address) as channel:
        generate = channel.unary_stream("/splitserve.v1.Generation/Generate")
        with pytest.raises(grpc.RpcError) as err:
            list(generate(bad, timeout=30))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.value.details()
        abort = channel.unary_unary("/splitserve.v1.Generation/Abort")
        with pytest.raises(grpc.RpcError) as err:
            abort(pb.AbortRequest(request_id="xx").SerializeToString().replace(b"xx", b"\xff\xfe"), timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
