"""Every router error reaches the client with the right status on both front doors, checked
against a stand-in router (no model): the gRPC status of the same name, the HTTP status of
`HTTP_STATUS`, OpenAI-shaped error bodies, and errors in the middle of an SSE stream."""

from __future__ import annotations

import json

import httpx
import pytest

from splitserve.router.client import Client
from splitserve.router.messages import Chunk, ErrorCode, GroupStatus, ModelInfo, RouterError
from splitserve.workers.sampling_params import SamplingParams


class FakeRouter:
    """Raises the `ErrorCode` named by the prompt ("late:<CODE>": after one chunk; "bug": a
    plain exception); any other prompt gets one token back."""

    def __init__(self):
        self.groups = [GroupStatus("prefill-0", "prefill", "ready", None, 0, 0, 0.0, 8, 8, 0),
                       GroupStatus("decode-0", "decode", "failed", "rank died", 0, 0, 1.0, 0, 0, 0)]

    async def generate(self, request):
        text = request.text or ""
        if text == "bug":
            raise RuntimeError("something broke")
        if text.startswith("late:"):
            yield Chunk(request.request_id, [7], "x", completion_tokens=1)
            text = text[len("late:"):]
        if text in ErrorCode.__members__:
            raise RouterError(ErrorCode[text], f"fake {text}")
        yield Chunk(request.request_id, [7], "x", True, "length", 1, 1, 0)

    async def abort(self, request_id):
        pass

    async def health(self):
        return self.groups

    async def ready(self):
        return False

    async def model_info(self):
        return ModelInfo("fake", "disaggregated", 64, 100, {"prefill": (1, 1, 1), "decode": (1, 1, 1)})

    async def metrics_text(self):
        raise RuntimeError("router gone")


@pytest.fixture(scope="module")
def fake_servers():
    from splitserve.cluster.serve_config import ServerSpec
    from splitserve.router.grpc_server import start_grpc_server
    from splitserve.router.http_server import start_http_server

    router, spec = FakeRouter(), ServerSpec(grpc_port=0, http_port=0)
    g, h = start_grpc_server(router, spec), start_http_server(router, spec)
    yield f"127.0.0.1:{g.port}", f"http://127.0.0.1:{h.port}"
    g.stop()
    h.stop()


HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
        "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "ALREADY_EXISTS": 409}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_router_errors_keep_their_status(fake_servers, code):
    grpc_address, url = fake_servers
    with Client(grpc_address) as client, pytest.raises(RouterError) as err:
        client.generate(code.value, SamplingParams(max_tokens=1))
    assert (err.value.code, err.value.message) == (code, f"fake {code.value}")
    for stream in (False, True):  # a stream is refused before it starts, with the status
        r = httpx.post(f"{url}/v1/completions", json={"prompt": code.value, "stream": stream}, timeout=10)
        assert r.status_code == HTTP[code.value]
        assert r.json()["error"]["message"] == f"fake {code.value}" and r.json()["error"]["code"] == code.value


def test_error_after_the_first_chunk(fake_servers):
    grpc_address, url = fake_servers
    with Client(grpc_address) as client:
        stream = client.stream("late:UNAVAILABLE", SamplingParams(max_tokens=2))
        assert next(stream).text == "x"
        with pytest.raises(RouterError) as err:
            next(stream)
    assert err.value.code is ErrorCode.UNAVAILABLE
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "late:UNAVAILABLE", "stream": True}, timeout=10)
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "x"
    assert json.loads(events[1])["error"]["code"] == "UNAVAILABLE"


def test_bugs_are_internal_and_the_servers_go_on(fake_servers):
    grpc_address, url = fake_servers
    with Client(grpc_address) as client:
        with pytest.raises(RouterError) as err:
            client.generate("bug", SamplingParams(max_tokens=1))
        assert err.value.code is ErrorCode.INTERNAL and "something broke" in err.value.message
        assert client.generate("fine", SamplingParams(max_tokens=1)).text == "x"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "bug"}, timeout=10)
    assert r.status_code == 500 and "something broke" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "fine"}, timeout=10).json()["choices"][0]["text"] == "x"


def test_unhealthy_router(fake_servers):
    grpc_address, url = fake_servers
    with Client(grpc_address) as client:
        health = client.health()
    assert not health.ready and health.groups[1].error == "rank died"
    r = httpx.get(f"{url}/health", timeout=10)
    assert r.status_code == 503 and r.json()["groups"][1]["state"] == "failed"
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 503


def test_unknown_routes_are_json_errors(fake_servers):
    _, url = fake_servers
    r = httpx.get(f"{url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{url}/v1/completions", timeout=10).status_code == 405
