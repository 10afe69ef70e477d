"""router/engine_loop.py: the engine thread's routing, over a fake `DisaggEngine` (no model,
no rank process). The fake serves one token per live request per step (token ``100 + n`` for
the n-th), ends a request at ``max_tokens``, and answers an abort with a finished output at
its next step, as the real engine does. Each test checks what each request's sink received,
what the engine was asked to do, and the published group statuses."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from splitserve.router.engine_loop import EngineLoop
from splitserve.router.messages import Chunk, ErrorCode, GroupStatus, RouterError
from splitserve.workers.disagg_engine import Group
from splitserve.workers.group_engine import KVUsage
from splitserve.workers.outputs import RequestOutput
from splitserve.workers.roles import GroupRole
from splitserve.workers.sampling_params import SamplingParams

TIMEOUT_S = 5.0


def params(max_tokens: int = 3) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


class FakeGroupEngine:
    """A group's engine as the loop's status snapshot reads it (`GroupEngine.kv_usage`)."""

    def __init__(self, waiting: int = 0, running: int = 0, free: int = 10, total: int = 10):
        self.num_waiting, self.num_running = waiting, running
        self._kv = KVUsage(num_blocks=total, num_free_blocks=free, usage=1 - free / total, block_size=4)
        self.shut_down = False

    def kv_usage(self) -> KVUsage:
        return self._kv

    def shutdown(self) -> None:
        self.shut_down = True


@dataclass
class _Live:
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)


class FakeDisaggEngine:
    """What `EngineLoop` uses of a `DisaggEngine`. Only the loop's thread calls it (tests read
    its records after waiting for the loop)."""

    def __init__(self):
        self.wake_handles: list = []
        self.prefills = [Group("prefill-0", GroupRole.PREFILL, 0, None, FakeGroupEngine(running=1, free=6))]
        self.decodes = [Group("decode-0", GroupRole.DECODE, 0, None, FakeGroupEngine(waiting=2, running=3, free=4)),
                        Group("decode-1", GroupRole.DECODE, 1, None, FakeGroupEngine())]
        self.live: dict[str, _Live] = {}
        #: Requests that stay live without output until released.
        self.hold: set[str] = set()
        #: request id -> (error, error_code) its next step fails it with.
        self.fail_with: dict[str, tuple[str, str | None]] = {}
        self.raise_next: Exception | None = None
        self._ended: list[RequestOutput] = []
        self.added: list[tuple[str, list[int], str | None]] = []
        self.aborted: list[str] = []
        self.attached: list[tuple[Group, object]] = []
        self.attach_error: Exception | None = None
        self.steps = 0
        #: (step, request id) of every output, in order.
        self.emitted: list[tuple[int, str]] = []
        self.shut_down = False

    @property
    def groups(self) -> list[Group]:
        return self.prefills + self.decodes

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    def add_request(self, request_id, prompt_ids, params, stream=True, cache_salt=None):
        assert stream
        if not prompt_ids:
            raise ValueError("empty prompt")
        if prompt_ids[0] == -1:
            raise RuntimeError("no healthy decode group")
        self.added.append((request_id, list(prompt_ids), cache_salt))
        self.live[request_id] = _Live(list(prompt_ids), params)

    def abort_request(self, request_id: str) -> None:
        self.aborted.append(request_id)
        req = self.live.pop(request_id, None)
        if req is not None:
            self._ended.append(RequestOutput(request_id, req.prompt, list(req.tokens), "", True, "abort",
                                             error="aborted by the client"))

    def has_unfinished_requests(self) -> bool:
        return bool(self.live or self._ended)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.raise_next is not None:
            err, self.raise_next = self.raise_next, None
            raise err
        time.sleep(0.001)
        outputs, self._ended = self._ended, []
        for request_id, req in list(self.live.items()):
            if request_id in self.fail_with:
                error, code = self.fail_with.pop(request_id)
                del self.live[request_id]
                outputs.append(RequestOutput(request_id, req.prompt, list(req.tokens), "", True, "abort",
                                             error=error, error_code=code))
                continue
            if request_id in self.hold:
                continue
            token = 100 + len(req.tokens)
            req.tokens.append(token)
            done = len(req.tokens) >= req.params.max_tokens
            if done:
                del self.live[request_id]
            outputs.append(RequestOutput(request_id, req.prompt, list(req.tokens), "", done,
                                         "length" if done else None, num_cached_tokens=2,
                                         new_token_ids=[token], new_text=f"<{token}>"))
        self.emitted += [(self.steps, out.request_id) for out in outputs]
        return outputs

    def fail_group(self, name: str, error: str) -> None:
        g = self.group(name)
        g.error, g.failed_at = error, time.monotonic()

    def failed_groups(self) -> list[Group]:
        return [g for g in self.groups if g.error is not None]

    def new_group_config(self, name: str) -> Group:
        old = self.group(name)
        return Group(old.name, old.role, old.index, None, restarts=old.restarts + 1)

    def attach_group(self, group: Group, engine) -> None:
        if self.attach_error is not None:
            raise self.attach_error
        group.engine = engine
        self.attached.append((group, engine))
        roles = self.prefills if group.role is GroupRole.PREFILL else self.decodes
        roles[roles.index(self.group(group.name))] = group

    def shutdown(self) -> None:
        self.shut_down = True


class Sink:
    """One request's stream, as the loop's thread delivers it."""

    def __init__(self):
        self.items: list[Chunk | RouterError] = []
        self._cond = threading.Condition()

    def __call__(self, item: Chunk | RouterError) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait(self, n: int = 1) -> list[Chunk | RouterError]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= n, TIMEOUT_S), self.items
            return list(self.items)

    def wait_end(self) -> list[Chunk | RouterError]:
        with self._cond:
            ended = lambda: self.items and (isinstance(self.items[-1], RouterError) or self.items[-1].finished)  # noqa: E731
            assert self._cond.wait_for(ended, TIMEOUT_S), self.items
            return list(self.items)

    @property
    def error(self) -> RouterError:
        [item] = self.wait_end()
        assert isinstance(item, RouterError), item
        return item


def wait_until(cond: Callable[[], bool]) -> None:
    end = time.monotonic() + TIMEOUT_S
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


@pytest.fixture
def fake() -> FakeDisaggEngine:
    return FakeDisaggEngine()


@pytest.fixture
def make_loop(fake):
    loops: list[EngineLoop] = []

    def make(**kwargs) -> EngineLoop:
        kwargs.setdefault("idle_step_s", 0.005)
        loop = EngineLoop(fake, **kwargs)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop(timeout_s=TIMEOUT_S)


def settle(loop: EngineLoop) -> None:
    """Wait until every item queued before now has run on the loop's thread."""
    loop.call(lambda: None).result(TIMEOUT_S)


