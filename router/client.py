"""Python clients of the gRPC API: `Client` (blocking) and `AsyncClient` (asyncio).

    from splitserve import Client, SamplingParams

    with Client("127.0.0.1:50051", api_key="...", tls_ca="ca.pem") as client:
        out = client.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
        print(out.text, out.finish_reason)
        for chunk in client.stream([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32)):
            print(chunk.text, end="", flush=True)

A prompt is a string, a list of token ids, or a list of chat messages ({"role", "content"}).

Lifecycle: the constructor opens a channel (TLS with ``tls_ca``, a CA file, or ``tls=True`` and
the system's roots); every call sends the API key as ``authorization: Bearer <key>`` metadata
and its timeout as the call's deadline (past it the server aborts the request and frees its
blocks). `stream` yields `Chunk`s as the server sends them, the last one ``finished`` with
the finish reason and token counts; closing a stream early cancels the call, which aborts the
request on the server (an async stream left by ``break`` is closed only when collected:
wrap it in ``contextlib.aclosing`` to cancel at once). `generate` gathers a stream into a
`Completion`. Every failure is a `RouterError` whose `ErrorCode` is the gRPC status
(UNAVAILABLE: no server answered).
`close` (or leaving the ``with`` block) closes the channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitserve.router import splitserve_pb2 as pb
from splitserve.router import splitserve_pb2_grpc as pb_grpc
from splitserve.router.convert import (
    ChunkReader, Prompt, error_code, health_from_proto, model_info_from_proto, request_to_proto,
)
from splitserve.router.messages import Chunk, Completion, HealthInfo, ModelInfo, RouterError
from splitserve.workers.sampling_params import SamplingParams

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class ClientOptions:
    """How to reach the server (shared by both clients)."""

    address: str = DEFAULT_ADDRESS
    api_key: str | None = None
    #: CA certificate file that signed the server's certificate; implies TLS.
    tls_ca: str | None = None
    #: TLS with the system's root certificates (no ``tls_ca``).
    tls: bool = False
    #: Name to check the server's certificate against, when it is not the address's host.
    tls_server_name: str | None = None
    #: Deadline of each call (seconds) unless the call gives its own; None: none.
    timeout_s: float | None = None
    max_message_bytes: int = 16 * 1024 * 1024

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None and not self.tls:
            return None
        return grpc.ssl_channel_credentials(Path(self.tls_ca).read_bytes() if self.tls_ca else None)

    def channel_options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [("grpc.max_receive_message_length", self.max_message_bytes),
                                          ("grpc.max_send_message_length", self.max_message_bytes)]
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return opts

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def _error(err: grpc.RpcError) -> RouterError:
    return RouterError(error_code(err.code()), err.details() or str(err))


def _request_id(metadata, given: str) -> str:
    return given or dict(metadata or ()).get("x-request-id", "")


class Client:
    """The blocking client (thread-safe: calls may run from several threads at once)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options):
        self.options = ClientOptions(address, **options)
        creds, opts = self.options.credentials(), self.options.channel_options()
        self._channel = (grpc.secure_channel(address, creds, opts) if creds
                         else grpc.insecure_channel(address, opts))
        self._stub = pb_grpc.GenerationStub(self._channel)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str = "",
               timeout_s: float | None = None, cache_salt: str | None = None) -> Iterator[Chunk]:
        msg = request_to_proto(prompt, params or SamplingParams(), request_id, cache_salt)
        call = self._stub.Generate(msg, metadata=self.options.metadata(), timeout=timeout_s or self.options.timeout_s)
        try:
            reader = ChunkReader(_request_id(call.initial_metadata(), request_id))
            for response in call:
                yield reader.read(response)
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            call.cancel()  # a stream left early: the server aborts the request

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str = "",
                 timeout_s: float | None = None, cache_salt: str | None = None) -> Completion:
        chunks = list(self.stream(prompt, params, request_id=request_id, timeout_s=timeout_s, cache_salt=cache_salt))
        return Completion.from_chunks(chunks[0].request_id if chunks else request_id, chunks)

    def abort(self, request_id: str) -> None:
        self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id))

    def health(self) -> HealthInfo:
        return health_from_proto(self._unary(self._stub.Health, pb.HealthRequest()))

    def model_info(self) -> ModelInfo:
        return model_info_from_proto(self._unary(self._stub.GetModelInfo, pb.ModelInfoRequest()))

    def _unary(self, method, msg):
        try:
            return method(msg, metadata=self.options.metadata(), timeout=self.options.timeout_s)
        except grpc.RpcError as err:
            raise _error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio client; create it on the event loop that uses it (``async with``)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options):
        self.options = ClientOptions(address, **options)
        creds, opts = self.options.credentials(), self.options.channel_options()
        self._channel = (grpc.aio.secure_channel(address, creds, opts) if creds
                         else grpc.aio.insecure_channel(address, opts))
        self._stub = pb_grpc.GenerationStub(self._channel)

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str = "",
                     timeout_s: float | None = None, cache_salt: str | None = None) -> AsyncIterator[Chunk]:
        msg = request_to_proto(prompt, params or SamplingParams(), request_id, cache_salt)
        call = self._stub.Generate(msg, metadata=self.options.metadata(), timeout=timeout_s or self.options.timeout_s)
        try:
            reader = ChunkReader(_request_id(await call.initial_metadata(), request_id))
            async for response in call:
                yield reader.read(response)
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            call.cancel()

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str = "",
                       timeout_s: float | None = None, cache_salt: str | None = None) -> Completion:
        chunks = [c async for c in self.stream(prompt, params, request_id=request_id, timeout_s=timeout_s,
                                               cache_salt=cache_salt)]
        return Completion.from_chunks(chunks[0].request_id if chunks else request_id, chunks)

    async def abort(self, request_id: str) -> None:
        await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id))

    async def health(self) -> HealthInfo:
        return health_from_proto(await self._unary(self._stub.Health, pb.HealthRequest()))

    async def model_info(self) -> ModelInfo:
        return model_info_from_proto(await self._unary(self._stub.GetModelInfo, pb.ModelInfoRequest()))

    async def _unary(self, method, msg):
        try:
            return await method(msg, metadata=self.options.metadata(), timeout=self.options.timeout_s)
        except grpc.RpcError as err:
            raise _error(err) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
