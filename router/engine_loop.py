"""The router's engine thread: one `DisaggEngine` over every group, stepped on its own thread.

Lifecycle:
    start      the thread steps the engine while it has work, else waits on its inbox (and
               still steps every ``idle_step_s``, which is how a dead rank of an idle group
               is noticed)
    add/abort  from any thread: queued into the inbox, applied between steps (the engine is
               only ever touched by its thread); a bad request's ValueError goes to its sink;
               beyond ``max_live`` requests a new one is refused (RESOURCE_EXHAUSTED)
    outputs    each step's `RequestOutput`s become `Chunk`s for the request's sink; a request
               the service failed gets a `RouterError` (UNAVAILABLE) instead; then
               ``on_step_end`` runs once (the engine core sends one message per step there)
    deadlines  a request still live at its deadline is aborted on every group (blocks freed)
               and its sink gets DEADLINE_EXCEEDED, whether or not anyone reads its stream
    groups     after each step a snapshot of every group's state is published (`statuses`);
               a failed group is rebuilt on a thread of its own (``rebuild``: slow, model
               load) after ``restart_backoff_s``, then attached between steps
    stop       the thread ends; the engine shuts its groups down
"""

from __future__ import annotations

import concurrent.futures
import heapq
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from splitserve.router.messages import Chunk, ErrorCode, GroupStatus, RouterError, short
from splitserve.workers.disagg_engine import DisaggEngine, Group
from splitserve.workers.engine import LLMEngine
from splitserve.workers.outputs import RequestOutput
from splitserve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Sink = Callable[[Chunk | RouterError], None]