# ---- submission and output routing -----------------------------------------------------------


def test_each_request_streams_its_own_chunks_to_its_own_sink(make_loop, fake):
    loop = make_loop()
    a, b = Sink(), Sink()
    loop.add("a", [1, 2, 3], params(3), a, cache_salt="tenant")
    loop.add("b", [7], params(1), b)
    assert b.wait_end() == [Chunk("b", [100], "<100>", True, "length", 1, 1, 2)]
    assert a.wait_end() == [
        Chunk("a", [100], "<100>", False, None, 3, 1, 2),
        Chunk("a", [101], "<101>", False, None, 3, 2, 2),
        Chunk("a", [102], "<102>", True, "length", 3, 3, 2),
    ]
    assert fake.added == [("a", [1, 2, 3], "tenant"), ("b", [7], None)]
    settle(loop)
    assert loop.num_live == 0 and fake.aborted == []


def test_a_live_request_counts_until_its_last_chunk(make_loop, fake):
    loop = make_loop()
    fake.hold.add("r")
    sink = Sink()
    loop.add("r", [1], params(2), sink)
    settle(loop)
    assert loop.num_live == 1 and sink.items == []
    fake.hold.discard("r")
    assert [c.finished for c in sink.wait_end()] == [False, True]
    settle(loop)
    assert loop.num_live == 0


