"""The engine core: one `DisaggEngine` served to any number of front doors over local sockets.

Nothing here touches HTTP, gRPC, JSON, a tokenizer or text: requests arrive as token ids and
leave as new token ids, so the engine's thread spends its time stepping the groups.

Lifecycle:
    start     `EngineCore(engine, cfg, address)` binds ``address.input`` (PULL: every door
              PUSHes requests) and ``address.output`` (PUB: one topic a door), starts the
              engine's thread (`EngineLoop`) and an I/O thread that owns both sockets
    request   `AddRequest` -> the engine's inbox, keyed ``door/request_id`` (doors never
              collide; a door aborts only its own); the deadline is the door's, clamped to
              the service's ``request_timeout_s``; beyond ``max_inflight`` live requests
              it is refused (RESOURCE_EXHAUSTED); a live duplicate id: ALREADY_EXISTS
    step      each engine step's outputs go out as ONE `StepOutputs` per door that had a
              request in it (every request's new token ids and how it ended); the engine's
              thread hands the encoded frame to the I/O thread (inproc) and steps on: it
              never waits on a door
    beats     every `BEAT_S` the I/O thread publishes a `CoreBeat` (groups' state): a door
              that hears none for `DEAD_AFTER_S` fails its streams with UNAVAILABLE and
              reports 503 on /health. A door silent for `DOOR_DEAD_AFTER_S` is taken for
              dead: its requests are aborted and their blocks freed
    queries   model info is answered by the I/O thread; metrics and KV state are read on the
              engine's thread between steps (`EngineLoop.call`) and published as `QueryReply`
    stop      `close()`: the I/O thread ends, the engine loop stops, the groups shut down and
              an ipc socket's folder is removed
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import zmq

from splitserve.router import core_messages as cm
from splitserve.router.engine_loop import EngineLoop
from splitserve.router.messages import Chunk, ModelInfo, RouterError
from splitserve.router.metrics import FrontDoorMetrics, RequestTimer, RouterMetrics

logger = logging.getLogger(__name__)

#: Frames a door's subscription may queue before the PUB socket drops for it: a door reads
#: continuously (its reader only files deltas), so reaching this means it is stuck.
_SNDHWM = 100_000
_SEP = "/"


@dataclass(frozen=True)
class CoreAddress:
    """Where a core listens: two zmq endpoints (``ipc://`` on one node, or ``tcp://``)."""

    input: str
    output: str

    @classmethod
    def ipc(cls, folder: str | None = None) -> "CoreAddress":
        """Two ipc sockets in a new folder only this user can enter."""
        folder = folder or tempfile.mkdtemp(prefix="splitserve-core-")
        os.chmod(folder, 0o700)
        return cls(f"ipc://{folder}/in", f"ipc://{folder}/out")

    def folder(self) -> Path | None:
        return Path(self.input[len("ipc://"):]).parent if self.input.startswith("ipc://") else None


@dataclass(frozen=True)
class CoreLimits:
    max_inflight: int = 256
    request_timeout_s: float = 600.0


class EngineCore:
    def __init__(self, engine, model_info: ModelInfo, address: CoreAddress, limits: CoreLimits = CoreLimits(),
                 rebuild=None, context: zmq.Context | None = None):
        self.address, self.limits, self.model_info = address, limits, model_info
        self.incarnation = uuid.uuid4().hex
        self.metrics = RouterMetrics()
        self.door_metrics = FrontDoorMetrics()  # every door's counters, summed from their beats
        self._ctx = context or zmq.Context.instance()
        self._outbox_address = f"inproc://splitserve-core-outbox-{self.incarnation}"
        # Bound before any thread starts: a door may connect as soon as the constructor returns.
        self._input = self._ctx.socket(zmq.PULL)
        self._input.bind(address.input)
        self._output = self._ctx.socket(zmq.PUB)
        self._output.setsockopt(zmq.SNDHWM, _SNDHWM)
        self._output.bind(address.output)
        self._outbox_rx = self._ctx.socket(zmq.PULL)
        self._outbox_rx.bind(self._outbox_address)
        #: The engine thread's end of the outbox (only that thread sends on it).
        self._outbox_tx = self._ctx.socket(zmq.PUSH)
        self._outbox_tx.connect(self._outbox_address)
        #: door -> deltas of the step being delivered (engine thread only).
        self._pending: dict[str, list[cm.RequestDelta]] = defaultdict(list)
        self._doors_seen: dict[str, float] = {}  # I/O thread only
        self._stopped = threading.Event()
        self.loop = EngineLoop(engine, rebuild=rebuild, on_step_end=self._flush, max_live=limits.max_inflight)
        self._io = threading.Thread(target=self._serve, name="engine-core-io", daemon=True)
        self._io.start()

    # ---- the I/O thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._input, zmq.POLLIN)
        poller.register(self._outbox_rx, zmq.POLLIN)
        next_beat = 0.0
        while not self._stopped.is_set():
            ready = dict(poller.poll(timeout=cm.BEAT_S * 1000 / 2))
            if self._outbox_rx in ready:
                self._relay()
            if self._input in ready:
                self._receive()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + cm.BEAT_S
                self._beat()
                self._reap_doors(now)

    def _relay(self) -> None:
        while True:
            try:
                frames = self._outbox_rx.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._output.send_multipart(frames)

    def _receive(self) -> None:
        for _ in range(1000):  # then beat and relay again: a flood of requests must not starve them
            try:
                frame = self._input.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                msg = cm.decode_to_core(frame)
            except cm.DecodeError as err:
                logger.warning("engine core: dropped a malformed message (%d bytes): %s", len(frame), str(err)[:200])
                continue
            self._doors_seen[msg.door] = time.monotonic()
            try:
                self._handle(msg)
            except Exception:  # noqa: BLE001 - one bad message must never stop the core
                logger.exception("engine core: handling %s failed", type(msg).__name__)

    def _handle(self, msg: cm.ToCore) -> None:
        match msg:
            case cm.AddRequest():
                timeout_s = min(msg.timeout_s, self.limits.request_timeout_s) if msg.timeout_s > 0 \
                    else self.limits.request_timeout_s
                self.loop.add(_key(msg.door, msg.request_id), msg.prompt_token_ids, msg.sampling,
                              self._sink(msg.door, msg.request_id), deadline=time.monotonic() + timeout_s,
                              cache_salt=msg.cache_salt)
            case cm.AbortRequest():
                self.loop.abort(_key(msg.door, msg.request_id))
            case cm.FrontDoorBeat():
                for api, method, code, n in msg.counts:
                    self.door_metrics.requests.labels(api, method, code).inc(n)
            case cm.Query():
                self._answer(msg)

    def _answer(self, query: cm.Query) -> None:
        topic = query.door.encode()
        if query.kind is cm.QueryKind.MODEL_INFO:
            self._output.send_multipart([topic, cm.encode(cm.QueryReply(query.query_id, model_info=self.model_info))])
            return
        metrics = query.kind is cm.QueryKind.METRICS
        read, field = (self._metrics_text, "metrics_text") if metrics else (self._kv_state, "kv_state")

        def reply(fut) -> None:  # on the engine's thread: the outbox is its socket
            try:
                msg = cm.QueryReply(query.query_id, **{field: fut.result()})
            except Exception as err:  # noqa: BLE001 - handed to the asking door
                msg = cm.QueryReply(query.query_id, error=f"{type(err).__name__}: {err}")
            self._outbox_tx.send_multipart([topic, cm.encode(msg)])
        self.loop.call(read).add_done_callback(reply)

    def _beat(self) -> None:
        beat = cm.CoreBeat(self.incarnation, list(self.loop.statuses), self.loop.num_live)
        self._output.send_multipart([cm.ALL, cm.encode(beat)])

    def _reap_doors(self, now: float) -> None:
        """A door silent for `DOOR_DEAD_AFTER_S` died: its requests end, their blocks freed."""
        for door, seen in list(self._doors_seen.items()):
            if now - seen > cm.DOOR_DEAD_AFTER_S:
                del self._doors_seen[door]
                logger.warning("engine core: front door %s went silent; aborting its requests", door)
                self.loop.abort_where(lambda key, prefix=door + _SEP: key.startswith(prefix))

    # ---- the engine's thread -----------------------------------------------------------------

    def _sink(self, door: str, request_id: str):
        """Where the engine loop puts this request's chunks: the step's batch for its door."""
        timer = RequestTimer()
        pending, metrics = self._pending, self.metrics  # cleared in place by _flush, never replaced

        def sink(item: Chunk | RouterError) -> None:
            if isinstance(item, RouterError):
                metrics.errors.labels(item.code.value).inc()
                pending[door].append(cm.RequestDelta(request_id, [], True, None, error_code=item.code.value,
                                                     error_message=item.message))
                return
            timer.on_tokens(metrics, len(item.token_ids))
            if item.finished:
                timer.on_finish(metrics, item.finish_reason, item.prompt_tokens, item.cached_tokens)
            pending[door].append(cm.RequestDelta(request_id, item.token_ids, item.finished, item.finish_reason,
                                                 item.prompt_tokens, item.cached_tokens))
        return sink

    def _flush(self) -> None:
        """One message per door for the step just delivered (and for refusals since)."""
        self.metrics.inflight.set(self.loop.num_live)
        if not self._pending:
            return
        batches = list(self._pending.items())
        self._pending.clear()
        for door, deltas in batches:
            self._outbox_tx.send_multipart([door.encode(), cm.encode(cm.StepOutputs(deltas))])

    def _metrics_text(self) -> bytes:
        engine = self.loop.engine
        self.metrics.observe_groups(self.loop.statuses)
        self.metrics.observe_transfers(engine.metrics)
        return self.metrics.render() + self.door_metrics.render()

    def kv_state(self, timeout_s: float = 30.0) -> dict:
        """Free and total blocks of every healthy group, open transfers and live requests (leak
        checks), read between steps. From any thread but the engine's."""
        return self.loop.call(self._kv_state).result(timeout_s)

    def _kv_state(self) -> dict:
        engine = self.loop.engine
        usage = {g.name: g.engine.kv_usage() for g in engine.groups if g.healthy}
        groups = {name: [kv.num_free_blocks, kv.num_blocks] for name, kv in usage.items()}
        return {"groups": groups, "open_transfers": engine.num_open_transfers,
                "live_requests": engine.num_live_requests, "inflight": self.loop.num_live,
                "resent": engine.num_resent}

    # ---- stop --------------------------------------------------------------------------------

    def close(self, timeout_s: float = 30.0) -> None:
        self._stopped.set()
        self._io.join(timeout_s)
        self.loop.stop(timeout_s)
        for sock in (self._input, self._output, self._outbox_rx, self._outbox_tx):
            sock.close(linger=0)
        folder = self.address.folder()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _key(door: str, request_id: str) -> str:
    return f"{door}{_SEP}{request_id}"
