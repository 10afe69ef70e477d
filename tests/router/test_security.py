"""TLS and the API key on both front doors (the `secure_servers` pair): without the key, or
with a wrong one, UNAUTHENTICATED / 401 (nothing reaches the router); with it, served over
TLS; /health and /metrics stay open for probes and scrapers."""

from __future__ import annotations

import ssl

import httpx
import pytest
from router_helpers import API_KEY

from splitserve.router.client import Client
from splitserve.router.messages import ErrorCode, RouterError
from splitserve.workers.sampling_params import SamplingParams

PROMPT = "The capital of France is"
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_grpc_without_the_key_is_unauthenticated(secure_servers, tls_files, key):
    with Client(secure_servers.grpc_address, tls_ca=str(tls_files.cert), api_key=key) as client:
        for call in (lambda: client.generate(PROMPT, GREEDY), client.health, client.model_info,
                     lambda: client.abort("x")):
            with pytest.raises(RouterError) as err:
                call()
            assert err.value.code is ErrorCode.UNAUTHENTICATED and "Bearer" in err.value.message


def test_grpc_with_the_key_over_tls(secure_servers, tls_files, smollm2_tokenizer, smollm2_oracle):
    with Client(secure_servers.grpc_address, tls_ca=str(tls_files.cert), api_key=API_KEY) as client:
        out = client.generate(PROMPT, GREEDY)
        assert client.health().ready
    assert out.token_ids == smollm2_oracle(smollm2_tokenizer.encode(PROMPT), 4)
    with Client(secure_servers.grpc_address, api_key=API_KEY, timeout_s=5) as plain:  # no TLS: no connection
        with pytest.raises(RouterError) as err:
            plain.health()
    assert err.value.code is ErrorCode.UNAVAILABLE


def _trusting(tls_files, **kwargs) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(tls_files.cert)), **kwargs)


def test_http_key_and_tls(secure_servers, tls_files):
    url, body = secure_servers.http_url, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with _trusting(tls_files, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
            r = http.post(f"{url}/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHENTICATED"
        assert http.get(f"{url}/v1/models").status_code == 401
        assert http.get(f"{url}/health").status_code == 200  # probes need no key
        assert http.get(f"{url}/metrics").status_code == 200
        r = http.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        # The scheme is case-insensitive (RFC 7235); the key is not.
        assert http.get(f"{url}/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
        assert http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY.upper()}"}).status_code == 401
    with pytest.raises(httpx.ConnectError):  # the self-signed certificate is not trusted by default
        httpx.get(f"{url}/health", timeout=10)


def test_openai_client_with_the_key(secure_servers, tls_files):
    import openai

    with openai.OpenAI(base_url=f"{secure_servers.http_url}/v1", api_key=API_KEY,
                       http_client=_trusting(tls_files, timeout=60), max_retries=0) as client:
        out = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
    with openai.OpenAI(base_url=f"{secure_servers.http_url}/v1", api_key="wrong", max_retries=0,
                       http_client=_trusting(tls_files)) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_unauthenticated_probes_do_not_grow_the_metric_labels(secure_servers, tls_files):
    """401s on random paths (and gRPC calls to made-up methods) are counted as "other"."""
    import grpc
    from prometheus_client.parser import text_string_to_metric_families

    from splitserve.router.grpc_server import METHODS
    from splitserve.router.http_server import ROUTES

    url = secure_servers.http_url
    with _trusting(tls_files, timeout=30) as http:
        for i in range(20):
            assert http.get(f"{url}/v1/probe-{i}").status_code == 401
        creds = grpc.ssl_channel_credentials(tls_files.cert.read_bytes())
        with grpc.secure_channel(secure_servers.grpc_address.replace("127.0.0.1", "localhost"), creds) as channel:
            for i in range(5):
                call = channel.unary_unary(f"/splitserve.v1.Generation/Probe{i}")
                with pytest.raises(grpc.RpcError) as err:
                    call(b"", timeout=10)
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        text = http.get(f"{url}/metrics").text
    labels = {(s.labels["api"], s.labels["method"]) for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "splitserve:api_requests_total"}
    assert ("http", "other") in labels and ("grpc", "other") in labels
    assert all(method in (*ROUTES, *METHODS, "other") for _, method in labels), labels
