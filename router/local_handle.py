"""An engine core and a front-door client in this process, without Ray: for tests, and for
serving from one machine without a cluster.

Lifecycle:
    build    `build_local_router(service)` builds the `DisaggEngine` of a `ServiceConfig`
             (`EngineSpec.disagg_config`; from a `ServeConfig`: `cluster.groups.local_service`,
             which resolves mode auto) with its groups in this process (one 1 x 1 prefill
             and decode group each: both in this process, KV moved in memory; larger
             layouts: local rank processes), an
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

from splitserve.router.engine_client import EngineClient
from splitserve.router.engine_core import CoreAddress, EngineCore
from splitserve.router.messages import ModelInfo
from splitserve.router.service_config import ServiceConfig


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


def model_info(service: ServiceConfig, engine) -> ModelInfo:
    """What the service tells clients about its model (fixed while the engine lives)."""
    return ModelInfo(service.model_name, service.engine.mode.value, engine.decodes[0].engine.max_model_len,
                     engine.model_cfg.vocab_size, service.engine.roles())


def door_tokenizer(model: str | None):
    """The front door's own tokenizer (None for a model without one): resolved from the model
    spec like the engine's, but never shared with it."""
    from splitserve.workers.model_source import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(model))


def build_local_router(service: ServiceConfig, ready_timeout_s: float = 30.0) -> LocalRouter:
    """The service with every group in this process or its child processes."""
    from splitserve.router.policies import make_policy
    from splitserve.workers.disagg_engine import DisaggEngine

    spec = service.engine
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine = DisaggEngine(spec.disagg_config(), policy=make_policy(service.router.policy, spec.block_size))
    core = EngineCore(engine, model_info(service, engine), CoreAddress.ipc(), service.router.core_limits())
    try:
        client = EngineClient(core.address, tokenizer=door_tokenizer(spec.model),
                              request_timeout_s=service.router.request_timeout_s, limits=service.server.limits())
        client.wait_ready(ready_timeout_s)
    except BaseException:
        core.close()
        raise
    return LocalRouter(core, client)
