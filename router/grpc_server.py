"""The gRPC front door: service ``splitserve.v1.Generation`` (see ``splitserve.proto``).

Lifecycle:
    start    `start_grpc_server(router, spec)`: a grpc.aio server on a `LoopThread` of its
             own, bound to ``spec.host:spec.grpc_port`` (port 0: any free one; shared with
             the other front-door processes when ``share_port``), TLS when a
             cert and key are configured, messages up to ``spec.max_message_bytes``; it
             returns once the server listens
    call     with an API key configured, an interceptor answers UNAUTHENTICATED unless the
             metadata holds ``authorization: Bearer <key>``. Generate converts the proto (bad
             values: INVALID_ARGUMENT), names the request (``x-request-id`` initial
             metadata), hands the router what is left of the client's deadline as the
             request's timeout, and streams the router's chunks; a `RouterError` ends the
             call with the status of the same name
    cancel   a client that cancels, or whose deadline passes, gets its handler cancelled;
             that closes the router's iterator, which aborts the request (blocks freed)
    stop     `GrpcServer.stop`: no new calls, running ones get ``grace_s``, then the loop ends

Every call is counted in the front-door metrics (`front_door_metrics`) with its final status.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from splitserve.router import splitserve_pb2 as pb
from splitserve.router import splitserve_pb2_grpc as pb_grpc
from splitserve.router.cache_salt import tenant_key
from splitserve.router.convert import (
    grpc_status, health_to_proto, model_info_to_proto, request_from_proto, responses_from_chunk,
)
from splitserve.router.frontdoor import LoopThread, RouterAPI, api_key_ok, health_info, stream_limit_s
from splitserve.router.messages import ErrorCode, RouterError
from splitserve.router.metrics import FrontDoorMetrics, front_door_metrics
from splitserve.router.service_config import ServerSpec

logger = logging.getLogger(__name__)

API = "grpc"
SERVICE = "splitserve.v1.Generation"
METHODS = ("Generate", "Abort", "Health", "GetModelInfo")
UNAUTHENTICATED_MESSAGE = "missing or wrong API key: send the metadata 'authorization: Bearer <key>'"


@dataclass
class GrpcServer:
    port: int
    _server: grpc.aio.Server
    _thread: LoopThread

    def stop(self, grace_s: float = 5.0) -> None:
        try:
            self._thread.run(self._server.stop(grace_s), grace_s + 10.0)
        finally:
            self._thread.stop()


def start_grpc_server(router: RouterAPI, spec: ServerSpec, share_port: bool = False) -> GrpcServer:
    """Serve ``router`` over gRPC; returns once the server listens (raises if it cannot bind).
    ``share_port``: the port is shared with the other front-door processes (SO_REUSEPORT);
    otherwise a port already taken is an error."""
    thread = LoopThread("grpc-server")
    try:
        server, port = thread.run(_start(router, spec, front_door_metrics(router), share_port), 30.0)
    except BaseException:
        thread.stop()
        raise
    logger.info("gRPC listening on %s:%d%s", spec.host, port, " (TLS)" if spec.tls_cert else "")
    return GrpcServer(port, server, thread)


async def _start(router: RouterAPI, spec: ServerSpec, metrics: FrontDoorMetrics,
                 share_port: bool) -> tuple[grpc.aio.Server, int]:
    api_key = spec.resolved_api_key()
    options = [("grpc.max_receive_message_length", spec.max_message_bytes),
               ("grpc.max_send_message_length", spec.max_message_bytes),
               ("grpc.so_reuseport", 1 if share_port else 0)]
    interceptors = [_ApiKeyInterceptor(api_key, metrics)] if api_key else []
    server = grpc.aio.server(interceptors=interceptors, options=options)
    _add_servicer(_Servicer(router, metrics, tenant_key(spec)), server)
    address = f"[{spec.host}]:{spec.grpc_port}" if ":" in spec.host else f"{spec.host}:{spec.grpc_port}"
    try:
        if spec.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(spec.tls_key).read_bytes(), Path(spec.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise RuntimeError(f"gRPC server cannot listen on {address}: {err}") from None
    if port == 0:  # older grpcio report a failed bind this way
        raise RuntimeError(f"gRPC server cannot listen on {address}")
    await server.start()
    return server, port


@dataclass(frozen=True)
class _Undecodable:
    """A request message that did not parse (e.g. a string field that is not UTF-8)."""

    error: str


def _lenient(message_type):
    """A deserializer that hands an unparsable message to the method (which answers
    INVALID_ARGUMENT) instead of raising, which gRPC would answer with INTERNAL."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as err:
            return _Undecodable(str(err)[:200])
    return parse


