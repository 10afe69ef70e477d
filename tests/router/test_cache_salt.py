"""Cache salts through the real front doors (issue 15 #9): a caller with another salt (HTTP
body ``cache_salt``, gRPC ``GenerateRequest.cache_salt``), or another API key under
``cache_salt_per_key``, gets ``cached_tokens == 0`` for a prefix someone else cached, and the
same greedy tokens; the same salt (or key) sees its hits. Also the door's salt derivation
(`splitserve.router.cache_salt`) on its own."""

from __future__ import annotations

import uuid

import httpx
import pytest

from splitserve.router.cache_salt import door_cache_salt, tenant_key
from splitserve.router.client import Client
from splitserve.router.messages import ErrorCode, RouterError
from splitserve.workers.cache_salt import MAX_CACHE_SALT_CHARS
from splitserve.workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
BLOCK = 16  # the test router's block size (ServeConfig's default)


def fresh_prompt(smollm2_tokenizer) -> tuple[str, int]:
    """A prompt nobody sent before (other tests share the router and its cache), and the
    prompt tokens a full hit serves: every full block but the one holding the last token."""
    text = f"Request {uuid.uuid4().hex}: " + ", ".join(f"item {i}" for i in range(30)) + ". Sum:"
    n = len(smollm2_tokenizer.encode(text))
    assert n > 2 * BLOCK
    return text, (n - 1) // BLOCK * BLOCK


def http_complete(url: str, prompt: str, salt: str | None = None, key: str | None = None) -> tuple[int, list[int]]:
    body = {"prompt": prompt, "max_tokens": GREEDY.max_tokens, "temperature": 0, "return_token_ids": True}
    if salt is not None:
        body["cache_salt"] = salt
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    return out["usage"]["prompt_tokens_details"]["cached_tokens"], out["choices"][0]["token_ids"]


def grpc_complete(address: str, prompt: str, salt: str | None = None, key: str | None = None) -> tuple[int, list[int]]:
    with Client(address, api_key=key, timeout_s=60) as client:
        out = client.generate(prompt, GREEDY, cache_salt=salt)
    return out.cached_tokens, out.token_ids


# ---- the door's derivation --------------------------------------------------------------------


def test_door_salt_is_the_request_salt_without_per_key_salting():
    assert door_cache_salt(None, None) is None
    assert door_cache_salt("mine", None) == "mine"


def test_per_key_salts_differ_by_key_and_by_request_salt():
    salts = {door_cache_salt(s, k) for s in (None, "a", "b") for k in ("key-1", "key-2")}
    assert len(salts) == 6 and None not in salts
    assert door_cache_salt("a", "key-1") == door_cache_salt("a", "key-1")  # every door derives the same
    assert all("key-1" not in s for s in salts)  # the key itself never travels to the core
    assert len(door_cache_salt("x" * MAX_CACHE_SALT_CHARS, "k")) <= MAX_CACHE_SALT_CHARS


@pytest.mark.parametrize("salt", ["", "x" * (MAX_CACHE_SALT_CHARS + 1)])
@pytest.mark.parametrize("key", [None, "key-1"])
def test_a_bad_request_salt_is_invalid_argument_with_or_without_a_key(salt, key):
    with pytest.raises(RouterError) as err:
        door_cache_salt(salt, key)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and "cache_salt" in err.value.message


def test_tenant_key_only_when_per_key_salting_is_on():
    from splitserve.cluster.serve_config import ServerSpec

    assert tenant_key(ServerSpec(api_key="k")) is None
    assert tenant_key(ServerSpec(api_key="k", cache_salt_per_key=True)) == "k"
    assert tenant_key(ServerSpec(cache_salt_per_key=True)) is None  # no key: nothing to salt with


# ---- through the servers ----------------------------------------------------------------------


