"""An engine core and a front-door client in this process, without Ray: for tests, and for
serving from one machine without a cluster.

Lifecycle:
    build    `build_local_router(cfg)` builds the `DisaggEngine` of a `ServeConfig` with its
             groups in this process (one 1 x 1 prefill and decode group each: both in this
             process, KV moved in memory; larger layouts: local rank processes), an
             `EngineCore` around it on ipc sockets, and one `EngineClient` connected to it.
             Requests take the same path as in `splitserve serve` (token ids over the
             sockets, one message per step, text made by the client), only the processes
             differ
    serve    `LocalRouter` is a `RouterAPI` (its client's methods), so the gRPC and HTTP front
             doors take it; `kv_state` for leak checks
    close    `close()` closes the client, then the core (its engine thread, its groups)

A lost group is not rebuilt here (that needs Ray); it stays failed and ``health`` says so.
"""

from __future__ import annotations

import os

from splitserve.cluster.serve_config import ServeConfig
from splitserve.router.engine_client import EngineClient
from splitserve.router.engine_core import CoreAddress, CoreLimits, EngineCore
from splitserve.router.messages import ModelInfo

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class LocalRouter:
    def __init__(self, core: EngineCore, client: EngineClient):
        self.core, self.client = core, client
        self.generate = client.generate
        self.abort = client.abort
        self.health = client.health
        self.ready = client.ready
        self.model_info = client.model_info
        self.metrics_text = client.metrics_text
        self.kv_state = client.kv_state
        self.door_metrics = client.door_metrics
        self.request_timeout_s = client.request_timeout_s

    def close(self) -> None:
        self.client.close()
        self.core.close()


def model_info(cfg: ServeConfig, engine) -> ModelInfo:
    """What the service tells clients about its model (fixed while the engine lives)."""
    roles = {role: (getattr(cfg, role).count, getattr(cfg, role).tp, getattr(cfg, role).pp) for role in cfg.roles()}
    return ModelInfo(cfg.model or DEFAULT_MODEL_NAME, cfg.mode, engine.decodes[0].engine.max_model_len,
                     engine.model_cfg.vocab_size, roles)


def core_limits(cfg: ServeConfig) -> CoreLimits:
    return CoreLimits(cfg.router.max_inflight, cfg.router.request_timeout_s)


def door_tokenizer(cfg: ServeConfig):
    """The front door's own tokenizer (None for a model without one): resolved from the model
    spec like the engine's, but never shared with it."""
    from splitserve.workers.model_source import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(cfg.model))


def build_local_router(cfg: ServeConfig, ready_timeout_s: float = 30.0) -> LocalRouter:
    """The service of ``cfg`` with every group in this process or its child processes."""
    # cluster.groups builds a group's EngineConfig from the ServeConfig; importing it does not
    # start Ray (only its Ray launcher would).
    from splitserve.cluster.groups import engine_config
    from splitserve.cluster.placement import resolve_local
    from splitserve.router.policies import make_policy
    from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine

    cfg = resolve_local(cfg.validate())
    if cfg.mode == "disaggregated":
        dc = DisaggConfig(prefill=engine_config(cfg, "prefill", cfg.device),
                          decode=engine_config(cfg, "decode", cfg.device),
                          num_prefill=cfg.prefill.count, num_decode=cfg.decode.count)
    else:
        dc = DisaggConfig(prefill=None, decode=engine_config(cfg, "worker", cfg.device), num_decode=cfg.worker.count)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine = DisaggEngine(dc, policy=make_policy(cfg.router.policy, cfg.block_size))
    core = EngineCore(engine, model_info(cfg, engine), CoreAddress.ipc(), core_limits(cfg))
    try:
        client = EngineClient(core.address, tokenizer=door_tokenizer(cfg),
                              request_timeout_s=cfg.router.request_timeout_s, limits=cfg.server.limits())
        client.wait_ready(ready_timeout_s)
    except BaseException:
        core.close()
        raise
    return LocalRouter(core, client)
