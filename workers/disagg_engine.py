"""Disaggregated engine: prefill groups and decode groups in one driver, KV moved between.

One driver steps every group (each a `LLMEngine` over its ranks: in this process, spawned
processes, or Ray actors); `LLM(mode="disaggregated")` is the 1 prefill + 1 decode case, the
router on Ray runs any number of each. With no prefill group ("aggregated" groups) requests
run whole on a decode group. Lifecycle of a request (the transfer's `TransferState` in brackets):

    add_request  validated by both roles, queued (first come, first served)
    reserve      a decode group (the policy's order) reserves blocks for prompt + first
                 token, reusing its own prefix cache (those blocks are not sent); without free
                 blocks the request waits for running requests to end, up to
                 ``queue_timeout_s`` (or at once if nothing could free any), then the failure
                 policy applies
    prefill      [WAITING] a prefill group (the policy's order) computes the prompt; when the
                 last chunk is submitted its ranks get the `SendCommand` and the decode ranks
                 a `RecvCommand` with the transfer deadline  [TRANSFERRING]
    first token  sampled on prefill (the request's own params and seed); blocks held
    ack          [DONE] every decode rank reported the KV written: decode admits the request
                 as running with the first token; prefill frees its blocks (they stay cached)
    failure      [FAILED] a rank reported an error, the deadline or the reservation's lease
                 passed, or the client aborted: decode ranks are told to drop the transfer
                 (`kv_cancel`: they process it before any later message, and it waits out a
                 write in progress, so nothing writes those blocks after it), both sides free
                 their blocks at once, then ``recompute`` (decode prefills the prompt itself;
                 the default) or ``fail`` (finish_reason "abort" and an error; always so for
                 an abort)

Groups fail and come back:
    prefill group lost  its transfers are dropped on both sides and their requests re-sent
                 (to another prefill group; with none left, the failure policy)
    decode group lost   its transfers are dropped; its running requests continue on another
                 decode group from prompt + the tokens generated so far (prefilled again, so
                 greedy output is unchanged); with no decode group left they fail
    rejoin       `new_group_config` + build the engine (slow, any thread) + `attach_group`
                 (connects the new ranks' KV links to the other side) replace a lost group
    meanwhile    new and re-sent requests go to the healthy groups (a lost group validates
                 nothing and is ranked nowhere); a group whose ranks died unnoticed and that
                 refuses a request being placed is marked lost then and there, and the request
                 goes to the next group: it fails only when a role has no group left, or after
                 ``max_retries`` re-sends
    query of death  a step that raises on a group's ranks (engine.py): the ranks of a one-rank
                 group go on (only the batch is lost), others end (the group is lost). The
                 batch's requests are judged: alone in it, a request is the culprit: it fails
                 (its error says why) and is never re-sent; with others, each is a suspect:
                 re-sent to run whole on a decode group, isolated (batches of its own, and no
                 prefill step that pushes KV, whose exception would end its group), so that it
                 raises alone if it raises again, and the innocent finish token-exact. One bad
                 request so costs at most one group (none if the ranks survive its exception,
                 with decode groups of one rank); with larger decode groups a suspect's second
                 exception may end a second one

`step` submits to every group before collecting from any (their ranks work at once), then
settles transfers.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from typing import Protocol

from splitserve.kvtransfer.agent import KVAgentSpec
from splitserve.kvtransfer.messages import (
    FaultConfig, RecvCommand, SendCommand, TransferEvent, TransferMetrics, TransferState, TransportKind,
)
from splitserve.kvtransfer.plan import check_compatible, make_routes
from splitserve.workers.engine import (
    EngineConfig, KVSendHook, LLMEngine, SendPlan, Verdict, first_token_params, resolve_device,
)
from splitserve.workers.executor import Executor, WorkerGroupError
from splitserve.workers.outputs import RequestOutput
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.cache_salt import check_cache_salt
from splitserve.workers.sequence import Sequence

logger = logging.getLogger(__name__)

#: Longest a driver step waits for any group's result or report before looking again.
WAIT_SLICE_S = 0.05


@dataclass(frozen=True)
class DisaggConfig:
    #: The prefill groups' engine config; None: no prefill groups (aggregated groups).
    prefill: EngineConfig | None
    decode: EngineConfig
    num_prefill: int = 1
    num_decode: int = 1
    #: Deadline of one transfer, from the prefill step that sends it to the last decode ack.
    transfer_timeout_s: float = 30.0
    #: Layers per streamed message (smaller: earlier start, more messages).
    layers_per_message: int = 4
    #: "recompute": decode prefills the prompt itself; "fail": the request ends with an error.
    failure_policy: str = "recompute"
    faults: FaultConfig = field(default_factory=FaultConfig)
    #: Both groups in this process (in-process transport); None: when both are 1 x 1.
    in_process: bool | None = None
    #: Lease of a decode reservation while its prompt waits for the prefill group.
    reservation_timeout_s: float = 300.0
    #: How long a request may wait for decode blocks to reserve before the failure policy.
    queue_timeout_s: float = 60.0
    #: Times a request is re-sent after losing its group before it fails.
    max_retries: int = 3
    #: Transport between groups; None: chosen from the devices (`_transport`).
    transport: str | None = None
    #: Address the groups' ranks reach this driver's TCPStore at (multi-node: a routable IP).
    store_host: str = "127.0.0.1"
    #: Group names are ``<prefix>-<i>``; None: "prefill"/"decode", or "worker" without prefill.
    decode_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.failure_policy not in ("recompute", "fail"):
            raise ValueError(f"failure_policy must be 'recompute' or 'fail', got {self.failure_policy!r}")
        if self.transfer_timeout_s <= 0 or self.layers_per_message < 1:
            raise ValueError("transfer_timeout_s must be positive and layers_per_message >= 1")
        if self.num_decode < 1 or (self.prefill is not None and self.num_prefill < 1):
            raise ValueError("at least one decode group, and one prefill group when prefill is configured")


@dataclass(frozen=True)
class GroupLoad:
    """What a policy sees of a group when it chooses."""

    name: str
    role: str
    index: int
    healthy: bool
    num_waiting: int
    num_running: int
    kv_usage: float
    num_free_blocks: int


class GroupPolicy(Protocol):
    def rank(self, role: str, loads: list[GroupLoad], prompt_ids: list[int]) -> list[str]:
        """The healthy groups' names, best first, for this request."""


