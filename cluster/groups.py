"""The serving engine of a `ServeConfig`: every group's ranks as Ray actors.

Builds the `DisaggEngine` the router drives: prefill and decode groups (or aggregated
``worker`` groups), each an `LLMEngine` whose ranks a `RayLauncher` places (one bundle per
rank: a GPU each when the cluster has GPUs and the device is not forced to CPU). The same
factory rebuilds a lost group (`EngineLoop`'s ``rebuild``).
"""

from __future__ import annotations

import os

import ray

from splitserve.cluster.ray_group import RayGroupOptions, RayLauncher
from splitserve.cluster.serve_config import ServeConfig
from splitserve.workers.config import CacheConfig, ParallelConfig, SchedulerConfig
from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine, Group, GroupPolicy
from splitserve.workers.engine import EngineConfig, LLMEngine


def cluster_device(cfg: ServeConfig) -> str:
    """"auto" means the cluster's GPUs if it has any (the router itself may be on a CPU node)."""
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def engine_config(cfg: ServeConfig, role: str, device: str) -> EngineConfig:
    spec = getattr(cfg, role)
    return EngineConfig(
        model=cfg.model, device=device, dtype=cfg.dtype, max_model_len=cfg.max_model_len, show_progress=False,
        cache=CacheConfig(cfg.block_size, cfg.num_kv_blocks, cfg.kv_cache_memory),
        parallel=ParallelConfig(spec.tp, spec.pp),
        scheduler=SchedulerConfig(max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                                  async_scheduling=cfg.async_scheduling),
    )


def group_factory(device: str, cpus_per_rank: float = 1.0):
    """Builds one group's engine with its ranks on Ray actors."""
    options = RayGroupOptions(use_gpu=device.startswith("cuda"), cpus_per_rank=cpus_per_rank)

    def build(group: Group) -> LLMEngine:
        launcher = RayLauncher(group.name, group.config.parallel.tensor_parallel_size, options)
        return LLMEngine(group.config, launcher=launcher)
    return build


def build_engine(cfg: ServeConfig, policy: GroupPolicy) -> tuple[DisaggEngine, object]:
    """The engine over every group of ``cfg`` and the factory that (re)builds a group."""
    device = cluster_device(cfg)
    factory = group_factory(device)
    store_host = ray.util.get_node_ip_address()
    # One GPU per rank actor: NCCL between any two; gloo between CPU ranks.
    transport = "nccl" if device.startswith("cuda") else "gloo"
    if cfg.mode == "disaggregated":
        dc = DisaggConfig(prefill=engine_config(cfg, "prefill", device), decode=engine_config(cfg, "decode", device),
                          num_prefill=cfg.prefill.count, num_decode=cfg.decode.count, in_process=False,
                          transport=transport, store_host=store_host)
    else:
        dc = DisaggConfig(prefill=None, decode=engine_config(cfg, "worker", device), num_decode=cfg.worker.count,
                          in_process=False, store_host=store_host)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DisaggEngine(dc, policy=policy, engine_factory=factory), factory