def test_a_request_id_in_use_is_refused_and_the_first_goes_on(make_loop, fake):
    loop = make_loop()
    fake.hold.add("r")
    first, second = Sink(), Sink()
    loop.add("r", [1], params(2), first)
    loop.add("r", [2], params(2), second)
    assert second.error.code is ErrorCode.ALREADY_EXISTS and "'r'" in second.error.message
    assert [r for r, _, _ in fake.added] == ["r"]
    fake.hold.discard("r")
    assert [c.token_ids for c in first.wait_end()] == [[100], [101]]


@pytest.mark.parametrize(("prompt", "code", "message"), [
    ([], ErrorCode.INVALID_ARGUMENT, "empty prompt"),
    ([-1], ErrorCode.UNAVAILABLE, "RuntimeError: no healthy decode group"),
])
def test_a_refused_add_goes_to_its_sink_and_leaves_nothing_live(make_loop, fake, prompt, code, message):
    loop = make_loop()
    sink = Sink()
    loop.add("r", prompt, params(), sink, deadline=time.monotonic() + 0.01)
    err = sink.error
    assert err.code is code and err.message == message
    settle(loop)
    assert loop.num_live == 0 and fake.added == []
    time.sleep(0.03)  # its deadline passes: nothing more comes, nothing is aborted
    settle(loop)
    assert len(sink.items) == 1 and fake.aborted == []


def test_beyond_max_live_a_new_request_is_refused(make_loop, fake):
    loop = make_loop(max_live=2)
    fake.hold.update({"a", "b"})
    sinks = [Sink() for _ in range(3)]
    for name, sink in zip("abc", sinks):
        loop.add(name, [1], params(1), sink)
    err = sinks[2].error
    assert err.code is ErrorCode.RESOURCE_EXHAUSTED and "2 requests in flight (the limit is 2)" in err.message
    fake.hold.clear()
    for sink in sinks[:2]:
        assert [c.finished for c in sink.wait_end()] == [True]
    settle(loop)
    later = Sink()
    loop.add("d", [1], params(1), later)  # room again
    assert isinstance(later.wait_end()[0], Chunk)


def test_a_failed_request_gets_the_status_its_output_names(make_loop, fake):
    loop = make_loop()
    fake.fail_with.update({"lost": ("decode-0 failed", None), "qod": ("the model raised", "INTERNAL")})
    lost, qod = Sink(), Sink()
    loop.add("lost", [1], params(), lost)
    loop.add("qod", [1], params(), qod)
    assert (lost.error.code, lost.error.message) == (ErrorCode.UNAVAILABLE, "decode-0 failed")
    assert (qod.error.code, qod.error.message) == (ErrorCode.INTERNAL, "the model raised")
    settle(loop)
    assert loop.num_live == 0


# ---- aborts ------------------------------------------------------------------------------------


def test_a_client_abort_ends_the_stream_with_cancelled(make_loop, fake):
    loop = make_loop()
    fake.hold.add("r")
    sink = Sink()
    loop.add("r", [1], params(5), sink)
    settle(loop)
    loop.abort("r")
    err = sink.error  # not the engine's "aborted by the client" UNAVAILABLE output
    assert err.code is ErrorCode.CANCELLED and err.message == "request r was aborted by the client"
    settle(loop)
    assert fake.aborted == ["r"] and loop.num_live == 0


def test_abort_of_an_unknown_request_only_reaches_the_engine(make_loop, fake):
    loop = make_loop()
    other = Sink()
    loop.abort("ghost")
    loop.add("r", [1], params(1), other)
    assert [c.finished for c in other.wait_end()] == [True]
    assert fake.aborted == ["ghost"]


