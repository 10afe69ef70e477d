"""The router: a Ray actor that admits requests, streams their tokens back, and keeps the
groups serving.

Lifecycle of a request (`generate`, a streaming generator):
    admit      over ``max_inflight`` requests at once: RESOURCE_EXHAUSTED at once (the
               service keeps serving those it took); bad input: INVALID_ARGUMENT
    route      the engine thread (`EngineLoop`) queues it in the `DisaggEngine`, which picks
               a decode group and reserves its blocks, then a prefill group (the policy
               from `splitserve.router.policies`), prefills, moves the KV, decodes
    stream     each step's new tokens come back as a `Chunk` as soon as they exist
    end        the last chunk (``finished``); or an error: DEADLINE_EXCEEDED past the request's
               deadline, UNAVAILABLE when no group could serve it; a client that goes away
               (generator closed or cancelled) or calls `abort` frees its blocks on both sides

Groups report health through their ranks' connections (a dead actor fails its group at
once; idle groups are checked every engine step); a failed group is out of every choice,
its requests are re-sent or migrated (see `DisaggEngine`), and it is rebuilt on Ray and
rejoins. ``health`` lists every group's state; ``metrics_text`` is the Prometheus scrape.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator

import ray

from splitserve.cluster.serve_config import ServeConfig, ServerSpec
from splitserve.router.engine_loop import EngineLoop
from splitserve.router.messages import Chunk, ErrorCode, GenerateRequest, GroupStatus, ModelInfo, RouterError
from splitserve.router.metrics import RequestTimer, RouterMetrics
from splitserve.router.policies import make_policy

logger = logging.getLogger(__name__)

ROUTER_NAME = "router"


async def next_before(queue: asyncio.Queue, deadline: float):
    """The queue's next item, or TimeoutError once the running loop's clock passes ``deadline``.

    Not ``asyncio.wait_for``: on Python 3.11 it returns the item when a cancel lands in the
    same loop turn as the item, and the cancel is lost. A client that hung up then kept its
    request (and its KV blocks) until the whole answer was generated."""
    async with asyncio.timeout_at(deadline):
        return await queue.get()


class RouterCore:
    """Everything the router does, without Ray: the actor below is a thin shell around it
    (and tests or an in-process server can use it directly)."""

    def __init__(self, cfg: ServeConfig, engine, rebuild=None):
        self.cfg = cfg
        self.metrics = RouterMetrics()
        self.loop = EngineLoop(engine, rebuild=rebuild, on_output=None)
        self._inflight = 0
        self._admission = threading.Lock()

    # ---- requests --------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        request.check()
        self._admit()
        request_id = request.request_id or uuid.uuid4().hex
        timeout_s = request.timeout_s or self.cfg.router.request_timeout_s
        chunks: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        prompt = request.text if request.text is not None else (
            request.token_ids if request.token_ids is not None else request.chat)
        timer, finished = RequestTimer(), False
        try:
            self.loop.add(request_id, prompt, request.sampling,
                          lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item))
            deadline = loop.time() + timeout_s
            while not finished:
                try:
                    item = await next_before(chunks, deadline)
                except TimeoutError:
                    raise RouterError(ErrorCode.DEADLINE_EXCEEDED,
                                      f"request {request_id} passed its deadline of {timeout_s:g} s") from None
                if isinstance(item, RouterError):
                    finished = True
                    raise item
                timer.on_tokens(self.metrics, len(item.token_ids))
                if item.finished:
                    finished = True
                    timer.on_finish(self.metrics, item.finish_reason, item.prompt_tokens, item.cached_tokens)
                yield item
        except RouterError as err:
            self.metrics.errors.labels(err.code.value).inc()
            raise
        finally:
            if not finished:  # deadline, client gone or cancelled: free its blocks everywhere
                self.loop.abort(request_id)
            with self._admission:
                self._inflight -= 1
                self.metrics.inflight.set(self._inflight)

    def _admit(self) -> None:
        """Count the request in, or refuse it: over ``max_inflight`` it is RESOURCE_EXHAUSTED.
        Front doors on several threads (their own event loops) admit at once: hence the lock."""
        with self._admission:
            if self._inflight >= self.cfg.router.max_inflight:
                self.metrics.errors.labels(ErrorCode.RESOURCE_EXHAUSTED.value).inc()
                raise RouterError(ErrorCode.RESOURCE_EXHAUSTED,
                                  f"overloaded: {self._inflight} requests in flight (the limit is "
                                  f"{self.cfg.router.max_inflight}); retry later")
            self._inflight += 1
            self.metrics.inflight.set(self._inflight)

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    # ---- the service -----------------------------------------------------------------------

    def health(self) -> list[GroupStatus]:
        return list(self.loop.statuses)

    def ready(self) -> bool:
        return all(s.state == "ready" for s in self.loop.statuses)

    def model_info(self) -> ModelInfo:
        engine, cfg = self.loop.engine, self.cfg
        roles = {role: (getattr(cfg, role).count, getattr(cfg, role).tp, getattr(cfg, role).pp) for role in cfg.roles()}
        return ModelInfo(cfg.model or "SmolLM2-135M-Instruct", cfg.mode, engine.decodes[0].engine.max_model_len,
                         engine.model_cfg.vocab_size, roles)

    async def metrics_text(self) -> bytes:
        engine = self.loop.engine
        transfers = await asyncio.wrap_future(self.loop.call(lambda: _copy_metrics(engine.metrics)))
        self.metrics.observe_groups(self.loop.statuses)
        self.metrics.observe_transfers(transfers)
        return self.metrics.render()

    async def kv_state(self) -> dict:
        """Free and total blocks of every group, open transfers and live requests (leak checks)."""
        engine = self.loop.engine

        def snapshot() -> dict:
            groups = {g.name: (g.engine.block_manager.num_free_blocks, g.engine.block_manager.num_blocks)
                      for g in engine.groups if g.healthy}
            return {"groups": groups, "open_transfers": engine.num_open_transfers,
                    "live_requests": engine.num_live_requests, "inflight": self._inflight,
                    "resent": engine.num_resent}
        return await asyncio.wrap_future(self.loop.call(snapshot))

    def shutdown(self) -> None:
        self.loop.stop()


def _copy_metrics(metrics):
    from copy import copy

    out = copy(metrics)
    out.per_transfer = list(metrics.per_transfer[-1000:])
    return out


@ray.remote(num_cpus=0, max_concurrency=1000)
class Router:
    """The Ray actor (named ``router`` in the ``splitserve`` namespace). `start` builds the
    groups (slow: placement groups and model loads) on a worker thread, so the actor's event
    loop never blocks on Ray; until then it is not ready and refuses requests."""

    def __init__(self, cfg: ServeConfig):
        import torch

        torch.set_num_threads(1)  # the router schedules; the ranks compute
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = cfg
        #: The in-process view of the `RouterCore`, shared by this actor's methods and its front
        #: doors; None until `start` has built the groups.
        self._local = None
        self._servers: list = []

    async def start(self) -> None:
        from splitserve.cluster.groups import build_engine
        from splitserve.router.local_handle import LocalRouterHandle

        cfg = self.cfg
        engine, factory = await asyncio.to_thread(build_engine, cfg, make_policy(cfg.router.policy, cfg.block_size))
        self._local = LocalRouterHandle(RouterCore(cfg, engine, rebuild=factory))

    @property
    def local(self):
        """The `LocalRouterHandle` over the core (UNAVAILABLE while starting)."""
        if self._local is None:
            raise RouterError(ErrorCode.UNAVAILABLE, "the router is still starting its groups")
        return self._local

    async def generate(self, request: GenerateRequest):
        async for chunk in self.local.generate(request):  # closing early aborts the request
            yield chunk

    # The rest forward to the handle: the front doors in this process call the same methods.

    async def abort(self, request_id: str) -> None:
        await self.local.abort(request_id)

    async def health(self) -> list[GroupStatus]:
        return await self.local.health()

    async def ready(self) -> bool:
        return self._local is not None and await self._local.ready()

    async def model_info(self) -> ModelInfo:
        return await self.local.model_info()

    async def metrics_text(self) -> bytes:
        return await self.local.metrics_text()

    async def kv_state(self) -> dict:
        return await self.local.kv_state()

    async def start_front_doors(self, spec: ServerSpec) -> tuple[int, int]:
        """Serve gRPC and HTTP from this actor's process, on ``spec``'s host and ports; the
        (gRPC, HTTP) ports bound. Requests then reach the `RouterCore` in-process: no Ray
        call per request (that hop costs ~10 ms and caps the request rate; see
        benchmarks/router_overhead.py). The actor must run on the node that owns the host."""
        from splitserve.router.grpc_server import start_grpc_server
        from splitserve.router.http_server import start_http_server

        local = self.local

        def start() -> tuple[int, int]:
            self._servers.append(start_grpc_server(local, spec))
            self._servers.append(start_http_server(local, spec))
            return self._servers[0].port, self._servers[1].port
        try:
            return await asyncio.to_thread(start)
        except BaseException:
            await self.stop_front_doors()
            raise

    async def stop_front_doors(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await asyncio.to_thread(server.stop)

    async def shutdown(self) -> None:
        await self.stop_front_doors()
        if self._local is not None:
            await asyncio.to_thread(self._local.close)
