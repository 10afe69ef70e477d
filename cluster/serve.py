"""`splitserve serve`: Ray, the engine core and its groups, and the front-door processes.

Lifecycle:
    connect     join the Ray cluster (``--address``/$RAY_ADDRESS) or start a local one
    plan        mode auto resolved against what the cluster has free (disaggregated when the
                groups asked for fit, else aggregated) and said; a layout that cannot be
                placed fails here, naming what is missing
    core        the `EngineCoreActor` (named ``engine-core``, pinned to this node) builds
                every group on Ray actors and serves them on ipc sockets of this node; a lone
                one-rank aggregated group runs in the core's own process, which then takes
                that rank's GPU (or CPU)
    front doors ``api_servers`` `FrontDoorActor`s (pinned here too), each with gRPC and
                OpenAI-compatible HTTP (/health, /live, /ready, /metrics) on the same two ports
                (SO_REUSEPORT), talking to the core over its sockets: no Ray call per request
                or token. Ray restarts a door that dies; the core is restarted too and
                rebuilds its groups
    serve       print where it listens; log each group's state when it changes
    stop        SIGINT/SIGTERM: the doors stop taking requests, the core shuts its groups
                down, an embedded Ray stops
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from splitserve.cluster.groups import group_in_core
from splitserve.cluster.placement import CPUS_PER_RANK, plan_on_cluster
from splitserve.cluster.ray_cluster import NAMESPACE, connect
from splitserve.cluster.serve_config import ServeConfig, ServerSpec
from splitserve.cluster.service_actors import CORE_NAME, EngineCoreActor, FrontDoorActor, door_name
from splitserve.router.engine_client import EngineClient
from splitserve.router.engine_core import CoreAddress
from splitserve.router.local_handle import door_tokenizer

logger = logging.getLogger("splitserve.serve")

#: How often Ray restarts a process of the service that died (a core restart rebuilds groups).
DOOR_RESTARTS = -1
CORE_RESTARTS = 3


def _here() -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


@dataclass
class CoreHandle:
    """The engine core actor, and a client of its sockets in this process (tests, benchmarks
    and the serve loop's health log use it like a front door would)."""

    actor: object
    client: EngineClient
    address: CoreAddress
    mode: str

    def __getattr__(self, name):  # generate, abort, health, ready, model_info, metrics_text, kv_state
        return getattr(self.client, name)


def start_core(cfg: ServeConfig, timeout_s: float = 600.0, name: str = CORE_NAME) -> CoreHandle:
    """The engine core on this node with every group started (raises `PlacementError` at once
    for a layout the cluster cannot hold; raises if the groups cannot start in time)."""
    # Raises at once on an embedded Ray for a layout that cannot fit (and logs the choice);
    # on a joined cluster it only warns: workers may still be joining or autoscaling.
    placement = plan_on_cluster(cfg)
    address = CoreAddress.ipc()
    # A group that runs in the core's own process (`group_in_core`) takes its rank's bundle.
    in_core = group_in_core(placement.apply(cfg))
    on_gpu = placement.device.startswith("cuda")
    resources = dict(num_gpus=cfg.gpus_per_rank if on_gpu else 0, num_cpus=0 if on_gpu else CPUS_PER_RANK) \
        if in_core else {}
    actor = EngineCoreActor.options(name=name, namespace=NAMESPACE, lifetime=None, scheduling_strategy=_here(),
                                    max_restarts=CORE_RESTARTS, **resources).remote(cfg, address, placement)
    try:
        mode = ray.get(actor.wait_started.remote(timeout_s), timeout=timeout_s + 30)
        client = EngineClient(address, door=f"driver-{time.monotonic_ns()}",
                              request_timeout_s=cfg.router.request_timeout_s, limits=cfg.server.limits(),
                              tokenizer=door_tokenizer(cfg.model))
        client.wait_ready(30.0)
    except BaseException:
        ray.kill(actor, no_restart=True)
        raise
    return CoreHandle(actor, client, address, mode)


def stop_core(handle: CoreHandle, timeout_s: float = 60.0) -> None:
    handle.client.close()
    try:
        ray.get(handle.actor.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle.actor, no_restart=True)


def free_ports(spec: ServerSpec) -> ServerSpec:
    """The spec with port 0 replaced by a free port: every door (and a door Ray restarts)
    must bind the same one."""
    def pick(port: int) -> int:
        if port:
            return port
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        with socket.socket(family) as s:
            s.bind((spec.host, 0))
            return s.getsockname()[1]
    return replace(spec, grpc_port=pick(spec.grpc_port), http_port=pick(spec.http_port))


def start_doors(cfg: ServeConfig, address: CoreAddress, count: int, timeout_s: float = 120.0) -> tuple[list, int, int]:
    """``count`` front doors on this node, sharing the two ports; (actors, gRPC, HTTP port)."""
    spec = free_ports(cfg.server)
    doors = [FrontDoorActor.options(name=door_name(i), namespace=NAMESPACE, scheduling_strategy=_here(),
                                    max_restarts=DOOR_RESTARTS).remote(cfg, address, spec, i) for i in range(count)]
    try:
        ports = ray.get([d.ports.remote() for d in doors], timeout=timeout_s)
    except BaseException:
        for d in doors:
            ray.kill(d, no_restart=True)
        raise
    assert all(p == (spec.grpc_port, spec.http_port) for p in ports), ports
    return doors, spec.grpc_port, spec.http_port


def stop_doors(doors: list, timeout_s: float = 30.0) -> None:
    try:
        ray.get([d.shutdown.remote() for d in doors], timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - killed below anyway
        logger.warning("front doors did not stop cleanly: %s", err)
    for d in doors:
        ray.kill(d, no_restart=True)


@dataclass
class Service:
    core: CoreHandle
    doors: list
    grpc_port: int
    http_port: int

    def stop(self) -> None:
        stop_doors(self.doors)  # the front doors first, then the groups
        stop_core(self.core)


def start_service(cfg: ServeConfig) -> Service:
    """Ray, the engine core and its groups, and the front doors (all on this node)."""
    connect(cfg.ray.address, cfg.ray.num_cpus)
    core = start_core(cfg)
    try:
        doors, grpc_port, http_port = start_doors(cfg, core.address, cfg.server.resolved_api_servers())
    except BaseException:
        stop_core(core)
        raise
    return Service(core, doors, grpc_port, http_port)


def serve_forever(cfg: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("starting on Ray: model %s, mode %s", cfg.model or "SmolLM2-135M-Instruct (default)", cfg.mode)
    service = start_service(cfg)
    s = cfg.server
    scheme = "https" if s.tls_cert else "http"
    print(f"splitserve: {service.core.mode}, {len(service.doors)} front door(s); gRPC on {s.host}:"
          f"{service.grpc_port}, HTTP on {scheme}://{s.host}:{service.http_port}"
          f" (OpenAI API under /v1, /health, /metrics)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    last: dict[str, str] = {}
    while not stop.is_set():
        try:
            for status in ray.get(service.core.actor.health.remote(), timeout=30):
                if last.get(status.name) != status.state:
                    logger.info("group %s: %s%s", status.name, status.state,
                                f" ({status.error})" if status.error and status.state != "ready" else "")
                    last[status.name] = status.state
        except Exception as err:  # noqa: BLE001 - keep serving; the core may be restarting
            logger.warning("engine core health check failed: %s", err)
        stop.wait(2.0)
    logger.info("stopping")
    service.stop()
    if cfg.ray.address is None:
        ray.shutdown()
    time.sleep(0.1)
    return 0
