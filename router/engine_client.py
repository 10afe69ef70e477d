"""A front door's view of the engine core: the router interface (`RouterAPI`) over two local
sockets, with tokenization, chat templates, detokenization and stop strings done here.

Lifecycle:
    connect   `EngineClient(address, door, tokenizer)` PUSHes to the core's input and
              SUBscribes to its output (its own topic and the beats); an I/O thread of its own
              reads every message as it comes. `wait_ready` returns once the core's first beat
              arrived (a subscription is live only then)
    generate  the prompt is tokenized here (a chat rendered with the template; long text on a
              worker thread); stop strings stay here and the core gets the rest of the
              sampling params. The request's stream is a small buffer: each core step's
              `StepOutputs` appends the new token ids of every request in it, and wakes each
              consuming event loop once per step (not per token). A consumer that reads slowly
              finds several steps' tokens merged: the buffer holds at most the request's own
              tokens, never a queue of messages. Text is made when the consumer reads
              (`StreamText`)
    end       the core's last delta (finish reason or error), a stop string matched here
              (then the core is told to abort), the deadline (enforced by the core; this
              side waits a little longer, then gives up itself), or the consumer closing the
              stream (the core aborts it, blocks freed)
    faults    the core's socket closing (its process ended: seen at once), no core beat for
              `DEAD_AFTER_S` (a core that hangs), or a beat from a new core incarnation: every
              open stream ends with UNAVAILABLE and `health` raises until beats return
    close     the I/O thread ends, the sockets close
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq

from splitserve.router import core_messages as cm
from splitserve.router.engine_core import CoreAddress
from splitserve.router.frontdoor import RequestLimits
from splitserve.router.messages import Chunk, ErrorCode, GenerateRequest, GroupStatus, ModelInfo, RouterError, short
from splitserve.router.metrics import FrontDoorMetrics
from splitserve.router.stream_text import StreamText

logger = logging.getLogger(__name__)

#: Text longer than this is tokenized on a worker thread, so the door's loop keeps streaming.
_LONG_TEXT = 16_384
#: Extra seconds this side waits past a request's deadline before ending it itself (the core
#: ends it at the deadline; this only covers a core that stopped answering for that request).
_GRACE_S = 5.0
_SNDHWM = 10_000


@dataclass
class _Stream:
    """One request's buffer between the I/O thread and the coroutine that reads it."""

    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[int] = field(default_factory=list)
    end: cm.RequestDelta | None = None


