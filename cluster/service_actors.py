"""The processes of `splitserve serve` on Ray: one engine core and N front doors, on one node.

Lifecycle:
    core     `EngineCoreActor(cfg, address)`: its constructor starts building the groups on
             a thread (placement groups, model loads: slow) and then serves them as an
             `EngineCore` on ``address`` (ipc sockets in a folder of this node). The actor's
             own methods stay free: `wait_started` (the build's outcome, with a deadline),
             `health`, `kv_state` (leak checks), `shutdown`
    doors    `FrontDoorActor(cfg, address, spec, index)`: an `EngineClient` on the core's
             address and the gRPC and HTTP servers on ``spec``'s ports, shared by every door
             (SO_REUSEPORT: the kernel spreads connections over the doors). Everything starts
             in the constructor, so when Ray restarts a door that died (``max_restarts``), it
             serves again on the same ports with no call from anyone
    faults   a door that dies: its connections drop (clients see UNAVAILABLE), the core aborts
             its requests once it stops beating, Ray restarts it. The core that dies: every
             door sees its beats stop within a second (in-flight streams end UNAVAILABLE,
             /health 503); Ray restarts it, the restarted core removes the placement groups
             its predecessor left, rebuilds the groups, binds the same sockets, and the doors
             are serving again once its beats return
    stop     `shutdown` on each (doors first), then the actors are killed
"""

from __future__ import annotations

import logging
import threading

import ray

from splitserve.cluster.placement import Placement, plan_on_cluster
from splitserve.cluster.serve_config import ServeConfig, ServerSpec
from splitserve.router.engine_core import CoreAddress

logger = logging.getLogger(__name__)

CORE_NAME = "engine-core"
#: How long a starting front door waits for the engine core's first beat (a core that Ray
#: restarts rebuilds its groups first: model loads).
_DOOR_WAITS_FOR_CORE_S = 900.0


def door_name(index: int) -> str:
    return f"frontdoor-{index}"


def _setup_process() -> None:
    import torch

    torch.set_num_threads(1)  # these processes schedule and stream; the ranks compute
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@ray.remote(num_cpus=0, max_concurrency=16)
class EngineCoreActor:
    def __init__(self, cfg: ServeConfig, address: CoreAddress, placement: Placement | None = None):
        _setup_process()
        self.cfg, self.address, self.placement = cfg, address, placement
        self._core = None
        self._error: BaseException | None = None
        self._started = threading.Event()
        threading.Thread(target=self._start, name="core-start", daemon=True).start()

    def _start(self) -> None:
        from splitserve.cluster.groups import build_engine
        from splitserve.router.engine_core import EngineCore
        from splitserve.router.local_handle import model_info
        from splitserve.router.policies import make_policy

        try:
            _remove_stale_placement_groups()
            # Planned again unless given: a restarted core finds the cluster as it is now.
            placement = self.placement or plan_on_cluster(self.cfg)
            cfg = self.cfg = placement.apply(self.cfg)  # mode auto resolved
            engine, factory = build_engine(cfg, make_policy(cfg.router.policy, cfg.block_size), placement)
            self._core = EngineCore(engine, model_info(cfg.service(placement.device), engine), self.address,
                                    cfg.router.core_limits(), rebuild=factory)
        except BaseException as err:  # noqa: BLE001 - reported by wait_started
            logger.exception("the engine core failed to start")
            self._error = err
        self._started.set()

    def wait_started(self, timeout_s: float) -> str:
        """The mode served, once every group is up; the build's error if it failed."""
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"the engine core's groups did not start within {timeout_s:g} s")
        if self._error is not None:
            raise self._error
        return self.cfg.mode

    def health(self) -> list:
        return list(self._core.loop.statuses) if self._core is not None else []

    def kv_state(self) -> dict:
        if self._core is None:
            raise RuntimeError("the engine core is still starting")
        return self._core.kv_state()

    def pid(self) -> int:
        import os

        return os.getpid()

    def shutdown(self) -> None:
        if self._core is not None:
            self._core.close()
            self._core = None


def _remove_stale_placement_groups() -> None:
    """Placement groups a crashed core left behind (their rank actors died with it; Ray ties
    a group's lifetime to the job, not to the actor that made it): without this a restarted
    core would find the cluster's GPUs still reserved."""
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    from splitserve.cluster.ray_group import PLACEMENT_GROUP_PREFIX

    for pg_id, info in placement_group_table().items():
        if info.get("name", "").startswith(PLACEMENT_GROUP_PREFIX) and info.get("state") != "REMOVED":
            logger.warning("removing placement group %s left by an earlier engine core", info["name"])
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


@ray.remote(num_cpus=0, max_concurrency=16)
class FrontDoorActor:
    def __init__(self, cfg: ServeConfig, address: CoreAddress, spec: ServerSpec, index: int):
        from splitserve.router.engine_client import EngineClient
        from splitserve.router.grpc_server import start_grpc_server
        from splitserve.router.http_server import start_http_server
        from splitserve.router.local_handle import door_tokenizer

        _setup_process()
        import os

        self.client = EngineClient(address, door=f"door{index}-{os.getpid()}", tokenizer=door_tokenizer(cfg.model),
                                   request_timeout_s=cfg.router.request_timeout_s, limits=cfg.server.limits())
        # Listen only once the core answers: a door that took connections before would refuse
        # their first requests (UNAVAILABLE). A door Ray restarts while the core is also
        # restarting waits for it here.
        self.client.wait_ready(_DOOR_WAITS_FOR_CORE_S)
        self._servers = [start_grpc_server(self.client, spec, share_port=True),
                         start_http_server(self.client, spec, share_port=True)]

    def ports(self) -> tuple[int, int]:
        return self._servers[0].port, self._servers[1].port

    def pid(self) -> int:
        import os

        return os.getpid()

    def shutdown(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.stop()
        self.client.close()
