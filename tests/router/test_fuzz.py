"""Bad input, fuzzed with hypothesis, against both front doors: every request is refused
with INVALID_ARGUMENT / 400 and a message that names what is wrong, and the server keeps
serving correct (token-exact) answers afterwards (docs/design.md invariant 4)."""

from __future__ import annotations

import json
import math

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.router import splitserve_pb2 as pb
from splitserve.router import splitserve_pb2_grpc as pb_grpc

VOCAB = 49152
PROMPT = "The capital of France is"
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

nan_inf = st.sampled_from([math.nan, math.inf, -math.inf])
not_a_number = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2))
bad_ids = st.builds(lambda ok, bad: ok + [bad], st.lists(st.integers(0, VOCAB - 1), max_size=4),
                    st.one_of(st.integers(VOCAB, 2**40), st.integers(-2**40, -1)))

# field -> (invalid values, a word the error message must contain)
HTTP_FIELDS = {
    "max_tokens": (st.one_of(st.integers(max_value=0), st.floats(allow_nan=False), not_a_number), "max_tokens"),
    "temperature": (st.one_of(st.floats(max_value=-1e-3), nan_inf, st.text(max_size=3)), "temperature"),
    "top_p": (st.one_of(st.floats(min_value=1.0001, allow_infinity=False), st.floats(max_value=0.0), nan_inf),
              "top_p"),
    "top_k": (st.one_of(st.integers(max_value=-2), st.floats(allow_nan=False)), "top_k"),
    "min_p": (st.one_of(st.floats(min_value=1.0001, allow_infinity=False), st.floats(max_value=-1e-6)), "min_p"),
    "min_tokens": (st.one_of(st.integers(min_value=3), st.integers(max_value=-1)), "min_tokens"),
    "stop": (st.one_of(st.just([""]), st.integers(), st.lists(st.integers(), min_size=1, max_size=2)), "stop"),
    "stop_token_ids": (st.lists(st.integers(max_value=-1), min_size=1, max_size=2), "stop_token_ids"),
    "prompt": (st.one_of(st.just(""), st.just([]), st.just([[]]), bad_ids, st.integers(), st.none(),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)), "prompt"),
    "timeout_s": (st.one_of(st.floats(max_value=0.0), st.text(max_size=3)), "timeout"),
    "n": (st.integers(min_value=2), "n="),
    "seed": (st.one_of(st.floats(allow_nan=False), st.text(max_size=3)), "seed"),
}


def _valid_body(max_tokens: int = 2) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}


def _post(url: str, body) -> httpx.Response:
    """json.dumps writes NaN and Infinity (as Python's json.loads on the server reads them)."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=10)


@given(data=st.data())
@FUZZ
def test_http_refuses_bad_completions(servers, data):
    field = data.draw(st.sampled_from(sorted(HTTP_FIELDS)), label="field")
    values, word = HTTP_FIELDS[field]
    body = {**_valid_body(), field: data.draw(values, label="value")}
    r = _post(f"{servers.http_url}/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "INVALID_ARGUMENT" and err["type"] == "invalid_request_error"
    assert word in err["message"], err["message"]


@given(body=st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.integers(),
                      st.fixed_dictionaries({"messages": st.one_of(st.just([]), st.text(max_size=3),
                                                                   st.just([{"role": 1, "content": "x"}]))})))
@FUZZ
def test_http_refuses_bad_chat_bodies(servers, body):
    r = _post(f"{servers.http_url}/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "INVALID_ARGUMENT" and ("body" in err["message"] or "messages" in err["message"])


def _set(msg: pb.GenerateRequest, field: str, value) -> None:
    s = msg.sampling
    if field == "token_ids":
        msg.token_ids.ids.extend(value)
    elif field == "text":
        msg.text = value
    elif field == "chat":
        msg.chat.SetInParent()
    elif field == "no_input":
        msg.ClearField("text")
    elif field == "stop":
        s.stop.extend(value)
    else:
        setattr(s, field, value)


floats32 = st.floats(width=32, allow_nan=False)
# field -> (invalid values, a word the error message must contain)
GRPC_FIELDS = {
    "temperature": (st.one_of(floats32.filter(lambda x: x < 0), nan_inf), "temperature"),
    "top_p": (st.one_of(floats32.filter(lambda x: x > 1 or x < 0), nan_inf), "top_p"),
    "top_k": (st.integers(-2**31, -2), "top_k"),
    "min_p": (st.one_of(floats32.filter(lambda x: x > 1 or x < 0), st.just(math.nan)), "min_p"),
    "min_tokens": (st.integers(3, 2**32 - 1), "min_tokens"),
    "stop": (st.just([""]), "stop"),
    "token_ids": (st.one_of(st.just([]), bad_ids.filter(lambda ids: ids[-1] >= 0 and ids[-1] < 2**32)), "prompt"),
    "text": (st.just(""), "prompt"),
    "chat": (st.just(None), "chat"),
    "no_input": (st.just(None), "input"),
}


@pytest.fixture(scope="module")
def raw_stub(servers):
    with grpc.insecure_channel(servers.grpc_address) as channel:
        yield pb_grpc.GenerationStub(channel)


@given(data=st.data())
@FUZZ
def test_grpc_refuses_bad_requests(raw_stub, data):
    field = data.draw(st.sampled_from(sorted(GRPC_FIELDS)), label="field")
    values, word = GRPC_FIELDS[field]
    msg = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2))
    if field not in ("token_ids", "text", "chat", "no_input"):
        msg.text = PROMPT
    _set(msg, field, data.draw(values, label="value"))
    with pytest.raises(grpc.RpcError) as err:
        list(raw_stub.Generate(msg, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert word in err.value.details(), err.value.details()


def test_still_correct_after_bad_input(servers, smollm2_tokenizer, smollm2_oracle):
    """Runs after the fuzzing above (same module, in order)."""
    from splitserve.router.client import Client
    from splitserve.workers.sampling_params import SamplingParams

    ids = smollm2_tokenizer.encode(PROMPT)
    with Client(servers.grpc_address) as client:
        assert client.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0)).token_ids == smollm2_oracle(ids, 8)
    r = httpx.post(f"{servers.http_url}/v1/completions", json={**_valid_body(8), "return_token_ids": True}, timeout=60)
    assert r.json()["choices"][0]["token_ids"] == smollm2_oracle(ids, 8)
