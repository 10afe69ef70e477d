"""`splitserve serve`: Ray, the router and its groups, and the front doors.

Lifecycle:
    connect     join the Ray cluster (``--address``/$RAY_ADDRESS) or start a local one
    router      the `Router` actor (named ``router`` in the ``splitserve`` namespace) builds
                every group on Ray actors; ready once each group has loaded its shards
    front doors gRPC and OpenAI-compatible HTTP (with /health and /metrics) in this process,
                bound to the configured host (127.0.0.1 by default)
    serve       print where it listens; log each group's state when it changes
    stop        SIGINT/SIGTERM: servers stop taking requests, the router shuts its groups
                down, an embedded Ray stops
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import ray

from splitserve.cluster.ray_cluster import NAMESPACE, connect
from splitserve.cluster.serve_config import ServeConfig
from splitserve.router.handle import RouterHandle
from splitserve.router.router import ROUTER_NAME, Router

logger = logging.getLogger("splitserve.serve")


def start_router(cfg: ServeConfig, name: str = ROUTER_NAME, timeout_s: float = 600.0) -> RouterHandle:
    """The router actor with every group started (raises if they cannot start in time)."""
    actor = Router.options(name=name, namespace=NAMESPACE, lifetime=None).remote(cfg)
    ray.get(actor.ready.remote(), timeout=timeout_s)
    return RouterHandle(actor)


def stop_router(handle: RouterHandle, timeout_s: float = 60.0) -> None:
    try:
        ray.get(handle.actor.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle.actor)


@dataclass
class Service:
    router: RouterHandle
    servers: list

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        stop_router(self.router)


def start_service(cfg: ServeConfig) -> Service:
    from splitserve.router.grpc_server import start_grpc_server
    from splitserve.router.http_server import start_http_server

    connect(cfg.ray.address, cfg.ray.num_cpus)
    router = start_router(cfg)
    servers = []
    try:
        servers.append(start_grpc_server(router, cfg.server))
        servers.append(start_http_server(router, cfg.server))
    except BaseException:
        for server in servers:
            server.stop()
        stop_router(router)
        raise
    return Service(router, servers)


def serve_forever(cfg: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roles = ", ".join(f"{getattr(cfg, r).count} {r} (tp {getattr(cfg, r).tp}, pp {getattr(cfg, r).pp})"
                      for r in cfg.roles())
    logger.info("starting %s on Ray: %s, model %s", cfg.mode, roles, cfg.model or "SmolLM2-135M-Instruct (default)")
    service = start_service(cfg)
    s = cfg.server
    scheme = "https" if s.tls_cert else "http"
    print(f"splitserve: gRPC on {s.host}:{service.servers[0].port}, HTTP on {scheme}://{s.host}:{service.servers[1].port}"
          f" (OpenAI API under /v1, /health, /metrics)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    last: dict[str, str] = {}
    while not stop.is_set():
        try:
            for status in ray.get(service.router.actor.health.remote(), timeout=30):
                if last.get(status.name) != status.state:
                    logger.info("group %s: %s%s", status.name, status.state,
                                f" ({status.error})" if status.error and status.state != "ready" else "")
                    last[status.name] = status.state
        except Exception as err:  # noqa: BLE001 - keep serving; the router may be restarting
            logger.warning("router health check failed: %s", err)
        stop.wait(2.0)
    logger.info("stopping")
    service.stop()
    if cfg.ray.address is None:
        ray.shutdown()
    time.sleep(0.1)
    return 0
