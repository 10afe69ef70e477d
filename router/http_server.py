"""The OpenAI-compatible HTTP front door (FastAPI on uvicorn), with /health and /metrics.

Routes:
    GET  /v1/models             the served model (its ``id`` is the ``model`` requests name)
    POST /v1/completions        ``prompt``: a string, token ids, or a list of either (one
                                choice per prompt)
    POST /v1/chat/completions   ``messages`` rendered with the model's chat template
    GET  /health                200 when every group is ready, else 503 (no key: for probes)
    GET  /live                  200 while this front door's process serves (a liveness probe:
                                a group being rebuilt must not restart the pod)
    GET  /ready                 200 when the service can take requests: the engine core
                                answers and at least one group of each role it needs is ready
    GET  /metrics               Prometheus text: the router's metrics, then the front doors'

Lifecycle:
    start    `start_http_server(router, spec)`: binds ``spec.host:spec.http_port`` (port 0:
             any free one; shared with the other front-door processes when ``share_port``),
             serves on a `LoopThread` of its own (TLS when a cert and key are
             configured), returns once uvicorn has started
    request  with an API key configured, /v1 needs ``Authorization: Bearer <key>`` (401
             otherwise); the body is parsed (`openai_api`), each prompt becomes a router
             request, and the first chunk is awaited before answering, so a refused request
             gets its status (400, 429, 503, 504 ...) rather than a broken stream
    stream   ``stream: true``: one SSE event per chunk, a usage event with
             ``stream_options.include_usage``, then ``data: [DONE]``; a failure after the
             first event is an in-band ``{"error": ...}`` event; a client that disconnects
             cancels the stream, which aborts its requests (blocks freed)
    stop     `HttpServer.stop`: uvicorn finishes open requests (``grace_s``), the loop ends

Errors are OpenAI-shaped, ``{"error": {"message", "type", "code"}}``, with the HTTP status of
the router's `ErrorCode` (`HTTP_STATUS`); ``code`` is that ErrorCode's name.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from splitserve.router import openai_api as oa
from splitserve.router.cache_salt import door_cache_salt, tenant_key
from splitserve.router.convert import DEFAULT_MAX_TOKENS
from splitserve.router.frontdoor import (LoopThread, RouterAPI, api_key_ok, can_serve, check_request,
                                         health_info, stream_limit_s)
from splitserve.router.messages import Chunk, Completion, ErrorCode, GenerateRequest, ModelInfo, RouterError, short
from splitserve.router.metrics import FrontDoorMetrics, front_door_metrics
from splitserve.router.service_config import ServerSpec

API = "http"
HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.UNAUTHENTICATED: 401, ErrorCode.NOT_FOUND: 404,
    ErrorCode.RESOURCE_EXHAUSTED: 429, ErrorCode.CANCELLED: 499, ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503, ErrorCode.DEADLINE_EXCEEDED: 504, ErrorCode.ALREADY_EXISTS: 409,
}
_ERROR_TYPE = {
    ErrorCode.INVALID_ARGUMENT: "invalid_request_error", ErrorCode.UNAUTHENTICATED: "authentication_error",
    ErrorCode.NOT_FOUND: "not_found_error", ErrorCode.RESOURCE_EXHAUSTED: "rate_limit_error",
    ErrorCode.CANCELLED: "cancelled", ErrorCode.INTERNAL: "internal_error",
    ErrorCode.UNAVAILABLE: "service_unavailable_error", ErrorCode.DEADLINE_EXCEEDED: "timeout_error",
    ErrorCode.ALREADY_EXISTS: "conflict_error",
}
UNAUTHENTICATED_MESSAGE = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"


#: The routes counted by name in the metrics; any other path is counted as "other", so a
#: client probing random paths cannot grow the label set.
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


def error_body(err: RouterError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": _ERROR_TYPE[err.code], "code": err.code.value}}


def error_response(err: RouterError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=HTTP_STATUS[err.code])


# ---- the server -----------------------------------------------------------------------------

@dataclass
class HttpServer:
    port: int
    _server: uvicorn.Server
    _serving: Any  # concurrent.futures.Future of uvicorn's serve()
    _thread: LoopThread

    def stop(self, grace_s: float = 5.0) -> None:
        self._server.should_exit = True
        try:
            self._serving.result(grace_s + 10.0)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        finally:
            self._thread.stop()


def start_http_server(router: RouterAPI, spec: ServerSpec, share_port: bool = False,
                      startup_timeout_s: float = 30.0) -> HttpServer:
    """Serve ``router`` over HTTP; returns once uvicorn accepts connections. ``share_port``:
    the port is shared with the other front-door processes (SO_REUSEPORT: the kernel spreads
    new connections over them)."""
    sock = _bind(spec.host, spec.http_port, share_port)
    config = uvicorn.Config(build_app(router, spec), log_level="warning", access_log=False, lifespan="off",
                            ssl_certfile=spec.tls_cert, ssl_keyfile=spec.tls_key, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = LoopThread("http-server")
    serving = thread.submit(server.serve(sockets=[sock]))
    deadline = time.monotonic() + startup_timeout_s
    while not server.started and not serving.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        thread.stop()
        sock.close()
        if serving.done() and serving.exception() is not None:
            raise RuntimeError(f"HTTP server failed to start: {serving.exception()}")
        raise RuntimeError(f"HTTP server did not start within {startup_timeout_s:g} s")
    return HttpServer(sock.getsockname()[1], server, serving, thread)


def _bind(host: str, port: int, share_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=share_port)
    except OSError as err:
        raise RuntimeError(f"HTTP server cannot listen on {host}:{port}: {err}") from None


def build_app(router: RouterAPI, spec: ServerSpec) -> FastAPI:
    doors = _Routes(router, front_door_metrics(router), tenant_key(spec))
    app = FastAPI(title="splitserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/v1/models", doors.models, methods=["GET"])
    app.add_api_route("/v1/completions", doors.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", doors.chat, methods=["POST"])
    app.add_api_route("/health", doors.health, methods=["GET"])
    app.add_api_route("/live", doors.live, methods=["GET"])
    app.add_api_route("/ready", doors.ready, methods=["GET"])
    app.add_api_route("/metrics", doors.metrics_text, methods=["GET"])
    app.add_exception_handler(RouterError, doors.on_router_error)
    app.add_exception_handler(RequestValidationError, doors.on_bad_body)
    app.add_exception_handler(HTTPException, doors.on_http_error)
    app.add_exception_handler(Exception, doors.on_bug)
    api_key = spec.resolved_api_key()
    # Added last, so it runs first: an oversized body is refused before auth reads a header more.
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key, metrics=doors.metrics)
    app.add_middleware(_BodyLimit, max_bytes=spec.max_request_bytes, metrics=doors.metrics)
    return app


# After refusing an oversize body, how long the rest is read and discarded before the
# connection closes (a lingering close, as nginx's lingering_time / lingering_timeout): closing
# a socket with unread bytes in its receive queue sends RST, and a client still writing its body
# then loses the 413 it was sent. Time-bounded, never buffered: the bytes are dropped as read.
LINGER_TOTAL_S = 2.0
LINGER_IDLE_S = 0.5


class _BodyLimit:
    """413 for a body over ``max_bytes``: at once when its Content-Length says so, else as
    soon as the bytes received pass the limit (a chunked body), before the rest is read.
    The 413 is written whole, then the rest of the body is discarded for at most
    `LINGER_TOTAL_S` before the connection closes, so the client reads the answer."""

    def __init__(self, app, max_bytes: int, metrics: FrontDoorMetrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        seen = 0
        over = ended = False

        async def counted():
            nonlocal seen, over, ended
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if seen > self.max_bytes:
                    over = True
                    raise HTTPException(413, f"the request body passed {self.max_bytes} bytes")
            return message

        async def send_lingering_once_over(message):
            # A body whose last message crossed the limit has nothing left to drain.
            await (_send_lingering(receive, send, message, drain=not ended) if over else send(message))
        await self.app(scope, counted, send_lingering_once_over)

    async def _refuse(self, scope, receive, send) -> None:
        self.metrics.count(API, route_label(scope["path"]), ErrorCode.INVALID_ARGUMENT.value)
        err = RouterError(ErrorCode.INVALID_ARGUMENT, f"the request body is over {self.max_bytes} bytes")
        response = JSONResponse(error_body(err), status_code=413)

        async def lingering(message):
            await _send_lingering(receive, send, message)
        await response(scope, receive, lingering)


async def _send_lingering(receive, send, message, drain: bool = True) -> None:
    """Pass one message of a refusal on, marking the connection to close; the last body
    message is sent as not-last, the unread request body discarded (bounded in time), and
    only then the response ended, which closes the connection (``Connection: close``)."""
    if message["type"] == "http.response.start":
        headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
        await send({**message, "headers": [*headers, (b"connection", b"close")]})
        return
    if message["type"] != "http.response.body" or message.get("more_body", False):
        await send(message)
        return
    await send({**message, "more_body": True})
    if drain:
        await _discard_body(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _discard_body(receive) -> None:
    """Read and drop the request body until it ends, the client goes, it idles for
    `LINGER_IDLE_S`, or `LINGER_TOTAL_S` has passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_TOTAL_S
    while (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), min(left, LINGER_IDLE_S))
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class _ApiKeyMiddleware:
    """A plain ASGI middleware (it runs before the body is read, and leaves streams alone):
    /v1 requests without the key get 401."""

    def __init__(self, app, api_key: str, metrics: FrontDoorMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not api_key_ok(given, self.api_key):
                self.metrics.count(API, route_label(scope["path"]), ErrorCode.UNAUTHENTICATED.value)
                response = error_response(RouterError(ErrorCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE))
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BoundedStream(StreamingResponse):
    """An SSE response that ends at its limit even while blocked writing to a client that
    stopped reading: the connection is dropped then (the request itself ended in the core
    at its deadline, its blocks freed)."""

    def __init__(self, content, limit_s: float, **kwargs):
        super().__init__(content, **kwargs)
        self._limit_s = limit_s

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with asyncio.timeout(self._limit_s):
                await super().__call__(scope, receive, send)
        except TimeoutError:
            pass  # the response is left incomplete: the server closes the connection


# ---- the routes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shape:
    """What differs between /v1/completions and /v1/chat/completions."""

    prefix: str
    body: Callable[..., dict[str, Any]]
    event: Callable[..., dict[str, Any]]
    #: (index, text, token_ids or None, finish_reason, first event of this index) -> choice
    choice: Callable[[int, str, list[int] | None, str | None, bool], dict[str, Any]]


_COMPLETION = _Shape("cmpl", oa.completion_body, oa.completion_event,
                     lambda i, text, ids, reason, first: oa.completion_choice(i, text, ids, reason))
_CHAT = _Shape("chatcmpl", oa.chat_body, oa.chat_event,
               lambda i, text, ids, reason, first: oa.chat_choice(
                   i, {"role": "assistant", "content": text} if first else ({"content": text} if text else {}),
                   ids, reason))


class _Routes:
    def __init__(self, router: RouterAPI, metrics: FrontDoorMetrics, tenant_key: str | None = None):
        self.router, self.metrics = router, metrics
        self.tenant_key = tenant_key  # per-key cache salting (`router.cache_salt`); None: off
        self._info: ModelInfo | None = None

    async def info(self) -> ModelInfo:
        if self._info is None:  # the model never changes while the router lives
            self._info = await self.router.model_info()
        return self._info

    async def models(self) -> dict[str, Any]:
        info = await self.info()
        self.metrics.count(API, "/v1/models", "OK")
        return {"object": "list", "data": [{"id": info.model, "object": "model", "created": 0,
                                            "owned_by": "splitserve", "max_model_len": info.max_model_len}]}

    async def completions(self, body: oa.CompletionRequest, raw: Request) -> Response:
        sampling = await self._checked(body, DEFAULT_MAX_TOKENS)
        inputs = [dict(text=p) if isinstance(p, str) else dict(token_ids=p) for p in body.prompts()]
        return await self._unless_disconnected(raw, self._generate(raw.url.path, _COMPLETION, body, inputs, sampling))

    async def chat(self, body: oa.ChatRequest, raw: Request) -> Response:
        # No max_tokens: as many as the model's length allows (OpenAI's default).
        sampling = await self._checked(body, (await self.info()).max_model_len)
        return await self._unless_disconnected(
            raw, self._generate(raw.url.path, _CHAT, body, [dict(chat=body.chat())], sampling))

    async def _unless_disconnected(self, raw: Request, work) -> Response:
        """Run ``work`` (up to the whole answer, or a stream's start) unless the client hangs up
        first: then it is cancelled, which aborts its requests (a client that timed out must not
        hold KV blocks until its answer is done)."""
        task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(raw))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():  # the client left, or this handler itself is cancelled
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            self.metrics.count(API, raw.url.path, ErrorCode.CANCELLED.value)
            return Response(status_code=HTTP_STATUS[ErrorCode.CANCELLED])  # nobody reads it
        return task.result()

    async def _checked(self, body: oa._Body, default_max_tokens: int):
        body.check_supported()
        info = await self.info()
        if body.model is not None and body.model != info.model:
            raise RouterError(ErrorCode.NOT_FOUND, f"model {short(body.model)} is not served here; this server "
                              f"serves {info.model!r} (GET /v1/models)")
        return body.sampling(default_max_tokens)

    async def _generate(self, path: str, shape: _Shape, body: oa._Body, inputs: list[dict], sampling) -> Response:
        base = f"{shape.prefix}-{uuid.uuid4().hex}"
        ids = [base] if len(inputs) == 1 else [f"{base}-{i}" for i in range(len(inputs))]
        salt = door_cache_salt(body.cache_salt, self.tenant_key)
        requests = [GenerateRequest(request_id=rid, sampling=sampling, timeout_s=body.timeout_s, cache_salt=salt, **x)
                    for rid, x in zip(ids, inputs)]
        for request in requests:
            check_request(request)
        events = _merge([self.router.generate(r) for r in requests])
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        head = (base, int(time.time()), (await self.info()).model)
        if body.stream:
            return _BoundedStream(self._sse(path, shape, body, head, first, events),
                                  stream_limit_s(self.router, body.timeout_s), media_type="text/event-stream")
        results = await _collect(ids, first, events)
        self.metrics.count(API, path, "OK")
        return JSONResponse(shape.body(*head, results, body.return_token_ids))

    async def _sse(self, path: str, shape: _Shape, body: oa._Body, head: tuple, first: tuple[int, Chunk],
                   events: AsyncIterator[tuple[int, Chunk]]) -> AsyncIterator[str]:
        code, started, finished = "OK", set(), []
        try:
            async with aclosing(events):
                async for i, chunk in _prepend(first, events):
                    ids = chunk.token_ids if body.return_token_ids else None
                    choice = shape.choice(i, chunk.text, ids, chunk.finish_reason if chunk.finished else None,
                                          i not in started)
                    started.add(i)
                    if chunk.finished:
                        finished.append(chunk)
                    yield _sse(shape.event(*head, [choice], body.include_usage))
            if body.include_usage:
                yield _sse(shape.event(*head, [], True, oa.usage(finished)))
        except RouterError as err:
            code = err.code.value
            yield _sse(error_body(err))
        except BaseException:  # the client went away (cancelled) or the server stops
            code = ErrorCode.CANCELLED.value
            raise
        finally:
            self.metrics.count(API, path, code)
        yield "data: [DONE]\n\n"

    async def health(self) -> JSONResponse:
        try:
            health = await health_info(self.router)
        except Exception as err:  # noqa: BLE001 - a router that cannot answer is not healthy
            return JSONResponse({"status": "unavailable", "error": str(err), "groups": []}, status_code=503)
        groups = [{"name": g.name, "role": g.role, "state": g.state, "error": g.error} for g in health.groups]
        return JSONResponse({"status": "ok" if health.ready else "unavailable", "groups": groups},
                            status_code=200 if health.ready else 503)

    async def live(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(self) -> JSONResponse:
        try:
            groups = await self.router.health()
        except Exception as err:  # noqa: BLE001 - an engine core that cannot answer: not ready
            return JSONResponse({"status": "unavailable", "error": str(err)}, status_code=503)
        ok = can_serve(groups)
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def metrics_text(self) -> Response:
        try:
            text = await self.router.metrics_text()
        except Exception as err:  # noqa: BLE001
            return Response(f"the router cannot answer: {err}\n", status_code=503, media_type="text/plain")
        return Response(text, media_type=CONTENT_TYPE_LATEST)  # every door's counters are in it

    # ---- errors ---------------------------------------------------------------------------------

    async def on_router_error(self, request: Request, err: RouterError) -> JSONResponse:
        self._count(request, err.code.value)
        return error_response(err)

    async def on_bad_body(self, request: Request, err: RequestValidationError) -> JSONResponse:
        self._count(request, ErrorCode.INVALID_ARGUMENT.value)
        return error_response(RouterError(ErrorCode.INVALID_ARGUMENT, _describe(err.errors())))

    async def on_http_error(self, request: Request, err: HTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if err.status_code in (404, 405) else ErrorCode.INVALID_ARGUMENT
        return JSONResponse(error_body(RouterError(code, f"{request.method} {request.url.path}: {err.detail}")),
                            status_code=err.status_code)

    async def on_bug(self, request: Request, err: Exception) -> JSONResponse:
        self._count(request, ErrorCode.INTERNAL.value)
        return error_response(RouterError(ErrorCode.INTERNAL, f"{type(err).__name__}: {err}"))

    def _count(self, request: Request, code: str) -> None:
        if request.url.path.startswith("/v1/"):
            self.metrics.count(API, route_label(request.url.path), code)


def _describe(errors: list[dict[str, Any]]) -> str:
    """Pydantic's errors as one line naming each field, e.g. "max_tokens: Input should be a valid integer"."""
    parts = []
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"] or ["body"]
        parts.append(f"{'.'.join(loc)}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request body: " + "; ".join(parts) + more


async def _collect(ids: list[str], first: tuple[int, Chunk],
                   events: AsyncIterator[tuple[int, Chunk]]) -> list[Completion]:
    """Each request's whole result, from the merged stream."""
    chunks: list[list[Chunk]] = [[] for _ in ids]
    chunks[first[0]].append(first[1])
    async with aclosing(events):
        async for i, chunk in events:
            chunks[i].append(chunk)
    return [Completion.from_chunks(rid, c) for rid, c in zip(ids, chunks)]


async def _disconnected(raw: Request) -> None:
    """Returns when the client closes the connection (its body has been read already)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


async def _prepend(first, rest: AsyncIterator):
    yield first
    async for item in rest:
        yield item


async def _merge(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of several requests as they come, each with its request's index; the first
    error ends them all (closing this iterator aborts the requests still running)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((index, chunk))
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, err))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
