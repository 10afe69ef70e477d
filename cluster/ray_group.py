"""A worker group's ranks as Ray actors in a placement group.

Lifecycle (driven by `WorkerGroupExecutor` through `RayLauncher`):
    placement   one bundle per rank (``gpus_per_rank`` of a GPU each when the group runs on
                GPUs, else CPUs only), STRICT_PACK when tp > 1 (tensor-parallel ranks talk
                every layer: one node), PACK otherwise (`splitserve.cluster.placement` decides
                both, and checks the whole layout before the first group). Ready within the
                placement deadline (60 s on an embedded Ray) or the group fails with a
                `PlacementError` naming what is missing against what Ray has free: a group
                that can never be placed says so instead of waiting for the model-load
                deadline
    share       groups with a fraction of a GPU each (``gpus_per_rank`` < 1) that move KV by
                CUDA IPC must be on one GPU: each claims it in a `SharedGpu`, and one placed
                on another GPU fails at once (Ray packs fractional GPUs onto one device of a
                node, so this only trips across nodes)
    actors      named in the Ray namespace ``splitserve``: rank 0 is the group's name
                (``prefill-0``), the others ``prefill-0-rank<r>``; each gets its bundle
    connect     the driver listens on its node's IP (a random auth key); each actor runs the
                rank's loop (`worker_main`) on a thread, over a connection back to the driver;
                from there the group is driven exactly like local rank processes
    death       an actor that dies closes its socket: the driver's next read fails the group
                at once (`WorkerGroupError`); the step deadline covers a silent network
    shutdown    the actors are killed and the placement group removed (also by the finalizer)
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from splitserve.cluster.placement import (EMBEDDED_PLACEMENT_WAIT_S, GroupBundles, PlacementError,
                                         cluster_shortfall)
from splitserve.workers.executor import RunnerSpec, WorkerGroupError
from splitserve.workers.worker import WorkerArgs, worker_main

logger = logging.getLogger(__name__)

NAMESPACE = "splitserve"
#: Names every group's placement group, so a restarted engine core can find its
#: predecessor's (they outlive the actor that made them) and remove them.
PLACEMENT_GROUP_PREFIX = "splitserve-group-"


def rank_actor_name(group: str, rank: int) -> str:
    return group if rank == 0 else f"{group}-rank{rank}"


@ray.remote(max_restarts=0)
class RankActor:
    """One rank: runs `worker_main` on a thread, so the actor's own methods (where it is, a
    free port) stay callable while the rank serves."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def location(self) -> tuple[str, tuple[str, ...]]:
        """This actor's node and the GPUs Ray gave it (their ids on that node)."""
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), tuple(str(i) for i in ctx.get_accelerator_ids().get("GPU", []))

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, args: WorkerArgs, address: tuple[str, int], authkey: bytes) -> None:
        def run() -> None:
            conn = Client(address, authkey=authkey)
            conn.send(args.rank)
            worker_main(args, conn, die_with_parent=False)

        threading.Thread(target=run, name=f"rank{args.rank}", daemon=True).start()


