"""The router in this process, without Ray: for tests, and for serving from one machine.

Lifecycle:
    build    `build_local_router(cfg)` builds the `DisaggEngine` of a `ServeConfig` with its
             groups in this process (one 1 x 1 prefill and decode group each: both in this
             process, KV moved in memory; larger layouts: local rank processes), and a
             `RouterCore` (its engine thread) around it
    serve    `LocalRouterHandle` has the interface of `RouterHandle` (`RouterAPI`), so the
             gRPC and HTTP front doors take either. Each request's generator runs on the
             event loop that iterates it (the router's sinks wake that loop), so front
             doors on different loops and threads can share one handle
    close    `close()` stops the engine thread and shuts the groups down

A lost group is not rebuilt here (that needs Ray); it stays failed and ``health`` says so.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import aclosing

from splitserve.cluster.serve_config import ServeConfig
from splitserve.router.messages import Chunk, GenerateRequest, GroupStatus, ModelInfo
from splitserve.router.router import RouterCore


class LocalRouterHandle:
    def __init__(self, core: RouterCore):
        self.core = core

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        # aclosing: closing this iterator early closes the core's, which aborts the request.
        async with aclosing(self.core.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def health(self) -> list[GroupStatus]:
        return self.core.health()

    async def ready(self) -> bool:
        return self.core.ready()

    async def model_info(self) -> ModelInfo:
        return self.core.model_info()

    async def metrics_text(self) -> bytes:
        return await self.core.metrics_text()

    async def kv_state(self) -> dict:
        return await self.core.kv_state()

    def close(self) -> None:
        self.core.shutdown()


def build_local_router(cfg: ServeConfig) -> LocalRouterHandle:
    """The router of ``cfg`` with every group in this process or its child processes."""
    # cluster.groups builds a group's EngineConfig from the ServeConfig; importing it does not
    # start Ray (only its Ray launcher would).
    from splitserve.cluster.groups import engine_config
    from splitserve.router.policies import make_policy
    from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine

    cfg = cfg.validate()
    if cfg.mode == "disaggregated":
        dc = DisaggConfig(prefill=engine_config(cfg, "prefill", cfg.device),
                          decode=engine_config(cfg, "decode", cfg.device),
                          num_prefill=cfg.prefill.count, num_decode=cfg.decode.count)
    else:
        dc = DisaggConfig(prefill=None, decode=engine_config(cfg, "worker", cfg.device), num_decode=cfg.worker.count)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine = DisaggEngine(dc, policy=make_policy(cfg.router.policy, cfg.block_size))
    return LocalRouterHandle(RouterCore(cfg, engine))
