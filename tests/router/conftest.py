"""Fixtures of the front-door tests: one service in this process (an engine core over the
default model, a prefill and a decode group, no Ray, and a client of its sockets) and real
servers on loopback ports, shared by the whole session so the model loads once.

- `local_router`: a `LocalRouter` over SmolLM2-135M-Instruct (float32, CPU, a small KV
  budget, at most ``MAX_INFLIGHT`` requests at once).
- `servers`: its gRPC and HTTP servers, plain (no TLS, no key).
- `secure_servers`: a second pair over the same router, with TLS and the API key ``API_KEY``.
- `tls_files`: their self-signed certificate.

After every test the router must be idle again (no request live, none in flight, no open
transfer) within a few seconds, with every block free; the session-wide leak check
(tests/conftest.py) then checks each engine too.
"""

from __future__ import annotations

import pytest
from router_helpers import API_KEY, MAX_INFLIGHT, NUM_KV_BLOCKS, Servers, TlsFiles, make_self_signed, wait_idle

_ROUTERS: list = []


@pytest.fixture(scope="session")
def local_router(smollm2_dir):
    import torch

    from splitserve.cluster.serve_config import RouterSpec, ServeConfig
    from splitserve.cluster.groups import local_service
    from splitserve.router.local_handle import build_local_router

    torch.set_num_threads(1)
    cfg = ServeConfig(device="cpu", mode="disaggregated", num_kv_blocks=NUM_KV_BLOCKS, router=RouterSpec(max_inflight=MAX_INFLIGHT))
    router = build_local_router(local_service(cfg))
    _ROUTERS.append(router)
    yield router
    _ROUTERS.remove(router)
    router.close()


def _start(router, **spec) -> tuple:
    from splitserve.cluster.serve_config import ServerSpec
    from splitserve.router.grpc_server import start_grpc_server
    from splitserve.router.http_server import start_http_server

    spec = ServerSpec(grpc_port=0, http_port=0, **spec)
    return start_grpc_server(router, spec), start_http_server(router, spec)


@pytest.fixture(scope="session")
def servers(local_router):
    g, h = _start(local_router)
    yield Servers(local_router, g.port, h.port)
    g.stop()
    h.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def secure_servers(local_router, tls_files):
    g, h = _start(local_router, api_key=API_KEY, tls_cert=str(tls_files.cert), tls_key=str(tls_files.key))
    yield Servers(local_router, g.port, h.port, scheme="https")
    g.stop()
    h.stop()


@pytest.fixture(autouse=True)
def _router_idle_after_test():
    """Runs before the session-wide leak check: every request must have ended by then."""
    yield
    for router in _ROUTERS:
        state = wait_idle(router)
        for name, (free, total) in state["groups"].items():
            assert free == total, f"{name}: {total - free} KV blocks still held"