def test_http_another_salt_sees_no_hits_the_same_salt_does(servers, smollm2_tokenizer):
    prompt, full = fresh_prompt(smollm2_tokenizer)
    alice, bob = f"alice-{uuid.uuid4().hex}", f"bob-{uuid.uuid4().hex}"
    cached, tokens = http_complete(servers.http_url, prompt, alice)
    assert cached == 0
    for salt, hits in [(bob, 0), (None, 0), (alice, full), (bob, full)]:
        assert http_complete(servers.http_url, prompt, salt) == (hits, tokens), salt


def test_grpc_another_salt_sees_no_hits_the_same_salt_does(servers, smollm2_tokenizer):
    prompt, full = fresh_prompt(smollm2_tokenizer)
    alice, bob = f"alice-{uuid.uuid4().hex}", f"bob-{uuid.uuid4().hex}"
    cached, tokens = grpc_complete(servers.grpc_address, prompt, alice)
    assert cached == 0
    for salt, hits in [(bob, 0), (None, 0), (alice, full)]:
        assert grpc_complete(servers.grpc_address, prompt, salt) == (hits, tokens), salt
    # Both doors salt alike: the salt HTTP uses finds what gRPC cached.
    assert http_complete(servers.http_url, prompt, alice) == (full, tokens)


def test_unsalted_callers_still_share(servers, smollm2_tokenizer):
    prompt, full = fresh_prompt(smollm2_tokenizer)
    cached, tokens = http_complete(servers.http_url, prompt)
    assert cached == 0
    assert grpc_complete(servers.grpc_address, prompt) == (full, tokens)


def test_an_empty_salt_is_refused_by_both_doors(servers):
    r = httpx.post(f"{servers.http_url}/v1/completions", json={"prompt": "hi", "max_tokens": 1, "cache_salt": ""},
                   timeout=60)
    assert r.status_code == 400 and "cache_salt" in r.json()["error"]["message"]
    with pytest.raises(RouterError) as err:
        grpc_complete(servers.grpc_address, "hi", "")
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and "cache_salt" in err.value.message


@pytest.fixture
def per_key_doors(local_router):
    """Two pairs of doors over the test router, each with its own API key and per-key salts
    (two services' doors as tenants: a service has one key today)."""
    from splitserve.cluster.serve_config import ServerSpec
    from splitserve.router.grpc_server import start_grpc_server
    from splitserve.router.http_server import start_http_server

    doors = {}
    try:
        for key in ("tenant-key-1", "tenant-key-2"):
            spec = ServerSpec(grpc_port=0, http_port=0, api_key=key, cache_salt_per_key=True)
            g, h = start_grpc_server(local_router, spec), start_http_server(local_router, spec)
            doors[key] = (g, h)
        yield {key: (f"127.0.0.1:{g.port}", f"http://127.0.0.1:{h.port}") for key, (g, h) in doors.items()}
    finally:
        for g, h in doors.values():
            g.stop()
            h.stop()


def test_per_key_salts_keep_tenants_apart(servers, per_key_doors, smollm2_tokenizer):
    prompt, full = fresh_prompt(smollm2_tokenizer)
    (k1, (grpc1, http1)), (k2, (grpc2, http2)) = per_key_doors.items()
    cached, tokens = http_complete(servers.http_url, prompt)  # cached unsalted, by a door without a key
    assert cached == 0
    assert http_complete(http1, prompt, key=k1) == (0, tokens)  # salted by key 1 without asking
    assert grpc_complete(grpc2, prompt, key=k2) == (0, tokens)  # key 2 sees neither
    assert grpc_complete(grpc1, prompt, key=k1) == (full, tokens)  # key 1's own hits, on either door
    assert http_complete(http2, prompt, key=k2) == (full, tokens)
    # A request salt under a key is a partition of that tenant's cache: no hits yet, and a
    # caller of another key that sends the same salt still gets none.
    assert http_complete(http1, prompt, "shared-salt", key=k1) == (0, tokens)
    assert http_complete(http2, prompt, "shared-salt", key=k2) == (0, tokens)
    assert grpc_complete(grpc1, prompt, "shared-salt", key=k1) == (full, tokens)
