"""The router as the front doors see it: async calls on the Ray actor, typed errors.

`RouterHandle.generate` iterates the actor's streaming generator; a failure comes back as the
`RouterError` the router raised (its status code intact), and a router that is gone as
UNAVAILABLE. Closing the iteration early (the client went away) aborts the request, so its
blocks are freed on both sides.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import ray

from splitserve.router.messages import Chunk, ErrorCode, GenerateRequest, GroupStatus, ModelInfo, RouterError


def _router_error(err: BaseException) -> RouterError:
    cause = getattr(err, "cause", None)
    if isinstance(err, RouterError):
        return err
    if isinstance(cause, RouterError):
        return cause
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return RouterError(ErrorCode.UNAVAILABLE, f"the router is not available: {err}")
    return RouterError(ErrorCode.INTERNAL, f"{type(err).__name__}: {err}")


class RouterHandle:
    def __init__(self, actor):
        self.actor = actor

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if not request.request_id:  # named here, so an early close can abort it
            request = replace(request, request_id=uuid.uuid4().hex)
        gen = self.actor.generate.options(num_returns="streaming").remote(request)
        finished = False
        try:
            async for ref in gen:
                try:
                    chunk = await ref
                except Exception as err:  # noqa: BLE001 - typed below
                    raise _router_error(err) from None
                finished = chunk.finished
                yield chunk
        except RouterError:
            finished = True  # the router ended it and freed it already
            raise
        except Exception as err:  # noqa: BLE001 - the generator itself failed
            finished = True
            raise _router_error(err) from None
        finally:
            if not finished:
                self.actor.abort.remote(request.request_id)
            if not finished:
                ray.cancel(gen)

    async def abort(self, request_id: str) -> None:
        await self.actor.abort.remote(request_id)

    async def health(self) -> list[GroupStatus]:
        return await self.actor.health.remote()

    async def ready(self) -> bool:
        try:
            return await self.actor.ready.remote()
        except Exception:  # noqa: BLE001 - a router that cannot answer is not ready
            return False

    async def model_info(self) -> ModelInfo:
        return await self.actor.model_info.remote()

    async def metrics_text(self) -> bytes:
        return await self.actor.metrics_text.remote()