def test_abort_where_drops_the_matching_requests_silently(make_loop, fake):
    loop = make_loop()
    fake.hold.update({"door1/a", "door1/b", "door2/a"})
    sinks = {r: Sink() for r in ("door1/a", "door1/b", "door2/a")}
    for r, sink in sinks.items():
        loop.add(r, [1], params(1), sink)
    settle(loop)
    loop.abort_where(lambda r: r.startswith("door1/"))
    settle(loop)
    assert sorted(fake.aborted) == ["door1/a", "door1/b"] and loop.num_live == 1
    fake.hold.clear()
    assert [c.finished for c in sinks["door2/a"].wait_end()] == [True]
    settle(loop)
    assert sinks["door1/a"].items == [] and sinks["door1/b"].items == []  # nobody is listening


# ---- deadlines ---------------------------------------------------------------------------------


def test_a_request_live_at_its_deadline_ends_and_frees_its_blocks(make_loop, fake):
    loop = make_loop()
    fake.hold.add("slow")
    slow, fast = Sink(), Sink()
    loop.add("slow", [1], params(), slow, deadline=time.monotonic() + 0.05)
    loop.add("fast", [1], params(2), fast, deadline=time.monotonic() + 0.05)
    err = slow.error
    assert err.code is ErrorCode.DEADLINE_EXCEEDED and err.message == "request slow passed its deadline"
    assert fake.aborted == ["slow"]
    # The request that finished in time is untouched by its deadline passing.
    assert [c.finished for c in fast.wait_end()] == [False, True]
    time.sleep(0.06)
    settle(loop)
    assert fake.aborted == ["slow"] and len(slow.items) == 1 and len(fast.items) == 2
    assert loop.num_live == 0 and not fake.has_unfinished_requests()


# ---- the engine's thread -----------------------------------------------------------------------


def test_call_runs_on_the_engine_thread_and_returns_its_result_or_error(make_loop):
    loop = make_loop()
    assert loop.call(lambda: threading.current_thread().name).result(TIMEOUT_S) == "engine-loop"
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda: 1 // 0).result(TIMEOUT_S)
    assert loop.call(lambda: 42).result(TIMEOUT_S) == 42  # still serving


def test_a_failing_step_fails_every_live_request_and_the_loop_goes_on(make_loop, fake):
    loop = make_loop()
    fake.hold.update({"a", "b"})
    a, b = Sink(), Sink()
    loop.add("a", [1], params(), a)
    loop.add("b", [1], params(), b)
    settle(loop)
    fake.raise_next = RuntimeError("boom")
    for sink in (a, b):
        assert (sink.error.code, sink.error.message) == (ErrorCode.INTERNAL, "internal error: boom")
    assert sorted(fake.aborted) == ["a", "b"]
    later = Sink()
    loop.add("c", [1], params(1), later)
    assert [c.token_ids for c in later.wait_end()] == [[100]]


def test_on_step_end_runs_once_per_step_after_its_outputs(make_loop, fake):
    seen: list[tuple[int, int]] = []
    sink = Sink()
    loop = make_loop(on_step_end=lambda: seen.append((fake.steps, len(sink.items))))
    loop.add("r", [1], params(3), sink)
    sink.wait_end()
    settle(loop)
    steps = [s for s, _ in seen]
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # every step, once
    # At each step's end its chunk has been delivered already: as many as it produced so far.
    produced = [s for s, request_id in fake.emitted if request_id == "r"]
    assert len(produced) == 3
    for step, delivered in seen:
        assert delivered == sum(p <= step for p in produced), (step, delivered, produced)


def test_the_loop_registers_its_doorbell_with_the_engine(make_loop, fake):
    make_loop()
    [bell] = fake.wake_handles
    assert bell.fileno() >= 0


# ---- group statuses and rebuilds ---------------------------------------------------------------


def test_statuses_snapshot_every_group(make_loop, fake):
    loop = make_loop()
    assert loop.statuses == [
        GroupStatus("prefill-0", "prefill", "ready", None, 0, 1, pytest.approx(0.4), 6, 10, 0),
        GroupStatus("decode-0", "decode", "ready", None, 2, 3, pytest.approx(0.6), 4, 10, 0),
        GroupStatus("decode-1", "decode", "ready", None, 0, 0, 0.0, 10, 10, 0),
    ]
    fake.decodes[1].engine.num_running = 7
    wait_until(lambda: loop.statuses[2].num_running == 7)  # refreshed while idle too


