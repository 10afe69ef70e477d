"""The serving engine of a `ServeConfig`: every group's ranks as Ray actors.

Lifecycle of `build_engine`:
    plan        `splitserve.cluster.placement.plan_on_cluster`: the device ("auto": CUDA when
                the cluster has GPUs), mode "auto" resolved against what Ray has free, the
                layout checked (on an embedded Ray a layout that cannot fit raises
                `PlacementError` here, before any group starts); the choice is logged
    build       the `DisaggEngine` the router drives: prefill and decode groups (or aggregated
                ``worker`` groups), each an `LLMEngine` whose ranks a `RayLauncher` places (one
                bundle per rank: ``gpus_per_rank`` of a GPU each on CUDA, else CPUs only); its
                config is `ServeConfig.service(device)`'s `EngineSpec.disagg_config`, the builder
                the local router (`local_service`) uses too, given how the groups reach each other
    rebuild     the same factory rebuilds a lost group (`EngineLoop`'s ``rebuild``)
    in core     a lone one-rank aggregated group runs in the engine core's own process
                instead (`group_in_core`): the core actor is given its GPU (or CPU)

KV between groups: gloo on CPU; NCCL when each rank has a GPU of its own; CUDA IPC when the
groups share one GPU (``gpus_per_rank`` < 1: NCCL refuses two ranks on one device), every
group then checked onto that same GPU (`SharedGpu`).
"""

from __future__ import annotations

import os

import ray

from splitserve.cluster.placement import (CPUS_PER_RANK, EMBEDDED_PLACEMENT_WAIT_S, Placement, placement_wait_s,
                                         plan_on_cluster, resolve_device, resolve_local)
from splitserve.cluster.ray_group import RayGroupOptions, RayLauncher, SharedGpu
from splitserve.cluster.serve_config import Mode, ServeConfig
from splitserve.router.service_config import ServiceConfig
from splitserve.workers.disagg_engine import DisaggEngine, Group, GroupPolicy
from splitserve.workers.engine import LLMEngine
from splitserve.workers.roles import GroupRole


def cluster_device(cfg: ServeConfig) -> str:
    """"auto" means the cluster's GPUs if it has any (the router itself may be on a CPU node)."""
    return resolve_device(cfg.device, ray.cluster_resources())


def local_service(cfg: ServeConfig) -> ServiceConfig:
    """The router's config of ``cfg`` for groups in this process or its children, without Ray
    (`splitserve.router.local_handle.build_local_router`): validated, mode auto resolved by
    `resolve_local`, the device as configured (an engine in this process resolves "auto")."""
    return resolve_local(cfg.validate()).service()


def group_factory(device: str, cpus_per_rank: float = CPUS_PER_RANK, *, gpus_per_rank: float = 1.0,
                  placement_timeout_s: float = EMBEDDED_PLACEMENT_WAIT_S, shared_gpu: SharedGpu | None = None):
    """Builds one group's engine with its ranks on Ray actors."""
    options = RayGroupOptions(use_gpu=device.startswith("cuda"), cpus_per_rank=cpus_per_rank,
                              gpus_per_rank=gpus_per_rank, placement_timeout_s=placement_timeout_s,
                              shared_gpu=shared_gpu)

    def build(group: Group) -> LLMEngine:
        launcher = RayLauncher(group.name, group.config.parallel.tensor_parallel_size, options)
        return LLMEngine(group.config, launcher=launcher)
    return build


def group_in_core(cfg: ServeConfig) -> bool:
    """A lone one-rank aggregated group runs in the engine-core process, which then holds its
    device (as vLLM's EngineCore does with one GPU): the engine loop hands each step to the
    model directly. Through a rank process the same engine's TPOT was 12.2 ms instead of 7.9
    (H200, Llama-3-8B shape, chat at 12 req/s, 2026-12-02): each step is pickled, piped and
    unpickled on the critical path. ``cfg``: mode resolved (`Placement.apply`)."""
    w = cfg.group(GroupRole.WORKER)
    return cfg.single_group_in_core and cfg.mode == Mode.AGGREGATED and (w.count, w.tp, w.pp) == (1, 1, 1)


def in_this_process(group: Group) -> LLMEngine:
    """(Re)builds a group in the engine core's own process (`group_in_core`)."""
    return LLMEngine(group.config)


def build_engine(cfg: ServeConfig, policy: GroupPolicy,
                 placement: Placement | None = None) -> tuple[DisaggEngine, object]:
    """The engine over every group of ``cfg`` and the factory that (re)builds a group.

    ``placement``: `plan_on_cluster(cfg)` when the caller has it already (it needs the mode
    chosen: ``placement.apply(cfg)`` is the config with it); None: planned here. Raises
    `PlacementError` for a layout the cluster cannot hold."""
    placement = placement or plan_on_cluster(cfg)
    cfg = placement.apply(cfg)
    device = placement.device
    disaggregated = cfg.mode == Mode.DISAGGREGATED
    # Groups with a share of a GPU each land on one device: NCCL refuses two ranks of one
    # device, so their KV goes by CUDA IPC, and each group is checked onto that device.
    sharing = device.startswith("cuda") and cfg.gpus_per_rank < 1
    factory = group_factory(device, gpus_per_rank=cfg.gpus_per_rank, placement_timeout_s=placement_wait_s(cfg),
                            shared_gpu=SharedGpu() if sharing and disaggregated else None)
    spec = cfg.service(device).engine
    if group_in_core(cfg):
        dc = spec.disagg_config()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return DisaggEngine(dc, policy=policy), in_this_process
    store_host = ray.util.get_node_ip_address()
    # A GPU of its own per rank actor: NCCL between any two; gloo between CPU ranks.
    transport = ("cuda_ipc" if sharing else "nccl") if device.startswith("cuda") else "gloo"
    dc = spec.disagg_config(in_process=False, transport=transport if disaggregated else None, store_host=store_host)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DisaggEngine(dc, policy=policy, engine_factory=factory), factory
