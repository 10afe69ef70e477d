"""A splitserve server for serve_bench's ``--server-cmd`` tests, cheaper than ``splitserve
serve`` (no Ray): the in-process router of conftest.py's `tiny_servers` (aggregated,
random:tiny-llama, CPU) with its gRPC and HTTP front doors on the given ports, until SIGTERM.

    python tests/benchmarks/tiny_server.py GRPC_PORT HTTP_PORT
"""

from __future__ import annotations

import signal
import sys
import threading


def main(grpc_port: int, http_port: int) -> int:
    import torch

    from splitserve.cluster.serve_config import ServeConfig, ServerSpec
    from splitserve.router.grpc_server import start_grpc_server
    from splitserve.router.http_server import start_http_server
    from splitserve.cluster.groups import local_service
    from splitserve.router.local_handle import build_local_router

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    torch.set_num_threads(1)
    router = build_local_router(local_service(ServeConfig(model="random:tiny-llama", mode="aggregated", device="cpu",
                                                          num_kv_blocks=128)))
    spec = ServerSpec(grpc_port=grpc_port, http_port=http_port)
    servers = [start_grpc_server(router, spec), start_http_server(router, spec)]
    print(f"serving on {grpc_port} (gRPC) and {http_port} (HTTP)", flush=True)
    stop.wait()
    for server in servers:
        server.stop()
    router.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