class EngineLoop:
    def __init__(self, engine: DisaggEngine, rebuild: Callable[[Group], LLMEngine] | None = None,
                 restart_backoff_s: float = 1.0, idle_step_s: float = 0.05,
                 on_step_end: Callable[[], None] | None = None, max_live: int | None = None):
        self.engine = engine
        self._rebuild, self._backoff = rebuild, restart_backoff_s
        self._idle_step_s = idle_step_s
        self._on_step_end = on_step_end
        self._max_live = max_live
        #: (monotonic deadline, request id) of live requests that have one.
        self._deadlines: list[tuple[float, str]] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # A doorbell the engine's step also waits on: a request that arrives while the step
        # waits for the ranks is dispatched at once, not after the wait.
        self._bell_rx, self._bell_tx = socket.socketpair()
        self._bell_rx.setblocking(False)
        engine.wake_handles = [self._bell_rx]
        self._sinks: dict[str, Sink] = {}
        #: Aborted by a client and not yet reported: they end with CANCELLED, whichever
        #: stage (queued, transferring, decoding) the abort found them in.
        self._aborted: set[str] = set()
        self._rebuilding: set[str] = set()
        self._stopped = threading.Event()
        self.statuses: list[GroupStatus] = self._statuses()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- from any thread ---------------------------------------------------------------------

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine's thread between steps; its result or exception in a future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                fut.set_exception(err)
        self._put(run)
        return fut

    @property
    def num_live(self) -> int:
        """Requests added and not yet ended (their sinks still open)."""
        return len(self._sinks)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink,
            deadline: float | None = None, cache_salt: str | None = None) -> None:
        """Validate and queue a tokenized request (its front door tokenized it);
        ``deadline`` (time.monotonic) ends it with DEADLINE_EXCEEDED if it is still live then;
        ``cache_salt``: its prefix-cache partition (a bad one is INVALID_ARGUMENT)."""
        def add() -> None:
            if request_id in self._sinks:
                sink(RouterError(ErrorCode.ALREADY_EXISTS, f"request id {short(request_id)} is already in use"))
                return
            if self._max_live is not None and len(self._sinks) >= self._max_live:
                sink(RouterError(ErrorCode.RESOURCE_EXHAUSTED, f"overloaded: {len(self._sinks)} requests in "
                                 f"flight (the limit is {self._max_live}); retry later"))
                return
            try:
                self.engine.add_request(request_id, prompt_ids, params, stream=True, cache_salt=cache_salt)
            except (ValueError, TypeError) as err:  # the request's fault
                sink(RouterError(ErrorCode.INVALID_ARGUMENT, str(err) or type(err).__name__))
                return
            except Exception as err:  # noqa: BLE001 - the service's (a group that failed): not fatal here
                sink(RouterError(ErrorCode.UNAVAILABLE, f"{type(err).__name__}: {err}"))
                return
            self._sinks[request_id] = sink
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, request_id))
        self._put(add)

    def abort(self, request_id: str) -> None:
        """The client's abort: the request ends on every group, its stream with CANCELLED."""
        def abort() -> None:
            if request_id in self._sinks:
                self._aborted.add(request_id)
            self.engine.abort_request(request_id)
        self._put(abort)

    def abort_where(self, matches: Callable[[str], bool]) -> None:
        """Abort every live request whose id ``matches`` (a front door that died)."""
        def abort() -> None:
            for request_id in [r for r in self._sinks if matches(r)]:
                self._sinks.pop(request_id)
                self.engine.abort_request(request_id)
        self._put(abort)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopped.set()
        self._put(lambda: None)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._drop_live()
        self.engine.shutdown()
        self._bell_rx.close()
        self._bell_tx.close()

    def _drop_live(self, max_steps: int = 100) -> None:
        """At stop: requests still live end (their sinks get UNAVAILABLE) and the groups are
        stepped until their blocks are back, so a stopped service holds nothing."""
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort_request(request_id)
            sink(RouterError(ErrorCode.UNAVAILABLE, "the service is stopping"))
        self._sinks.clear()
        for _ in range(max_steps):
            if not self.engine.has_unfinished_requests():
                return
            try:
                self.engine.step()
            except Exception:  # noqa: BLE001 - stopping anyway
                return

    def _put(self, item: Callable[[], object]) -> None:
        self._inbox.put(item)
        try:
            self._bell_tx.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the bell is already ringing (buffer full) or the loop has stopped

    # ---- the engine's thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._drain(block=not self.engine.has_unfinished_requests())
            try:
                outputs = self.engine.step()
            except Exception as err:  # noqa: BLE001 - a bug must not hang every client
                logger.exception("engine step failed")
                self._fail_everything(f"internal error: {err}")
                continue
            for out in outputs:
                self._deliver(out)
            self._expire()
            if self._on_step_end is not None:
                self._on_step_end()
            self.statuses = self._statuses()
            self._supervise()

    def _drain(self, block: bool) -> None:
        try:
            while self._bell_rx.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        try:
            item = self._inbox.get(timeout=self._idle_step_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                item()
            except Exception:  # noqa: BLE001 - one bad item must never stop the engine's thread
                logger.exception("engine loop: an inbox item failed")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _expire(self) -> None:
        """Requests past their deadline end now, read or not: their blocks are freed."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            sink = self._sinks.pop(request_id, None)
            if sink is None:
                continue  # ended already
            self._aborted.discard(request_id)
            self.engine.abort_request(request_id)
            sink(RouterError(ErrorCode.DEADLINE_EXCEEDED, f"request {request_id} passed its deadline"))

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if out.finished:
            self._sinks.pop(out.request_id, None)
        if sink is None:
            return
        if out.finished and out.request_id in self._aborted:
            self._aborted.discard(out.request_id)
            sink(RouterError(ErrorCode.CANCELLED, f"request {out.request_id} was aborted by the client"))
            return
        if out.error is not None:  # the service's trouble (UNAVAILABLE), or the request's (error_code)
            sink(RouterError(ErrorCode(out.error_code) if out.error_code else ErrorCode.UNAVAILABLE, out.error))
            return
        sink(Chunk(out.request_id, list(out.new_token_ids), out.new_text, out.finished, out.finish_reason,
                   len(out.prompt_token_ids), len(out.token_ids), out.num_cached_tokens))

    def _fail_everything(self, reason: str) -> None:
        for request_id in list(self._sinks):
            self.engine.abort_request(request_id)
            self._sinks.pop(request_id)(RouterError(ErrorCode.INTERNAL, reason))

    # ---- groups --------------------------------------------------------------------------------

    def _statuses(self) -> list[GroupStatus]:
        out = []
        for g in self.engine.groups:
            load = g.load()
            kv = g.engine.kv_usage() if g.engine is not None else None
            state = "ready" if g.healthy else ("restarting" if g.name in self._rebuilding else "failed")
            out.append(GroupStatus(g.name, g.role, state, g.error, load.num_waiting, load.num_running,
                                   load.kv_usage, kv.num_free_blocks if kv else 0, kv.num_blocks if kv else 0,
                                   g.restarts))
        return out

    def _supervise(self) -> None:
        if self._rebuild is None:
            return
        now = time.monotonic()
        for group in self.engine.failed_groups():
            if group.name in self._rebuilding or now - group.failed_at < self._backoff:
                continue
            self._rebuilding.add(group.name)
            fresh = self.engine.new_group_config(group.name)
            threading.Thread(target=self._rebuild_group, args=(fresh,), name=f"rebuild-{group.name}",
                             daemon=True).start()

    def _rebuild_group(self, fresh: Group) -> None:
        try:
            engine = self._rebuild(fresh)
        except Exception as err:  # noqa: BLE001 - logged; tried again after the backoff
            logger.error("rebuilding %s failed: %s", fresh.name, err)
            self._put(lambda: self._rebuilt(fresh, None))
            return
        self._put(lambda: self._rebuilt(fresh, engine))

    def _rebuilt(self, fresh: Group, engine: LLMEngine | None) -> None:
        self._rebuilding.discard(fresh.name)
        if engine is None:
            self.engine.group(fresh.name).failed_at = time.monotonic()
            return
        try:
            self.engine.attach_group(fresh, engine)
        except Exception as err:  # noqa: BLE001 - the old group stays failed; retried later
            logger.error("attaching the rebuilt %s failed: %s", fresh.name, err)
            self.engine.group(fresh.name).failed_at = time.monotonic()
