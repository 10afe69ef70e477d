"""`splitserve serve`: Ray, the router and its groups, and the front doors.

Lifecycle:
    connect     join the Ray cluster (``--address``/$RAY_ADDRESS) or start a local one
    router      the `Router` actor (named ``router`` in the ``splitserve`` namespace) builds
                every group on Ray actors; ready once each group has loaded its shards
    front doors gRPC and OpenAI-compatible HTTP (with /health and /metrics) in the router
                actor's process (pinned to this node), bound to the configured host
                (127.0.0.1 by default): a request reaches the router with no Ray call
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
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from splitserve.cluster.ray_cluster import NAMESPACE, connect
from splitserve.cluster.serve_config import ServeConfig
from splitserve.router.handle import RouterHandle
from splitserve.router.router import ROUTER_NAME, Router

logger = logging.getLogger("splitserve.serve")


def start_router(cfg: ServeConfig, name: str = ROUTER_NAME, timeout_s: float = 600.0) -> RouterHandle:
    """The router actor, on this node, with every group started (raises if they cannot start
    in time)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = Router.options(name=name, namespace=NAMESPACE, lifetime=None, scheduling_strategy=here).remote(cfg)
    try:
        ray.get(actor.start.remote(), timeout=timeout_s)
    except BaseException:
        ray.kill(actor)
        raise
    return RouterHandle(actor)


def stop_router(handle: RouterHandle, timeout_s: float = 60.0) -> None:
    try:
        ray.get(handle.actor.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle.actor)


@dataclass
class Service:
    router: RouterHandle
    grpc_port: int
    http_port: int

    def stop(self) -> None:
        stop_router(self.router)  # the front doors first, then the groups


def start_service(cfg: ServeConfig) -> Service:
    """Ray, the router and its groups, and the front doors in the router's process (bound on
    this node: the router actor is pinned here)."""
    connect(cfg.ray.address, cfg.ray.num_cpus)
    router = start_router(cfg)
    try:
        grpc_port, http_port = ray.get(router.actor.start_front_doors.remote(cfg.server), timeout=120)
    except BaseException:
        stop_router(router)
        raise
    return Service(router, grpc_port, http_port)


def serve_forever(cfg: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roles = ", ".join(f"{getattr(cfg, r).count} {r} (tp {getattr(cfg, r).tp}, pp {getattr(cfg, r).pp})"
                      for r in cfg.roles())
    logger.info("starting %s on Ray: %s, model %s", cfg.mode, roles, cfg.model or "SmolLM2-135M-Instruct (default)")
    service = start_service(cfg)
    s = cfg.server
    scheme = "https" if s.tls_cert else "http"
    print(f"splitserve: gRPC on {s.host}:{service.grpc_port}, HTTP on {scheme}://{s.host}:{service.http_port}"
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