def _add_servicer(servicer, server: grpc.aio.Server) -> None:
    """`add_GenerationServicer_to_server` with lenient deserializers for the requests that
    carry strings (the generated one raises on a malformed message: INTERNAL)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "Abort": grpc.unary_unary_rpc_method_handler(
            servicer.Abort, request_deserializer=_lenient(pb.AbortRequest),
            response_serializer=pb.AbortResponse.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=pb.HealthRequest.FromString,
            response_serializer=pb.HealthResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=pb.ModelInfoRequest.FromString,
            response_serializer=pb.ModelInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _parsed(request) -> None:
    if isinstance(request, _Undecodable):
        raise RouterError(ErrorCode.INVALID_ARGUMENT, f"the request message is malformed: {request.error}")


class _Servicer(pb_grpc.GenerationServicer):
    def __init__(self, router: RouterAPI, metrics: FrontDoorMetrics, tenant_key: str | None = None):
        self.router, self.metrics = router, metrics
        self.tenant_key = tenant_key  # per-key cache salting (`router.cache_salt`); None: off

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        code = "OK"
        try:
            _parsed(request)
            req = request_from_proto(request, request.request_id or uuid.uuid4().hex, _time_left(context),
                                     self.tenant_key)
            await context.send_initial_metadata((("x-request-id", req.request_id),))
            # Bounded even while a write waits on a client that stopped reading.
            async with asyncio.timeout(stream_limit_s(self.router, req.timeout_s)), \
                    aclosing(self.router.generate(req)) as chunks:
                async for chunk in chunks:
                    for response in responses_from_chunk(chunk):
                        yield response
        except TimeoutError:
            code = ErrorCode.DEADLINE_EXCEEDED.value
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the stream passed its deadline")
        except RouterError as err:
            code = err.code.value
            await context.abort(grpc_status(err.code), err.message)
        except (asyncio.CancelledError, GeneratorExit):  # the client went away or its deadline passed
            left = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
            raise
        except Exception as err:  # noqa: BLE001 - a bug answers INTERNAL, the server goes on
            code = "INTERNAL"
            logger.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            self.metrics.count(API, "Generate", code)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if isinstance(request, _Undecodable):
            self.metrics.count(API, "Abort", "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request message is malformed: {request.error}")
        if not request.request_id:
            self.metrics.count(API, "Abort", "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        await self._call(context, "Abort", self.router.abort(request.request_id))
        return pb.AbortResponse()

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return health_to_proto(await self._call(context, "Health", health_info(self.router)))

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext):
        return model_info_to_proto(await self._call(context, "GetModelInfo", self.router.model_info()))

    async def _call(self, context: grpc.aio.ServicerContext, method: str, call):
        """Await a router call; a failure ends the RPC with its status (UNAVAILABLE if the
        router itself cannot answer)."""
        try:
            result = await call
        except RouterError as err:
            self.metrics.count(API, method, err.code.value)
            await context.abort(grpc_status(err.code), err.message)
        except Exception as err:  # noqa: BLE001 - e.g. the router actor is gone
            self.metrics.count(API, method, ErrorCode.UNAVAILABLE.value)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the router cannot answer: {err}")
        self.metrics.count(API, method, "OK")
        return result


def _time_left(context: grpc.aio.ServicerContext) -> float | None:
    """What is left of the client's deadline (None: it set none)."""
    left = context.time_remaining()
    if left is None or left > 1e9:  # no deadline: grpc reports a huge number
        return None
    if left <= 0:
        raise RouterError(ErrorCode.DEADLINE_EXCEEDED, "the call's deadline passed before it started")
    return left


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <key>`` in its metadata."""

    def __init__(self, api_key: str, metrics: FrontDoorMetrics):
        self._api_key, self._metrics = api_key, metrics
        self._deny_stream = grpc.unary_stream_rpc_method_handler(_deny)
        self._deny_unary = grpc.unary_unary_rpc_method_handler(_deny)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        metadata = dict(details.invocation_metadata or ())
        if api_key_ok(metadata.get("authorization"), self._api_key):
            return await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        # Only the service's own methods by name: random method names must not grow the labels.
        self._metrics.count(API, method if method in METHODS else "other", ErrorCode.UNAUTHENTICATED.value)
        # The refusal must be a handler of the method's kind (Generate streams its answer).
        return self._deny_stream if method == "Generate" else self._deny_unary


async def _deny(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