class SharedGpu:
    """The one GPU that groups sharing GPUs must all be on (their KV moves by CUDA IPC, which
    reaches only a process on the same device, and Ray hides every other GPU from an actor).
    The first group placed claims it; thread-safe (lost groups are rebuilt on threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.where: tuple[str, tuple[str, ...]] | None = None
        self.owner: str | None = None

    def claim(self, group: str, where: tuple[str, tuple[str, ...]]) -> None:
        with self._lock:
            if self.where is None:
                self.where, self.owner = where, group
            elif where != self.where:
                raise PlacementError(
                    f"{group}: placed on GPU {','.join(where[1]) or '?'} of node {where[0][:12]}, but {self.owner} "
                    f"is on GPU {','.join(self.where[1]) or '?'} of node {self.where[0][:12]}; groups that share GPUs "
                    "(gpus_per_rank < 1) move KV by CUDA IPC and must share one: use gpus_per_rank 1 on this "
                    "cluster")


@dataclass(frozen=True)
class RayGroupOptions:
    #: On GPUs (``gpus_per_rank`` of one per rank); else CPUs only.
    use_gpu: bool = False
    #: CPUs per rank bundle (also the rank's torch threads on CPU).
    cpus_per_rank: float = 1.0
    #: Each rank's share of a GPU; below 1, ranks of different groups may share a device.
    gpus_per_rank: float = 1.0
    #: How long the placement group may stay pending (no room) before the group fails. Short
    #: on purpose: a layout that cannot be placed must say so, not wait as long as a model
    #: load (`splitserve.cluster.placement.placement_wait_s` picks it per cluster).
    placement_timeout_s: float = EMBEDDED_PLACEMENT_WAIT_S
    #: The ranks' start: actor calls and connecting back (model loads have their own deadline).
    startup_timeout_s: float = 300.0
    #: Set when this group must be on the same GPU as the engine's other groups (see `SharedGpu`).
    shared_gpu: SharedGpu | None = None

    def bundles(self, group: str, tp: int, world: int) -> GroupBundles:
        """The group's rank bundles and strategy (one `splitserve.cluster.placement` rule)."""
        return GroupBundles(group, 1, tp, world // tp, self.cpus_per_rank, self.gpus_per_rank if self.use_gpu else 0.0)


class RayLauncher:
    """Starts a group's ranks as Ray actors (see the module docstring)."""

    def __init__(self, group: str, tensor_parallel_size: int, options: RayGroupOptions = RayGroupOptions()):
        self.group, self.tp, self.options = group, tensor_parallel_size, options
        self.actors: list = []
        self.pg = None
        self.procs: list = []  # no local processes: a death shows as a closed connection
        self._stop = _Stopper()

    # -- the launcher interface of WorkerGroupExecutor -----------------------------------------

    def num_threads(self, spec: RunnerSpec, world: int) -> int:
        return max(1, int(self.options.cpus_per_rank)) if spec.device_type == "cpu" else 1

    def start(self, args: list[WorkerArgs]) -> list[Connection]:
        authkey = secrets.token_bytes(16)
        listener = Listener((ray.util.get_node_ip_address(), 0), authkey=authkey)
        try:
            accepted = _accept_in_background(listener, len(args))
            for a, actor in zip(args, self.actors, strict=True):
                actor.start.remote(a, listener.address, authkey)
            conns = accepted.wait(self.options.startup_timeout_s, self.group)
        finally:
            listener.close()
        return conns

    def sentinels(self) -> dict[int, int]:
        return {}

    def dead(self) -> list[str]:
        return []

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({rank_actor_name(self.group, rank)})"

    def stopper(self):
        return self._stop

    # -- placement ---------------------------------------------------------------------------

    def rendezvous(self, world: int) -> tuple[str, int]:
        """The placement group and one actor per rank; rank 0's node hosts the rendezvous."""
        o = self.options
        need = o.bundles(self.group, self.tp, world)
        self.pg = placement_group([need.bundle for _ in range(world)], strategy=need.strategy.value,
                                  name=f"{PLACEMENT_GROUP_PREFIX}{self.group}")
        self._stop.pg = self.pg
        try:
            ray.get(self.pg.ready(), timeout=o.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._stop()  # a pending group holds nothing, but must not be placed later
            why = cluster_shortfall(need) or ("Ray shows enough free in total: too thinly spread over nodes, "
                                              "or taken by other placement groups first")
            raise PlacementError(f"{self.group}: no room for {world} x {need.bundle} ({need.strategy.value}) "
                                 f"within {o.placement_timeout_s:.0f} s: {why}", need.total(),
                                 ray.available_resources()) from None
        for rank in range(world):
            self.actors.append(self._create(rank))
        self._stop.actors = self.actors
        if o.shared_gpu is not None:
            try:
                o.shared_gpu.claim(self.group, ray.get(self.actors[0].location.remote(), timeout=o.startup_timeout_s))
            except BaseException:
                self._stop()
                raise
        host = ray.get(self.actors[0].node_ip.remote(), timeout=o.startup_timeout_s)
        port = ray.get(self.actors[0].free_port.remote(), timeout=o.startup_timeout_s)
        return host, port

    def _create(self, rank: int):
        name = rank_actor_name(self.group, rank)
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
        deadline = time.monotonic() + 10.0
        while True:  # a killed predecessor's name is released shortly after the kill
            try:
                return RankActor.options(
                    name=name, namespace=NAMESPACE, num_cpus=self.options.cpus_per_rank,
                    num_gpus=self.options.gpus_per_rank if self.options.use_gpu else 0, scheduling_strategy=strategy,
                ).remote()
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class _Stopper:
    """Kills the actors and removes the placement group; idempotent (finalizer and shutdown)."""

    def __init__(self):
        self.actors: list = []
        self.pg = None

    def __call__(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - already removed, or Ray is shutting down
                pass
            self.pg = None


class _Accepted:
    def __init__(self):
        self.conns: dict[int, Connection] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()

    def wait(self, timeout_s: float, group: str) -> list[Connection]:
        if not self.done.wait(timeout_s):
            raise WorkerGroupError(f"{group}: ranks did not connect within {timeout_s:.0f} s")
        if self.error is not None:
            raise WorkerGroupError(f"{group}: a rank failed to connect: {self.error}")
        return [self.conns[r] for r in sorted(self.conns)]


def _accept_in_background(listener: Listener, world: int) -> _Accepted:
    """Accept ``world`` connections on a thread (Listener.accept has no timeout; closing the
    listener ends a wait that passed its deadline)."""
    accepted = _Accepted()

    def run() -> None:
        try:
            while len(accepted.conns) < world:
                conn = listener.accept()
                accepted.conns[conn.recv()] = conn
        except BaseException as err:  # noqa: BLE001 - reported by wait()
            accepted.error = err
        accepted.done.set()

    threading.Thread(target=run, name="rank-accept", daemon=True).start()
    return accepted
