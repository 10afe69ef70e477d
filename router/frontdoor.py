"""What the two front doors (gRPC, HTTP) share: the router interface they call, the thread
their event loop runs on, and the API-key check.

Lifecycle of a front door: ``start_*_server`` starts a `LoopThread` (an asyncio loop on a
daemon thread of its own, so the caller, e.g. ``splitserve serve``, stays synchronous), starts
the server on that loop, and returns once it listens; requests run as tasks on that loop, each
iterating the router's async generator there (the router's sinks wake the loop that consumes
them); ``stop`` stops the server (in-flight requests get a grace period, then are cancelled,
which aborts them in the router) and then the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from splitserve.router.messages import (
    Chunk, ErrorCode, GenerateRequest, GroupStatus, HealthInfo, ModelInfo, RouterError,
)


class RouterAPI(Protocol):
    """What a front door needs of the service: `EngineClient` (over the engine core's
    sockets) and `LocalRouter` (a core and a client in this process) are one; so is any
    stand-in a test serves. ``request_timeout_s``, when present, bounds every stream."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """The request's chunks, the last ``finished``; errors are `RouterError`s. Closing the
        iterator early aborts the request."""

    async def abort(self, request_id: str) -> None: ...

    async def health(self) -> list[GroupStatus]: ...

    async def ready(self) -> bool: ...

    async def model_info(self) -> ModelInfo: ...

    async def metrics_text(self) -> bytes: ...


@dataclass(frozen=True)
class RequestLimits:
    """What one request may carry, checked at the front door before any work on it (a
    tokenizer run, a copy, a scan): beyond a limit the request is INVALID_ARGUMENT (HTTP 400),
    a body beyond ``max_request_bytes`` is 413 before it is read past the limit. Each is a
    `ServerSpec` field of the same name (YAML ``server:``)."""

    #: HTTP request body (gRPC messages: ``max_message_bytes``).
    max_request_bytes: int = 8 * 1024 * 1024
    #: Characters of a text prompt, or of all of a chat's contents.
    max_prompt_chars: int = 1024 * 1024
    max_stop_strings: int = 32
    max_stop_chars: int = 256
    max_stop_token_ids: int = 128

    def check(self, request: GenerateRequest) -> None:
        chars = len(request.text) if request.text is not None else (
            sum(len(m.get("content", "")) for m in request.chat) if request.chat is not None else 0)
        if chars > self.max_prompt_chars:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, f"the prompt has {chars} characters; this server takes at "
                              f"most {self.max_prompt_chars}")
        params = request.sampling
        if len(params.stop) > self.max_stop_strings:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, f"{len(params.stop)} stop strings; at most "
                              f"{self.max_stop_strings}")
        longest = max((len(s) for s in params.stop), default=0)
        if longest > self.max_stop_chars:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, f"a stop string of {longest} characters; at most "
                              f"{self.max_stop_chars}")
        if len(params.stop_token_ids) > self.max_stop_token_ids:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, f"{len(params.stop_token_ids)} stop token ids; at most "
                              f"{self.max_stop_token_ids}")


#: Seconds a stream may outlive its request's deadline before the front door drops its
#: connection: the core ends the request at the deadline, but a client that stopped reading
#: leaves the door blocked on a write that never completes.
STREAM_GRACE_S = 5.0


def stream_limit_s(router: RouterAPI, timeout_s: float | None) -> float:
    """How long a front door lets one stream run at most: the request's deadline (at most the
    service's ``request_timeout_s``) plus `STREAM_GRACE_S`."""
    server_limit = getattr(router, "request_timeout_s", 600.0)
    return min(timeout_s or server_limit, server_limit) + STREAM_GRACE_S


def check_request(request: GenerateRequest) -> GenerateRequest:
    """`GenerateRequest.check`, plus what the router does not catch itself: an empty token-id
    prompt (the router's engine thread cannot take one)."""
    request.check()
    if request.token_ids is not None and not request.token_ids:
        raise RouterError(ErrorCode.INVALID_ARGUMENT, "empty prompt: give at least one prompt token id")
    return request


def can_serve(groups: list[GroupStatus]) -> bool:
    """At least one ready group of every role the service has (a group being rebuilt does
    not stop the others from serving)."""
    roles = {g.role for g in groups}
    return bool(roles) and all(any(g.state == "ready" for g in groups if g.role == role) for role in roles)


async def health_info(router: RouterAPI) -> HealthInfo:
    groups = await router.health()
    return HealthInfo(bool(groups) and all(g.state == "ready" for g in groups), groups)


def api_key_ok(authorization: str | None, api_key: str | None) -> bool:
    """True when no key is configured or the header is ``Bearer <key>`` (the scheme in any
    case, RFC 7235; the key compared in constant time)."""
    if api_key is None:
        return True
    scheme, _, given = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


class LoopThread:
    """An asyncio event loop running on a daemon thread of its own."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        """Run ``coro`` on the loop and wait for its result (or its exception)."""
        return self.submit(coro).result(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel what still runs on the loop, then end the loop and its thread."""
        if not self._thread.is_alive():
            return
        try:
            self.run(_cancel_others(), timeout_s)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
