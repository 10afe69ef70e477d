"""Fixtures of the serving-benchmark tests: a real splitserve server, cheaply.

- `tiny_servers`: splitserve's gRPC and HTTP front doors on loopback ports over one router in
  this process (`LocalRouterHandle`, no Ray), aggregated mode, one `random:tiny-llama` group on
  the CPU (no tokenizer: streams carry token ids and no text). Shared by the whole session;
  ``.url``, ``.target`` and ``.router``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

TINY_MODEL = "random:tiny-llama"


@dataclass(frozen=True)
class TinyServers:
    router: object
    url: str
    target: str


@pytest.fixture(scope="session")
def tiny_servers():
    import torch

    from splitserve.cluster.serve_config import ServeConfig, ServerSpec
    from splitserve.router.grpc_server import start_grpc_server
    from splitserve.router.http_server import start_http_server
    from splitserve.cluster.groups import local_service
    from splitserve.router.local_handle import build_local_router

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    router = build_local_router(local_service(ServeConfig(model=TINY_MODEL, mode="aggregated", device="cpu",
                                                          num_kv_blocks=128)))
    spec = ServerSpec(grpc_port=0, http_port=0)
    grpc_server, http_server = start_grpc_server(router, spec), start_http_server(router, spec)
    try:
        yield TinyServers(router, f"http://127.0.0.1:{http_server.port}", f"127.0.0.1:{grpc_server.port}")
    finally:
        grpc_server.stop()
        http_server.stop()
        router.close()
        torch.set_num_threads(threads)