def test_without_rebuild_a_failed_group_stays_failed(make_loop, fake):
    loop = make_loop()
    loop.call(lambda: fake.fail_group("decode-0", "rank 1 died")).result(TIMEOUT_S)
    wait_until(lambda: loop.statuses[1].state == "failed")
    s = loop.statuses[1]
    # A failed group reports no load (it is out of every choice) but its blocks as they are.
    assert (s.name, s.error, s.num_waiting, s.num_running, s.kv_usage, s.restarts) == \
           ("decode-0", "rank 1 died", 0, 0, 1.0, 0)
    time.sleep(0.03)
    assert loop.statuses[1].state == "failed" and fake.attached == []


def test_a_failed_group_is_rebuilt_after_the_backoff_and_attached(make_loop, fake):
    release = threading.Event()
    calls: list[tuple[Group, str, float]] = []
    new_engine = FakeGroupEngine(free=9)

    def rebuild(group: Group):
        calls.append((group, threading.current_thread().name, time.monotonic()))
        assert release.wait(TIMEOUT_S)
        return new_engine

    loop = make_loop(rebuild=rebuild, restart_backoff_s=0.05)
    loop.call(lambda: fake.fail_group("decode-1", "rank 0 died")).result(TIMEOUT_S)
    failed_at = fake.group("decode-1").failed_at
    wait_until(lambda: loop.statuses[2].state == "restarting")
    [(fresh, thread, called_at)] = calls
    assert (fresh.name, fresh.role, fresh.index, fresh.restarts) == ("decode-1", "decode", 1, 1)
    assert thread == "rebuild-decode-1" and called_at - failed_at >= 0.05
    assert loop.statuses[2].error == "rank 0 died"
    release.set()
    wait_until(lambda: loop.statuses[2].state == "ready")
    assert fake.attached == [(fresh, new_engine)]
    assert loop.statuses[2] == GroupStatus("decode-1", "decode", "ready", None, 0, 0, pytest.approx(0.1), 9, 10, 1)
    assert len(calls) == 1  # once healthy, never rebuilt again


@pytest.mark.parametrize("where", ["rebuild", "attach"])
def test_a_failed_rebuild_is_tried_again_after_the_backoff(make_loop, fake, where):
    attempts: list[float] = []

    def rebuild(group: Group):
        attempts.append(time.monotonic())
        if where == "rebuild":
            raise RuntimeError("no GPU")
        return FakeGroupEngine()

    if where == "attach":
        fake.attach_error = RuntimeError("kv connect timed out")
    loop = make_loop(rebuild=rebuild, restart_backoff_s=0.03)
    loop.call(lambda: fake.fail_group("prefill-0", "lost")).result(TIMEOUT_S)
    wait_until(lambda: len(attempts) >= 3)
    assert all(b - a >= 0.03 for a, b in zip(attempts, attempts[1:]))  # the backoff from each failure
    assert fake.attached == [] and loop.statuses[0].state in ("failed", "restarting")


# ---- stop --------------------------------------------------------------------------------------


def test_stop_ends_live_requests_steps_until_free_and_shuts_the_engine_down(fake):
    loop = EngineLoop(fake, idle_step_s=0.005)
    fake.hold.update({"a", "b"})
    a, b = Sink(), Sink()
    loop.add("a", [1], params(), a)
    loop.add("b", [1], params(), b)
    settle(loop)
    loop.stop(timeout_s=TIMEOUT_S)
    for sink in (a, b):
        assert (sink.error.code, sink.error.message) == (ErrorCode.UNAVAILABLE, "the service is stopping")
    assert sorted(fake.aborted) == ["a", "b"]
    assert not fake.has_unfinished_requests()  # the abort outputs were stepped out
    assert fake.shut_down and loop.num_live == 0
    steps = fake.steps
    time.sleep(0.02)
    assert fake.steps == steps  # the thread has ended