class EngineClient:
    def __init__(self, address: CoreAddress, door: str | None = None, tokenizer=None,
                 request_timeout_s: float = 600.0, limits: RequestLimits = RequestLimits(),
                 context: zmq.Context | None = None):
        self.door = door or uuid.uuid4().hex[:12]
        self.tokenizer = tokenizer
        self.limits = limits
        self.request_timeout_s = request_timeout_s
        ctx = context or zmq.Context.instance()
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, _SNDHWM)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(address.input)
        self._push_lock = threading.Lock()  # loops of both servers and the I/O thread send
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, 0)  # this thread reads as fast as it can
        self._sub.setsockopt(zmq.SUBSCRIBE, self.door.encode())
        self._sub.setsockopt(zmq.SUBSCRIBE, cm.ALL)
        # The socket's own events: a core process that dies closes its end, seen here at once
        # (its beats stopping is the fallback, for a core that hangs).
        self._monitor = self._sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sub.connect(address.output)
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._queries: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._query_ids = itertools.count()
        #: This door's request counters; its beats carry them to the core.
        self.door_metrics = FrontDoorMetrics()
        #: The last beat's view of the core (I/O thread writes, anyone reads).
        self._groups: list[GroupStatus] = []
        self._incarnation: str | None = None
        self._last_beat = 0.0
        self._alive = False
        self._down_reason = "the engine core has not answered yet"
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._info: ModelInfo | None = None
        self._io = threading.Thread(target=self._serve, name=f"door-{self.door}-io", daemon=True)
        self._io.start()

    def wait_ready(self, timeout_s: float) -> None:
        if not self._ready.wait(timeout_s):
            raise RouterError(ErrorCode.UNAVAILABLE, f"the engine core did not answer within {timeout_s:g} s")

    # ---- RouterAPI ---------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        request.check()
        self.limits.check(request)  # before any work on it: a tokenizer run, a copy, a scan
        request_id = request.request_id or uuid.uuid4().hex
        prompt_ids = await self._prompt_ids(request)
        params = request.sampling
        if params.stop and self.tokenizer is None:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, "stop strings need a tokenizer; this model has none "
                                                          "(use stop_token_ids)")
        self._check_alive()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        with self._lock:
            if request_id in self._streams:
                raise RouterError(ErrorCode.ALREADY_EXISTS, f"request id {short(request_id)} is already in use")
            self._streams[request_id] = stream
        timeout_s = min(request.timeout_s or self.request_timeout_s, self.request_timeout_s)
        deadline = loop.time() + timeout_s + _GRACE_S
        text = StreamText(self.tokenizer, prompt_ids, params)
        ended_here = finished = False
        try:
            self._send(cm.AddRequest(self.door, request_id, prompt_ids, params.with_(stop=()) if params.stop else params,
                                     timeout_s, request.cache_salt))
            while not finished:
                try:
                    async with asyncio.timeout_at(deadline):
                        await stream.event.wait()
                except TimeoutError:
                    raise RouterError(ErrorCode.DEADLINE_EXCEEDED,
                                      f"request {request_id} passed its deadline of {timeout_s:g} s") from None
                stream.event.clear()
                tokens, end = stream.tokens, stream.end
                stream.tokens = []
                if end is not None and end.error_code is not None:
                    finished = True
                    raise RouterError(ErrorCode[end.error_code], end.error_message or end.error_code)
                update = text.add(tokens, end.finish_reason if end is not None else None)
                finished = update.finish_reason is not None
                ended_here = finished and end is None
                if not (update.token_ids or update.text or finished):
                    continue
                yield Chunk(request_id, update.token_ids, update.text, finished, update.finish_reason,
                            len(prompt_ids), text.num_tokens, end.cached_tokens if end is not None else 0)
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished or ended_here:  # client gone, deadline, or a stop string: free it there
                self._send_quietly(cm.AbortRequest(self.door, request_id))

    async def abort(self, request_id: str) -> None:
        """Abort one of this door's requests (ids are scoped per door in the core)."""
        self._send(cm.AbortRequest(self.door, request_id))

    async def health(self) -> list[GroupStatus]:
        self._check_alive()
        return list(self._groups)

    async def ready(self) -> bool:
        return self._alive and bool(self._groups) and all(g.state == "ready" for g in self._groups)

    async def model_info(self) -> ModelInfo:
        if self._info is None:  # the model never changes while the core lives
            self._info = (await self._query(cm.QueryKind.MODEL_INFO)).model_info
        return self._info

    async def metrics_text(self) -> bytes:
        """The service's metrics: the core's, with every door's counters (this door's sent
        first, so what it just counted is in)."""
        self._beat()
        return (await self._query(cm.QueryKind.METRICS)).metrics_text

    async def kv_state(self) -> dict:
        state = (await self._query(cm.QueryKind.KV_STATE)).kv_state
        state["groups"] = {name: tuple(v) for name, v in state["groups"].items()}
        return state

    def close(self) -> None:
        self._stopped.set()
        self._io.join(5.0)
        self._fail_streams("the front door is closing")
        with self._push_lock:
            self._push.close(linger=0)
        self._sub.disable_monitor()
        self._monitor.close(linger=0)
        self._sub.close(linger=0)

    # ---- requests ----------------------------------------------------------------------------

    async def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        """The prompt's token ids (tokenized here), refused when empty or past the model's
        length (a token-id prompt before it is copied)."""
        ids = request.token_ids if request.token_ids is not None else await self._tokenize(request)
        if not ids:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, "empty prompt: a request needs at least one prompt token")
        max_len = (await self.model_info()).max_model_len
        if len(ids) >= max_len:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, f"prompt of {len(ids)} tokens is too long: the model's "
                              f"max length is {max_len} tokens, prompt + at least one generated token")
        return list(ids)

    async def _tokenize(self, request: GenerateRequest) -> list[int]:
        if self.tokenizer is None:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, "this model has no tokenizer: pass prompts as token-id "
                                                          "lists" + ("" if request.chat is None else
                                                                     " (chat input is not possible)"))
        if request.chat is not None:
            from splitserve.workers.llm import chat_prompt_ids

            try:
                return await _maybe_off_loop(sum(len(m["content"]) for m in request.chat),
                                             lambda: chat_prompt_ids(self.tokenizer, request.chat))
            except Exception as err:  # noqa: BLE001 - the template rejected the messages
                raise RouterError(ErrorCode.INVALID_ARGUMENT,
                                  f"the chat template cannot render these messages: {err}") from None
        if not request.text:
            return []
        return await _maybe_off_loop(len(request.text), lambda: self.tokenizer.encode(request.text))

    def _check_alive(self) -> None:
        if not self._alive:
            raise RouterError(ErrorCode.UNAVAILABLE, self._down_reason)

    def _send(self, message: cm.ToCore) -> None:
        frame = cm.encode(message)
        with self._push_lock:
            try:
                self._push.send(frame, zmq.NOBLOCK)
            except zmq.Again:  # the core takes nothing: it is gone or wedged
                raise RouterError(ErrorCode.UNAVAILABLE, "the engine core is not taking requests") from None
            except zmq.ZMQError as err:
                raise RouterError(ErrorCode.UNAVAILABLE, f"the engine core cannot be reached: {err}") from None

    def _send_quietly(self, message: cm.ToCore) -> None:
        try:
            self._send(message)
        except RouterError:
            pass  # a core that is gone frees its blocks by going

    async def _query(self, kind: cm.QueryKind, timeout_s: float = 30.0) -> cm.QueryReply:
        self._check_alive()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        query_id = next(self._query_ids)
        with self._lock:
            self._queries[query_id] = (loop, fut)
        try:
            self._send(cm.Query(self.door, query_id, kind))
            async with asyncio.timeout(timeout_s):
                reply = await fut
        except TimeoutError:
            raise RouterError(ErrorCode.UNAVAILABLE, f"the engine core did not answer {kind.value} "
                                                     f"within {timeout_s:g} s") from None
        finally:
            with self._lock:
                self._queries.pop(query_id, None)
        if reply.error is not None:
            raise RouterError(ErrorCode.INTERNAL, reply.error)
        return reply

    # ---- the I/O thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        next_beat = 0.0
        while not self._stopped.is_set():
            try:
                ready = dict(poller.poll(timeout=cm.BEAT_S * 1000 / 2))
                if self._sub in ready:
                    self._drain()
                if self._monitor in ready:
                    self._on_socket_events()
            except zmq.ZMQError:
                if self._stopped.is_set():
                    return
                raise
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + cm.BEAT_S
                self._beat()
            if self._alive and now - self._last_beat > cm.DEAD_AFTER_S:
                self._core_lost(f"the engine core stopped answering (no beat for {cm.DEAD_AFTER_S:g} s)")

    def _on_socket_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self._alive:
                self._core_lost("the engine core closed its socket (its process ended)")

    def _beat(self) -> None:
        counts = [(*labels, n) for labels, n in self.door_metrics.drain().items()]
        self._send_quietly(cm.FrontDoorBeat(self.door, counts))

    def _drain(self) -> None:
        while True:
            try:
                _, frame = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = cm.decode_from_core(frame)
            except cm.DecodeError as err:
                logger.warning("front door %s: dropped a malformed message: %s", self.door, str(err)[:200])
                continue
            match msg:
                case cm.CoreBeat():
                    self._on_beat(msg)
                case cm.StepOutputs():
                    self._on_outputs(msg.outputs)
                case cm.QueryReply():
                    with self._lock:
                        waiting = self._queries.pop(msg.query_id, None)
                    if waiting is not None:
                        loop, fut = waiting
                        loop.call_soon_threadsafe(_resolve, fut, msg)

    def _on_beat(self, beat: cm.CoreBeat) -> None:
        if self._incarnation is not None and beat.incarnation != self._incarnation:
            self._fail_streams("the engine core restarted; the request was lost with it")
        self._incarnation, self._groups, self._last_beat = beat.incarnation, beat.groups, time.monotonic()
        if not self._alive:
            logger.info("front door %s: the engine core answers", self.door)
        self._alive = True
        self._ready.set()

    def _on_outputs(self, deltas: list[cm.RequestDelta]) -> None:
        """File each request's new tokens; wake each consuming loop once."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            for delta in deltas:
                stream = self._streams.get(delta.request_id)
                if stream is not None:
                    by_loop[stream.loop].append((stream, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_apply, items)
            except RuntimeError:
                pass  # that loop has closed: its streams are gone

    def _core_lost(self, reason: str) -> None:
        logger.error("front door %s: %s", self.door, reason)
        self._alive, self._down_reason = False, reason
        self._fail_streams(reason)

    def _fail_streams(self, reason: str) -> None:
        with self._lock:
            streams = list(self._streams.items())
            queries = list(self._queries.values())
            self._queries.clear()
        error = RouterError(ErrorCode.UNAVAILABLE, reason)
        for request_id, stream in streams:
            delta = cm.RequestDelta(request_id, [], True, error_code=error.code.value, error_message=reason)
            try:
                stream.loop.call_soon_threadsafe(_apply, [(stream, delta)])
            except RuntimeError:
                pass
        for loop, fut in queries:
            try:
                loop.call_soon_threadsafe(_reject, fut, error)
            except RuntimeError:
                pass


def _apply(items: list[tuple[_Stream, cm.RequestDelta]]) -> None:
    """On the consumer's loop: append the tokens, note the end, wake the reader."""
    for stream, delta in items:
        if stream.end is not None:
            continue  # already ended (e.g. failed): nothing after that counts
        stream.tokens.extend(delta.new_token_ids)
        if delta.finished:
            stream.end = delta
        stream.event.set()


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: asyncio.Future, err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)


async def _maybe_off_loop(size: int, work):
    return await asyncio.to_thread(work) if size > _LONG_TEXT else work()