class InOrder:
    """The default policy: healthy groups in index order (one group per role: no choice)."""

    def rank(self, role: str, loads: list[GroupLoad], prompt_ids: list[int]) -> list[str]:
        return [g.name for g in loads if g.healthy]


@dataclass(eq=False)
class Group:
    name: str
    role: str
    index: int
    config: EngineConfig
    engine: LLMEngine | None = None
    #: Why it failed (None while it works); it stays out of every choice until replaced.
    error: str | None = None
    failed_at: float = 0.0
    restarts: int = 0

    @property
    def healthy(self) -> bool:
        return self.engine is not None and self.error is None

    @property
    def namespace(self) -> str:
        return self.config.kv.namespace if self.config.kv is not None else ""

    def load(self) -> GroupLoad:
        e = self.engine
        if not self.healthy:
            return GroupLoad(self.name, self.role, self.index, False, 0, 0, 1.0, 0)
        return GroupLoad(self.name, self.role, self.index, True, e.num_waiting, e.num_running,
                         e.block_manager.usage, e.block_manager.num_free_blocks)


@dataclass(eq=False)
class _Request:
    """A request as the client gave it, plus what it has generated on a group it lost."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    prompt: str | None
    queued_at: float
    #: Tokens generated on decode groups that were lost since (the prompt of the continuation).
    done_ids: list[int] = field(default_factory=list)
    done_text: str = ""
    retries: int = 0
    #: In a batch that raised with others: runs whole on a decode group, isolated.
    suspect: bool = False
    #: The decode group it runs on, once admitted there.
    decode: Group | None = None
    #: Tokens and characters of text the client has been given (`_emit`).
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    #: Its prefix-cache partition on every group it reaches (`Sequence.cache_salt`).
    cache_salt: str | None = None

    def continuation(self) -> tuple[list[int], SamplingParams]:
        """Prompt and params that generate the rest: prompt + tokens so far, fewer to go."""
        n = len(self.done_ids)
        if not n:
            return self.prompt_ids, self.params
        return self.prompt_ids + self.done_ids, self.params.with_(
            max_tokens=self.params.max_tokens - n, min_tokens=max(0, self.params.min_tokens - n))


@dataclass
class _Transfer:
    transfer_id: int
    request: _Request
    prefill: Group
    decode: Group
    reservation: Sequence
    #: Leading prompt blocks decode already had (its prefix cache): not sent.
    skip_blocks: int
    state: TransferState = TransferState.WAITING
    deadline: float = float("inf")
    first_token: int | None = None
    logprobs: object = None
    acks: set[int] = field(default_factory=set)
    error: str | None = None
    #: The failure policy for this transfer (an abort always fails).
    policy: str = "recompute"
    #: Bytes received over all decode ranks, and the slowest rank's time.
    num_bytes: int = 0
    seconds: float = 0.0
    #: When it reached each stage (`STAGES`), on the driver's monotonic clock.
    times: dict[str, float] = field(default_factory=dict)


#: A transfer's stages, in order: its request queued, reserved on decode, the prefill step that
#: sends it submitted, the first token back from prefill, every decode rank's ack seen, admitted
#: on decode.
STAGES = ("queued", "reserved", "sending", "first_token", "acked", "admitted")


EngineFactory = Callable[[Group], LLMEngine]


class DisaggEngine:
    def __init__(self, config: DisaggConfig, policy: GroupPolicy | None = None,
                 engine_factory: EngineFactory | None = None):
        self.config = config
        self.policy = policy or InOrder()
        self.metrics = TransferMetrics()
        self._factory = engine_factory or (lambda group: LLMEngine(group.config))
        d_par = config.decode.parallel
        p_par = config.prefill.parallel if config.prefill is not None else None
        single = p_par is not None and config.num_prefill == config.num_decode == 1
        local = (config.in_process if config.in_process is not None
                 else single and p_par.world_size == d_par.world_size == 1)
        if local and (not single or p_par.world_size * d_par.world_size > 1):
            raise ValueError("in_process needs one 1 x 1 group on each side")
        self._local = local
        self._store = None if local or p_par is None else _start_store(config.store_host)
        self._uid = uuid.uuid4().hex[:8]
        self.prefills = [self._new_group("prefill", i) for i in range(config.num_prefill if p_par else 0)]
        decode_name = config.decode_prefix or ("decode" if p_par else "worker")
        self.decodes = [self._new_group("decode", i, decode_name) for i in range(config.num_decode)]
        self.routes = []
        try:
            for group in self.groups:
                group.engine = self._factory(group)
            if self.prefills:
                self._check_compatible()
                self.routes = make_routes(p_par.mapping(), d_par.mapping(), self.model_cfg.num_layers,
                                          self.model_cfg.num_kv_heads)
                self._connect(self.prefills + self.decodes)
        except BaseException:  # no rank process outlives a failed start
            self.shutdown()
            raise
        for group in self.prefills:
            self._enable_sends(group)
        self.tokenizer = self.decodes[0].engine.tokenizer
        self._queue: deque[_Request] = deque()
        self._live: dict[str, _Request] = {}
        self._transfers: dict[int, _Transfer] = {}
        self._by_request: dict[str, int] = {}
        self._outputs: list[RequestOutput] = []
        self._transfer_ids = itertools.count()
        self._request_ids = itertools.count()
        #: Stage times of the latest completed transfers (`stage_summary`).
        self.stage_log: deque[dict[str, float]] = deque(maxlen=20_000)
        #: Extra objects whose readiness ends a step's wait (the router's inbox doorbell).
        self.wake_handles: list = []
        #: Requests sent through again after losing a group (prefill re-sends and decode
        #: migrations); the router reports it, tests check a fault really moved requests.
        self.num_resent = 0
        #: The latest incarnation handed out per group name (`new_group_config`).
        self._incarnations: dict[str, int] = {}

    # ---- groups ----------------------------------------------------------------------------

    @property
    def groups(self) -> list[Group]:
        return self.prefills + self.decodes

    @property
    def prefill(self) -> LLMEngine:
        """The first prefill group's engine (the one of a 1 + 1 engine)."""
        return self.prefills[0].engine

    @property
    def decode(self) -> LLMEngine:
        return self.decodes[0].engine

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def _new_group(self, role: str, index: int, prefix: str | None = None, restarts: int = 0) -> Group:
        name = f"{prefix or role}-{index}"
        return Group(name, role, index, self._group_config(role, index, name, restarts), restarts=restarts)

    def _group_config(self, role: str, index: int, name: str, restarts: int) -> EngineConfig:
        cfg = self.config.prefill if role == "prefill" else self.config.decode
        if self.config.prefill is None:  # aggregated groups: no KV service
            return replace(cfg, device_offset=index * cfg.parallel.world_size)
        port = self._store.port if self._store is not None else 0
        # Each incarnation has its own namespace: a rejoining group gets fresh KV links.
        namespace = f"{self._uid}/{name}.{restarts}/"
        kv = KVAgentSpec(role, self._transport(), namespace, self.config.store_host, port, faults=self.config.faults)
        # Groups of this machine take GPUs in order: the prefill groups', then the decode groups'.
        before = 0 if role == "prefill" else self.config.num_prefill * self.config.prefill.parallel.world_size
        return replace(cfg, kv=kv, rank_processes=not self._local,
                       device_offset=before + index * cfg.parallel.world_size)

    def _transport(self) -> str:
        if self.config.transport is not None:
            return self.config.transport
        return _transport(self.config, self._local)

    def _enable_sends(self, group: Group) -> None:
        group.engine.enable_kv_sends(KVSendHook(self.routes, self.config.layers_per_message,
                                                lambda cmds: self._on_send(group, cmds)))

    def _check_compatible(self) -> None:
        p, d = self.prefills[0].engine.model_cfg, self.decodes[0].engine.model_cfg
        check_compatible(self.config.prefill.cache.block_size, self.config.decode.cache.block_size,
                         (p.num_layers, p.num_kv_heads, p.head_dim), (d.num_layers, d.num_kv_heads, d.head_dim))

    def _connect(self, joining: list[Group]) -> None:
        """Pairwise KV links between the joining groups and every healthy group of the other
        role (all at once: both ends of a link must connect together)."""
        calls = {}
        for group in joining:
            other = self.decodes if group.role == "prefill" else self.prefills
            calls[group.name] = (group, [g.namespace for g in other if g.healthy and g not in joining]
                                 + [g.namespace for g in other if g in joining])
        for group in (g for g in self.groups if g.healthy and g not in joining):
            news = [j.namespace for j in joining if j.role != group.role]
            if news:
                calls[group.name] = (group, news)
        for group, namespaces in calls.values():
            group.engine.executor.kv_connect(self.routes, namespaces)
        for group, _ in calls.values():
            group.engine.executor.wait_kv_connected(self.config.transfer_timeout_s)

    def loads(self, role: str) -> list[GroupLoad]:
        if role == "prefill":
            return [g.load() for g in self.prefills]
        # A decode group's reservations (prompts still on prefill or on the wire) are load it
        # has taken on: without them a burst of requests would all rank the same group first.
        incoming = Counter(t.decode.name for t in self._transfers.values())
        return [replace(load, num_waiting=load.num_waiting + incoming[g.name])
                for g in self.decodes for load in (g.load(),)]

    def _ranked(self, role: str, prompt_ids: list[int]) -> list[Group]:
        names = self.policy.rank(role, self.loads(role), prompt_ids)
        return [self.group(n) for n in names if self.group(n).healthy]

    def failed_groups(self) -> list[Group]:
        return [g for g in self.groups if g.error is not None]

    def new_group_config(self, name: str) -> Group:
        """A fresh incarnation of a lost group (build its engine with ``engine_factory``, then
        `attach_group`); safe to call from another thread."""
        old = self.group(name)
        prefix = old.name.rsplit("-", 1)[0]
        # Never one handed out before: an incarnation whose attach failed may have left KV
        # links under its namespace on the other side.
        restarts = self._incarnations[name] = max(old.restarts, self._incarnations.get(name, 0)) + 1
        return self._new_group(old.role, old.index, prefix, restarts)

    def attach_group(self, group: Group, engine: LLMEngine) -> None:
        """Put a rebuilt group in place of the lost one of its name; its KV links connect now
        (with the other role's healthy groups, looked at first: one that died since the last
        step is marked failed rather than connected to)."""
        for other in (self.decodes if group.role == "prefill" else self.prefills):
            self._look(other)
        group.engine = engine
        try:
            if self.prefills:
                self._connect([group])
        except WorkerGroupError:
            engine.shutdown()
            raise
        role_list = self.prefills if group.role == "prefill" else self.decodes
        old = self.group(group.name)
        if old.engine is not None:
            old.engine.shutdown()
        role_list[role_list.index(old)] = group
        if group.role == "prefill":
            self._enable_sends(group)
        logger.info("group %s rejoined (restart %d)", group.name, group.restarts)

    # ---- the API LLM uses ------------------------------------------------------------------

    @property
    def model_cfg(self):
        return self.decodes[0].engine.model_cfg

    def tokenize(self, prompt) -> list[int]:
        return self.decodes[0].engine.tokenize(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request cannot run. Checked on a healthy group of each role
        (a role's groups share one config): a lost group must not refuse the requests that
        the others serve. No decode group left: RuntimeError (the service's fault, not the
        request's); no prefill group left: decode's check is the one that counts (the
        failure policy applies once it is dispatched)."""
        if self._first_healthy(self.decodes, lambda e: e.validate(prompt_ids, params)) is None:
            raise RuntimeError("no decode group is available (every one failed; they are being rebuilt)")
        self._first_healthy(self.prefills, lambda e: e.validate(prompt_ids, first_token_params(params)))

    def _first_healthy(self, groups: list[Group], call: Callable[[LLMEngine], object]) -> Group | None:
        """The first healthy group ``call`` succeeds on (a group found failed on the way is
        marked so); None if there is none. Any other error of ``call`` propagates."""
        for group in groups:
            if group.healthy and self._on_group(group, lambda: call(group.engine))[0]:
                return group
        return None

    def add_request(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams | None = None,
                    *, stream: bool = False, prompt: str | None = None, cache_salt: str | None = None) -> str:
        """``cache_salt``: shares prefix-cache blocks (decode's and prefill's) only with
        requests of the same salt."""
        params = params or SamplingParams()
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        if request_id in self._live or any(g.healthy and g.engine.has_request(request_id) for g in self.groups):
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        check_cache_salt(cache_salt)
        request = _Request(request_id, list(prompt_ids), params, stream, prompt, time.monotonic(),
                           cache_salt=cache_salt)
        self._live[request_id] = request
        self._queue.append(request)
        return request_id

    def abort_request(self, request_id: str) -> None:
        request = self._live.get(request_id)
        if request is None:
            return
        if request in self._queue:
            self._queue.remove(request)
            self._apply_policy(request, "fail", "aborted by the client")
        elif (transfer_id := self._by_request.get(request_id)) is not None:
            self._fail(self._transfers[transfer_id], "aborted by the client", policy="fail")
        elif request.decode is not None and request.decode.healthy:
            request.decode.engine.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._live or self._outputs)

    def stage_summary(self, clear: bool = False) -> dict[str, dict[str, float]]:
        """Milliseconds each stage took over the logged transfers (p50, p90, p99, mean): where a
        request's time to first token goes in disaggregated mode."""
        out: dict[str, dict[str, float]] = {}
        for a, b in [*zip(STAGES, STAGES[1:]), (STAGES[0], STAGES[-1])]:
            xs = sorted(1e3 * (t[b] - t[a]) for t in self.stage_log if a in t and b in t)
            if xs:
                out[f"{a}->{b}"] = {"n": len(xs), "mean": sum(xs) / len(xs),
                                    **{f"p{q}": xs[min(len(xs) - 1, len(xs) * q // 100)] for q in (50, 90, 99)}}
        if clear:
            self.stage_log.clear()
        return out

    @property
    def num_live_requests(self) -> int:
        """Requests added and not finished (queued, transferring, or on a group)."""
        return len(self._live)

    @property
    def num_open_transfers(self) -> int:
        return len(self._transfers)

    def shutdown(self) -> None:
        for group in self.groups:
            if group.engine is not None:
                group.engine.shutdown()

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Submit to every group, then collect from those whose batch is done: groups never
        wait on each other (a decode step is not held back by a long prefill step)."""
        self._dispatch_queued()
        busy = [g for g in self.groups if g.healthy and g.engine.has_unfinished_requests()]
        for group in busy:  # every group's ranks start before the driver waits on any
            self._run(group, group.engine.submit)
        done = self._wait_for_any(busy)
        for group in (g for g in done if g.role == "prefill"):
            self._collect_prefill(group)
        self._settle()
        for group in (g for g in done if g.role == "decode"):
            outputs = self._run(group, group.engine.step)
            self._mark_suspects(group)
            for out in outputs or ():
                self._emit(out)
        outputs, self._outputs = self._outputs, []
        return outputs

    def _done(self, busy: list[Group]) -> list[Group]:
        return [g for g in busy if g.healthy and self._run(g, g.engine.ready)]

    def _wait_for_any(self, busy: list[Group]) -> list[Group]:
        """The busy groups ready to step, waiting (at most `WAIT_SLICE_S`) for the first batch
        result or transfer report when there is none yet; the step deadline is the
        executors' (a batch past it fails its group in `ready`)."""
        done = self._done(busy)
        healthy = [g for g in self.groups if g.healthy]
        if done or any(self._run(g, g.engine.executor.has_events) for g in healthy):
            return done
        if not any(g.engine.in_flight for g in busy) and not self._transfers:
            return done  # nothing will arrive: the caller decides whether to wait for requests
        handles = [h for g in healthy for h in g.engine.executor.wait_handles()] + self.wake_handles
        if handles:
            wait(handles, timeout=WAIT_SLICE_S)
        else:  # in-process groups: their KV agents report from threads
            time.sleep(0.0005)
        return self._done(busy)

    def _run(self, group: Group, call):
        if not group.healthy:
            return None
        try:
            return call()
        except WorkerGroupError as err:
            self._group_failed(group, err)
            return None

    def _look(self, group: Group) -> None:
        """Read what the group's ranks sent, now (kept for its step): a rank that died since
        the last read fails the group here, marked and its requests re-sent."""
        if group.healthy:
            self._run(group, group.engine.executor.ready)

    def _on_group(self, group: Group, call: Callable[[], object]) -> tuple[bool, object]:
        """Place a request on (or check it against) ``group``: (True, the result), or (False,
        None) if the group turns out to have failed: its ranks gone (WorkerGroupError), or
        its engine failed already and refusing (RuntimeError). The group is then marked
        failed and its requests re-sent, and the caller tries another group. A request's
        own error (ValueError) propagates."""
        try:
            return True, call()
        except WorkerGroupError as err:
            self._group_failed(group, err)
        except RuntimeError:
            if group.engine is None or group.engine.failure is None:
                raise  # not a lost group: a bug, never to be taken for one
            self._group_failed(group, WorkerGroupError(group.engine.failure))
        return False, None

    def _dispatch_queued(self) -> None:
        while self._queue:
            request = self._queue.popleft()
            if not self._place(request):
                self._queue.appendleft(request)
                return  # first come, first served: the rest wait behind it

    def _place(self, request: _Request) -> bool:
        """Start the request on the groups the policy ranks first; False: it waits for decode
        blocks. A group found failed on the way (its ranks died since the last step looked)
        is marked failed here, its own requests re-sent, and the request ranked again among
        the rest: it never fails while a healthy group of each role is left. That costs the
        request no retry (it never ran there); each such round takes a group out, so it ends."""
        while True:
            decodes = self._ranked("decode", request.prompt_ids)
            if not decodes:
                self._apply_policy(request, "fail", "no decode group is available")
                return True
            if not self.prefills or request.suspect:  # aggregated groups, or a suspect: whole on decode
                self._run_on_decode(request, decodes)
                return True
            prefills = self._ranked("prefill", request.prompt_ids)
            if not prefills:
                self._no_transfer(request, "no prefill group is available")
                return True
            placed = self._reserve(request, decodes, prefills[0])
            if placed is None:
                continue  # a group failed: rank again
            if placed:
                return True
            if not self._give_up_waiting(request.queued_at):
                return False
            self._no_transfer(request, "decode has no free KV blocks")
            return True

    def _reserve(self, request: _Request, decodes: list[Group], prefill: Group) -> bool | None:
        """True: reserved and started; False: no decode group has the blocks free now; None: a
        group failed on the way (marked failed)."""
        prompt_ids, params = request.continuation()
        for decode in decodes:
            ok, seq = self._on_group(decode, lambda: decode.engine.reserve(
                request.request_id, prompt_ids, params, request.cache_salt))
            if not ok:
                return None
            if seq is not None:
                return self._start(request, prefill, decode, seq)
        return False

    def _give_up_waiting(self, queued_at: float) -> bool:
        """Blocks come back only as decode requests end or transfers close: with none of those
        pending, or past the queue timeout, waiting longer is pointless."""
        idle = not self._transfers and not any(g.healthy and g.engine.has_unfinished_requests() for g in self.decodes)
        return idle or time.monotonic() - queued_at > self.config.queue_timeout_s

    def _start(self, request: _Request, prefill: Group, decode: Group, seq: Sequence) -> bool | None:
        """Queue the prompt on prefill, its KV bound for ``seq``'s blocks on decode; None (the
        reservation cancelled) if the prefill group turns out to have failed."""
        skip = seq.num_computed_tokens // decode.engine.block_manager.block_size  # decode's own prefix hits
        transfer = _Transfer(next(self._transfer_ids), request, prefill, decode, seq, skip)
        prompt_ids, params = request.continuation()
        plan = SendPlan(transfer.transfer_id, skip, decode.namespace)
        try:
            ok, _ = self._on_group(prefill, lambda: prefill.engine.add_prefill_request(
                request.request_id, prompt_ids, params, plan, request.cache_salt))
        except ValueError as err:  # prefill's limits: only if none was healthy to check it on
            decode.engine.cancel_reservation(seq)
            self._no_transfer(request, f"prefill cannot take the prompt: {err}")
            return True
        if not ok:
            decode.engine.cancel_reservation(seq)
            return None
        transfer.deadline = time.monotonic() + self.config.reservation_timeout_s  # the lease
        transfer.times["queued"], transfer.times["reserved"] = request.queued_at, time.monotonic()
        self._transfers[transfer.transfer_id] = transfer
        self._by_request[request.request_id] = transfer.transfer_id
        return True

    def _run_on_decode(self, request: _Request, decodes: list[Group] | None = None) -> None:
        """The whole request on a decode group (the policy's order; one found failed is marked
        so and the next tried); with none left it fails."""
        decodes = decodes if decodes is not None else self._ranked("decode", request.prompt_ids)
        prompt_ids, params = request.continuation()
        for decode in decodes:
            if decode.healthy and self._on_group(decode, lambda: decode.engine.add_request(
                    request.request_id, prompt_ids, params, stream=request.stream, prompt=request.prompt,
                    cache_salt=request.cache_salt))[0]:
                request.decode = decode
                if request.suspect:
                    decode.engine.isolate(request.request_id)
                return
        self._apply_policy(request, "fail", "no decode group is available")

    def _on_send(self, prefill: Group, cmds: list[SendCommand]) -> list[SendCommand]:
        """A prefill step that pushes these transfers is being submitted: each decode group's
        ranks post the receives, in the same order. Closed transfers are dropped."""
        by_decode: dict[str, tuple[Group, list[SendCommand], list[RecvCommand]]] = {}
        for cmd in cmds:
            transfer = self._transfers.get(cmd.transfer_id)
            if transfer is None or transfer.state is not TransferState.WAITING or not transfer.decode.healthy:
                continue
            skip = transfer.skip_blocks
            _, sends, recvs = by_decode.setdefault(transfer.decode.name, (transfer.decode, [], []))
            recvs.append(RecvCommand(cmd.transfer_id, transfer.reservation.block_ids[skip:skip + len(cmd.block_ids)],
                                     cmd.routes, cmd.layers_per_message, prefill.namespace))
            sends.append(cmd)
        out = []
        deadline = time.monotonic() + self.config.transfer_timeout_s
        for decode, sends, recvs in by_decode.values():
            if not self._decode_control(decode, lambda executor: executor.kv_recv(recvs)):
                continue
            for cmd in sends:
                transfer = self._transfers[cmd.transfer_id]
                transfer.state, transfer.deadline = TransferState.TRANSFERRING, deadline
                transfer.times["sending"] = time.monotonic()
            out += sends
        return out

    def _decode_control(self, decode: Group, command: Callable[[Executor], None]) -> bool:
        """Run a KV command on a decode group's executor; False if the group is lost."""
        try:
            command(decode.engine.executor)
            return True
        except WorkerGroupError as err:  # the group is handled once the prefill step is back
            decode.error = decode.error or str(err)
            return False

    def _collect_prefill(self, group: Group) -> None:
        outputs = self._run(group, group.engine.step)
        self._judged_on_prefill(group)
        for out in outputs or ():
            transfer = self._transfers.get(self._by_request.get(out.request_id, -1))
            if transfer is not None and out.token_ids:
                transfer.first_token = out.token_ids[0]
                transfer.times["first_token"] = time.monotonic()
                transfer.logprobs = out.logprobs[0] if out.logprobs else None

    def _emit(self, out: RequestOutput) -> None:
        """A decode group's output, as the client sees it (tokens from lost groups first).
        What is new is counted from what the client was given, not from the group's view: a
        lost group may have generated tokens it never reported (the first token of a request
        admitted just before the group died), and they come first in the next output."""
        request = self._live.get(out.request_id)
        if request is None:
            return
        if request.done_ids:
            out.token_ids = request.done_ids + out.token_ids
            out.text = request.done_text + out.text
            out.prompt_token_ids = request.prompt_ids
            if out.logprobs is not None:
                out.logprobs = [None] * len(request.done_ids) + out.logprobs
        out.new_token_ids = out.token_ids[request.num_sent_tokens:]
        out.new_text = out.text[request.num_sent_chars:]
        request.num_sent_tokens, request.num_sent_chars = len(out.token_ids), len(out.text)
        if out.finished:
            del self._live[out.request_id]
        self._outputs.append(out)

    # ---- acknowledgements, deadlines, failures ---------------------------------------------

    def _settle(self) -> None:
        for group in self.groups:  # a failure noticed while sending control messages
            if group.error is not None and group.engine is not None and group.engine.failure is None:
                self._group_failed(group, WorkerGroupError(group.error))
        # Deadlines first: an acknowledgement that comes after its lease expired does not count.
        now = time.monotonic()
        for transfer in list(self._transfers.values()):
            if transfer.state is TransferState.TRANSFERRING and now > transfer.deadline:
                self.metrics.num_timeouts += 1
                self._fail(transfer, f"no acknowledgement within {self.config.transfer_timeout_s:.1f} s")
            elif transfer.state is TransferState.WAITING and now > transfer.deadline:
                self._fail(transfer, f"reservation lease of {self.config.reservation_timeout_s:.0f} s expired "
                                     "before prefill got to the prompt")
        for event in self._events():
            transfer = self._transfers.get(event.transfer_id)
            if transfer is not None:
                self._on_event(transfer, event)
        for transfer in list(self._transfers.values()):
            if transfer.state is TransferState.DONE and transfer.first_token is not None:
                self._close_done(transfer)

    def _events(self) -> list[TransferEvent]:
        events = []
        for group in self.groups:  # also how a dead rank of an idle group is noticed
            events += self._run(group, group.engine.executor.poll_events) or []
        return events

    def _judged_on_prefill(self, group: Group) -> None:
        """A prefill step raised and the group went on: its engine aborted the batch's requests
        (`LLMEngine.blamed`); their transfers end, the culprit fails, the others are re-sent."""
        if not group.healthy:
            return  # a group lost on the way: `_group_failed` judged them
        for request_id, (verdict, reason) in group.engine.blamed.items():
            transfer = self._transfers.get(self._by_request.get(request_id, -1))
            if transfer is None or transfer.prefill is not group:
                continue
            if transfer.state in (TransferState.TRANSFERRING, TransferState.DONE) and transfer.decode.healthy:
                self._decode_control(transfer.decode, lambda executor: executor.kv_cancel(transfer.transfer_id))
            self._drop(transfer)
            self._after_loss(transfer.request, verdict, reason if verdict is Verdict.CULPRIT else f"{group.name}: {reason}")

    def _mark_suspects(self, group: Group) -> None:
        """A decode step raised and the group went on: its engine runs the suspects again
        isolated; they stay suspects if they have to move to another group."""
        if group.healthy:
            for request_id, (verdict, _) in group.engine.blamed.items():
                if verdict is Verdict.SUSPECT and request_id in self._live:
                    self._live[request_id].suspect = True

    def _after_loss(self, request: _Request, verdict: Verdict | None, reason: str) -> None:
        """A request lost with its group or its batch: the culprit of a step that raised fails
        (never re-sent); any other is re-sent, a suspect to run isolated (module doc)."""
        if verdict is Verdict.CULPRIT:
            logger.error("request %s is failed, not re-sent: %s", request.request_id, reason)
            self._apply_policy(request, "fail", reason, code="INTERNAL")
            return
        request.suspect = request.suspect or verdict is Verdict.SUSPECT
        self._retry(request, reason)

    def _group_failed(self, group: Group, err: WorkerGroupError) -> None:
        """A group is gone: its requests end there; transfers through it are dropped on both
        sides and their requests re-sent; a decode group's running requests continue elsewhere.
        If a step's exception ended it, that batch's requests are judged first (`_after_loss`)."""
        group.error, group.failed_at = group.error or str(err), time.monotonic()
        if group.engine.failure is None:  # the step that ended it, however its loss was found
            step_failure = getattr(err, "step_failure", None) or getattr(group.engine.executor, "step_failure", None)
            group.engine.fail_all(str(err), step_failure)
        blamed = group.engine.blamed
        logger.error("group %s failed: %s", group.name, group.error)
        # The groups at the other end of its transfers may be gone too (both lost at once):
        # looked at first, so that no request is aborted on a dead group that has not been
        # marked yet (its `fail_all` would then miss blocks of a batch in flight).
        others = {t.decode if t.prefill is group else t.prefill for t in self._transfers.values()
                  if group in (t.prefill, t.decode)}
        for other in others:
            self._look(other)
        for transfer in [t for t in self._transfers.values() if group in (t.prefill, t.decode)]:
            posted = transfer.state in (TransferState.TRANSFERRING, TransferState.DONE)
            if posted and transfer.decode is not group and transfer.decode.healthy:
                # Its receive is posted: nothing may write those blocks once they are free.
                self._decode_control(transfer.decode, lambda executor: executor.kv_cancel(transfer.transfer_id))
            self._drop(transfer)
            verdict, why = blamed.get(transfer.request.request_id, (None, ""))
            self._after_loss(transfer.request, verdict, why or f"{group.name} failed: {group.error}")
        if group.role == "decode":
            lost = group.engine.lost_outputs
            for request in [r for r in self._live.values() if r.decode is group]:
                request.decode = None
                tokens = lost.get(request.request_id, [])
                request.done_ids = request.done_ids + tokens
                if tokens and self.tokenizer is not None:
                    request.done_text = self.tokenizer.decode(request.done_ids, skip_special_tokens=True)
                verdict, why = blamed.get(request.request_id, (None, ""))
                self._after_loss(request, verdict, why or f"{group.name} failed: {group.error}")

    def _retry(self, request: _Request, reason: str) -> None:
        """Send the request through again (first in line), or fail it after too many tries."""
        request.retries += 1
        if request.retries > self.config.max_retries:
            self._apply_policy(request, "fail", f"gave up after {request.retries - 1} retries: {reason}")
            return
        logger.warning("re-sending request %s (%s)", request.request_id, reason)
        self.num_resent += 1
        request.queued_at = time.monotonic()
        self._queue.appendleft(request)

    def _on_event(self, transfer: _Transfer, event: TransferEvent) -> None:
        if event.side == "send":
            if not event.ok:
                self._fail(transfer, f"prefill rank {event.rank} could not send: {event.error}")
            return
        if not event.ok:
            self._fail(transfer, f"decode rank {event.rank}: {event.error}")
            return
        transfer.acks.add(event.rank)
        transfer.num_bytes += event.num_bytes
        transfer.seconds = max(transfer.seconds, event.seconds)
        if transfer.state is TransferState.TRANSFERRING and len(transfer.acks) == transfer.decode.config.parallel.world_size:
            transfer.state = TransferState.DONE
            transfer.times["acked"] = time.monotonic()
            self.metrics.record(transfer.num_bytes, transfer.seconds)

    def _fail(self, transfer: _Transfer, reason: str, policy: str | None = None) -> None:
        """End the transfer now: cancel it on decode if posted, free both sides, apply the policy.
        A rank's error is often its peer's group dying (a receive fails when the sender's
        process is gone, before the driver reads that its pipe closed): both groups are looked
        at first, and a dead one's failure takes the transfer over (its request re-sent)."""
        if transfer.transfer_id not in self._transfers:
            return  # closed already (a group failure found on the way)
        if policy is None:
            for group in (transfer.prefill, transfer.decode):
                self._look(group)
            if transfer.transfer_id not in self._transfers:
                return
        was_posted = transfer.state in (TransferState.TRANSFERRING, TransferState.DONE)
        transfer.state, transfer.error = TransferState.FAILED, reason
        transfer.policy = policy or self.config.failure_policy
        if policy is None:  # an abort is the client's choice, not a failure of the service
            self.metrics.num_failures += 1
        logger.warning("KV transfer %d of request %s failed (%s): %s", transfer.transfer_id,
                       transfer.request.request_id, transfer.policy, reason)
        if was_posted and transfer.decode.healthy:  # ranks handle the cancel before any later message
            self._decode_control(transfer.decode, lambda executor: executor.kv_cancel(transfer.transfer_id))
        self._drop(transfer)
        self._apply_policy(transfer.request, transfer.policy, reason)

    def _close_done(self, transfer: _Transfer) -> None:
        transfer.times["admitted"] = time.monotonic()
        self.stage_log.append(transfer.times)
        request = transfer.request
        self._forget(transfer)
        transfer.prefill.engine.release(request.request_id)
        request.decode = transfer.decode
        transfer.decode.engine.admit_prefilled(transfer.reservation, transfer.first_token, transfer.logprobs,
                                               stream=request.stream, prompt=request.prompt)

    def _drop(self, transfer: _Transfer) -> None:
        """Forget the transfer and free both sides: prefill's held blocks, decode's reservation
        (a failed group's engine has freed everything already)."""
        self._forget(transfer)
        request_id = transfer.request.request_id
        transfer.prefill.engine.release(request_id)
        transfer.prefill.engine.abort_request(request_id)
        transfer.decode.engine.cancel_reservation(transfer.reservation)

    def _forget(self, transfer: _Transfer) -> None:
        del self._transfers[transfer.transfer_id]
        del self._by_request[transfer.request.request_id]

    def _no_transfer(self, request: _Request, reason: str) -> None:
        """No transfer can start: recompute on decode, or fail, by the policy."""
        self.metrics.num_failures += 1
        logger.warning("request %s gets no KV transfer (%s): %s", request.request_id,
                       self.config.failure_policy, reason)
        self._apply_policy(request, self.config.failure_policy, reason)

    def _apply_policy(self, request: _Request, policy: str, reason: str, code: str | None = None) -> None:
        """"recompute": decode prefills the prompt itself; "fail": the request ends with an error
        (``code``: `RequestOutput.error_code`)."""
        if policy == "recompute":
            self._run_on_decode(request)
            return
        self._live.pop(request.request_id, None)
        self._outputs.append(RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_ids, token_ids=list(request.done_ids),
            text=request.done_text, finished=True, finish_reason="abort", error=reason, error_code=code,
            prompt=request.prompt))


def _transport(config: DisaggConfig, local: bool) -> TransportKind:
    """In-process for two local engines; gloo on CPU; NCCL when every rank of every group has
    a GPU of its own, else CUDA IPC (NCCL refuses two ranks on one device)."""
    if local:
        return TransportKind.INPROCESS
    device = resolve_device(config.decode.device)
    if device.type != "cuda":
        return TransportKind.GLOO
    import torch

    ranks = (config.num_prefill * config.prefill.parallel.world_size
             + config.num_decode * config.decode.parallel.world_size)
    return TransportKind.NCCL if torch.cuda.device_count() >= ranks else TransportKind.CUDA_IPC


def _start_store(host: str):
    """The TCPStore the pairwise groups rendezvous on, listening on ``host`` only (the address
    the ranks reach it at: the node's cluster IP, or 127.0.0.1 on one machine); lives as long as
    the engine. TCPStore itself always listens on every interface (its ``host_name`` is only
    where clients connect), so the socket is bound here and handed over as ``master_listen_fd``:
    the store then owns it and closes it (checked with torch 2.11 and 2.13, libuv and classic)."""
    import contextlib
    import os
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()
    try:
        return dist.TCPStore(host, port, None, True, timedelta(seconds=60), wait_for_workers=False,
                             master_listen_fd=fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
