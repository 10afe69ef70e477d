"""Disaggregated engine: prefill groups and decode groups in one driver, KV moved between.

One driver steps every group (each a `GroupEngine` over its ranks: in this process, spawned
processes, or Ray actors); `LLM(mode="disaggregated")` is the 1 prefill + 1 decode case, the
router on Ray runs any number of each. With no prefill group (aggregated groups, role
``worker``) requests run whole on one group. Three parts, each with one job:

    GroupSet       (group_set.py) the groups of each role, the policy's choice among them,
                   a lost group's next incarnation
    TransferTable  (transfer_table.py) every open KV transfer's phase, deadlines, acks and
                   first token; one transition function returning the effects to carry out
    RequestBook    (disagg_requests.py) the live requests, their line, what each client has
                   been given (outputs stitched across lost groups), retries
    Recovery       (recovery.py) a lost group or a batch that raised: which requests are
                   re-sent, which fail
    DisaggEngine   (here) the driver: placing requests, stepping the groups, carrying out
                   the table's effects on them

Lifecycle of a request (the transfer's `Phase` in brackets):

    add_request  validated by both roles, queued (first come, first served)
    reserve      a decode group (the policy's order) reserves blocks for prompt + first
                 token, reusing its own prefix cache (those blocks are not sent); without free
                 blocks the request waits for running requests to end, up to
                 ``queue_timeout_s`` (or at once if nothing could free any), then the failure
                 policy applies
    prefill      [RESERVED] a prefill group (the policy's order) computes the prompt; when the
                 last chunk is submitted its ranks get the `SendCommand` and the decode ranks
                 a `RecvCommand`  [SENDING, with the ack deadline]
    first token  sampled on prefill (the request's own params and seed); blocks held
                 [TOKEN_BACK]; or every ack came first [ACKED]
    admitted     [ADMITTED] both: decode runs the request from the first token; prefill frees
                 its blocks (they stay cached)
    failure      [FAILED] a rank reported an error, the ack deadline or the reservation's
                 lease passed, or the client aborted: decode ranks are told to drop the
                 transfer (`cancel_kv_receive`: they process it before any later message, and
                 it waits out a write in progress, so nothing writes those blocks after it),
                 both sides free their blocks at once, then ``recompute`` (decode prefills the
                 prompt itself; the default) or ``fail`` (finish_reason "abort" and an error;
                 always so for an abort)

Groups fail and come back:
    prefill group lost  its transfers are dropped on both sides [DROPPED] and their requests re-sent
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
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from splitserve.kvtransfer.messages import (
    Direction, FaultConfig, RecvCommand, SendCommand, Side, TransferEvent, TransferMetrics, TransportKind,
)
from splitserve.kvtransfer.plan import check_layouts, make_routes
from splitserve.workers.cache_salt import check_cache_salt
from splitserve.workers.disagg_requests import DisaggRequest, RequestBook
from splitserve.workers.engine import (
    EngineConfig, KVSendHook, LLMEngine, SendPlan, first_token_params, resolve_device,
)
from splitserve.workers.executor import WorkerGroupError
from splitserve.workers.group_engine import GroupEngine
from splitserve.workers.group_set import Group, GroupLoad, GroupPolicy, GroupSet, InOrder, KVWiring
from splitserve.workers.outputs import RequestOutput
from splitserve.workers.recovery import Recovery
from splitserve.workers.roles import FailurePolicy, GroupRole
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.sequence import Sequence
from splitserve.workers.transfer_table import (
    Aborted, Acked, Admit, ApplyPolicy, CancelReceive, Event, Expired, FirstToken, FreeBoth,
    IllegalTransition, Phase, Posted, RankFailed, Transfer, TransferTable, TransferTimeouts,
)

__all__ = ["DisaggConfig", "DisaggEngine", "Group", "GroupLoad", "GroupPolicy", "InOrder"]

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
    #: Recompute: decode prefills the prompt itself; fail: the request ends with an error.
    failure_policy: FailurePolicy = FailurePolicy.RECOMPUTE
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
        if self.failure_policy not in tuple(FailurePolicy):
            raise ValueError(f"failure_policy must be 'recompute' or 'fail', got {self.failure_policy!r}")
        object.__setattr__(self, "failure_policy", FailurePolicy(self.failure_policy))  # YAML and CLI give strings
        if self.transfer_timeout_s <= 0 or self.layers_per_message < 1:
            raise ValueError("transfer_timeout_s must be positive and layers_per_message >= 1")
        if self.num_decode < 1 or (self.prefill is not None and self.num_prefill < 1):
            raise ValueError("at least one decode group, and one prefill group when prefill is configured")


EngineFactory = Callable[[Group], GroupEngine]


class DisaggEngine:
    def __init__(self, config: DisaggConfig, policy: GroupPolicy | None = None,
                 engine_factory: EngineFactory | None = None):
        self.config = config
        self._factory = engine_factory or (lambda group: LLMEngine(group.config))
        d_par = config.decode.parallel
        p_par = config.prefill.parallel if config.prefill is not None else None
        single = p_par is not None and config.num_prefill == config.num_decode == 1
        local = (config.in_process if config.in_process is not None
                 else single and p_par.world_size == d_par.world_size == 1)
        if local and (not single or p_par.world_size * d_par.world_size > 1):
            raise ValueError("in_process needs one 1 x 1 group on each side")
        self._store = None if local or p_par is None else _start_store(config.store_host)
        wiring = None if p_par is None else KVWiring(
            config.transport or _transport(config, local), config.store_host,
            self._store.port if self._store is not None else 0, config.faults)
        self.group_set = GroupSet(config.prefill, config.decode, config.num_prefill, config.num_decode,
                                  policy or InOrder(), wiring=wiring, rank_processes=not local,
                                  decode_prefix=config.decode_prefix)
        self.transfers = TransferTable(TransferTimeouts(config.reservation_timeout_s, config.transfer_timeout_s),
                                       config.failure_policy)
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
        self.requests = RequestBook(config.max_retries)
        self.recovery = Recovery(self.requests, self.transfers, close=self._handle, look=self._look,
                                 tokenizer=self.tokenizer)
        self._request_ids = itertools.count()
        #: Extra objects whose readiness ends a step's wait (the router's inbox doorbell).
        self.wake_handles: list = []

    # ---- groups ----------------------------------------------------------------------------

    @property
    def policy(self) -> GroupPolicy:
        return self.group_set.policy

    @policy.setter
    def policy(self, policy: GroupPolicy) -> None:
        self.group_set.policy = policy

    @property
    def prefills(self) -> list[Group]:
        return self.group_set.prefills

    @property
    def decodes(self) -> list[Group]:
        return self.group_set.decodes

    @property
    def groups(self) -> list[Group]:
        return self.group_set.groups

    @property
    def prefill(self) -> GroupEngine:
        """The first prefill group's engine (the one of a 1 + 1 engine)."""
        return self.prefills[0].engine

    @property
    def decode(self) -> GroupEngine:
        return self.decodes[0].engine

    def group(self, name: str) -> Group:
        return self.group_set.group(name)

    def failed_groups(self) -> list[Group]:
        return self.group_set.failed()

    def loads(self, role: GroupRole) -> list[GroupLoad]:
        return self.group_set.loads(role, self.transfers.incoming())

    def _ranked(self, role: GroupRole, prompt_ids: list[int]) -> list[Group]:
        incoming = self.transfers.incoming() if role is not GroupRole.PREFILL else None
        return self.group_set.ranked(role, prompt_ids, incoming)

    def _enable_sends(self, group: Group) -> None:
        group.engine.enable_kv_sends(KVSendHook(self.routes, self.config.layers_per_message,
                                                lambda cmds: self._on_send(group, cmds)))

    def _check_compatible(self) -> None:
        """Every prefill group's KV layout (block size, model shape, KV dtype, FP8 scales)
        against every decode group's, before any link connects: ValueError naming both sides'
        values on a mismatch (blocks are moved as bytes and read with the receiver's dtype)."""
        decodes = [d.engine.kv_layout() for d in self.decodes]
        for p in self.prefills:
            layout = p.engine.kv_layout()
            for other in decodes:
                check_layouts(layout, other)

    def _check_joining(self, group: Group) -> None:
        """`_check_compatible` for a rebuilt group against the other role's healthy groups."""
        mine = group.engine.kv_layout()
        for other in self.group_set.peers(group):
            if other.healthy:
                theirs = other.engine.kv_layout()
                check_layouts(*((mine, theirs) if group.role is GroupRole.PREFILL else (theirs, mine)))

    def _connect(self, joining: list[Group]) -> None:
        """Pairwise KV links between the joining groups and every healthy group of the other
        role (all at once: both ends of a link must connect together)."""
        calls = {}
        for group in joining:
            other = self.group_set.peers(group)
            calls[group.name] = (group, [g.namespace for g in other if g.healthy and g not in joining]
                                 + [g.namespace for g in other if g in joining])
        for group in (g for g in self.groups if g.healthy and g not in joining):
            news = [j.namespace for j in joining if j.role != group.role]
            if news:
                calls[group.name] = (group, news)
        for group, namespaces in calls.values():
            group.engine.start_kv_connect(self.routes, namespaces)
        for group, _ in calls.values():
            group.engine.finish_kv_connect(self.config.transfer_timeout_s)

    def new_group_config(self, name: str) -> Group:
        """A fresh incarnation of a lost group (build its engine with ``engine_factory``, then
        `attach_group`); safe to call from another thread."""
        return self.group_set.next_incarnation(name)

    def attach_group(self, group: Group, engine: GroupEngine) -> None:
        """Put a rebuilt group in place of the lost one of its name; its KV links connect now
        (with the other role's healthy groups, looked at first: one that died since the last
        step is marked failed rather than connected to)."""
        for other in self.group_set.peers(group):
            self._look(other)
        group.engine = engine
        try:
            if self.prefills:
                self._check_joining(group)
                self._connect([group])
        except (WorkerGroupError, ValueError):
            engine.shutdown()
            raise
        old = self.group_set.put(group)
        if old.engine is not None:
            old.engine.shutdown()
        if group.role is GroupRole.PREFILL:
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

    def _first_healthy(self, groups: list[Group], call: Callable[[GroupEngine], object]) -> Group | None:
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
        if request_id in self.requests or any(g.healthy and g.engine.has_request(request_id) for g in self.groups):
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        check_cache_salt(cache_salt)
        self.requests.add(DisaggRequest(request_id, list(prompt_ids), params, stream, prompt, time.monotonic(),
                                        cache_salt=cache_salt))
        return request_id

    def abort_request(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        if self.requests.is_queued(request):
            self.requests.unqueue(request)
            self.requests.fail(request, "aborted by the client")
        elif (transfer := self.transfers.of_request(request_id)) is not None:
            self._handle(transfer, Aborted())
        elif request.decode is not None and request.decode.healthy:
            request.decode.engine.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.requests.has_unfinished()

    @property
    def metrics(self) -> TransferMetrics:
        return self.transfers.metrics

    @property
    def stage_log(self):
        return self.transfers.stage_log

    def stage_summary(self, clear: bool = False) -> dict[str, dict[str, float]]:
        return self.transfers.stage_summary(clear)

    @property
    def num_live_requests(self) -> int:
        """Requests added and not finished (queued, transferring, or on a group)."""
        return self.requests.num_live

    @property
    def num_resent(self) -> int:
        return self.requests.num_resent

    @property
    def num_open_transfers(self) -> int:
        return len(self.transfers)

    def shutdown(self) -> None:
        for group in self.groups:
            if group.engine is not None:
                group.engine.shutdown()

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Place queued requests; submit to every group, then collect from those whose batch is
        done (groups never wait on each other: a decode step is not held back by a long
        prefill step); settle transfers between the two."""
        self._dispatch_queued()
        busy = [g for g in self.groups if g.healthy and g.engine.has_unfinished_requests()]
        for group in busy:  # every group's ranks start before the driver waits on any
            self._run(group, group.engine.submit)
        done = self._wait_for_any(busy)
        for group in (g for g in done if g.role is GroupRole.PREFILL):
            self._collect_prefill(group)
        self._settle()
        for group in (g for g in done if g.role.generates):
            self._collect_decode(group)
        return self.requests.take_outputs()

    def _done(self, busy: list[Group]) -> list[Group]:
        return [g for g in busy if g.healthy and self._run(g, g.engine.ready)]

    def _wait_for_any(self, busy: list[Group]) -> list[Group]:
        """The busy groups ready to step, waiting (at most `WAIT_SLICE_S`) for the first batch
        result or transfer report when there is none yet; the step deadline is the
        executors' (a batch past it fails its group in `ready`)."""
        done = self._done(busy)
        healthy = [g for g in self.groups if g.healthy]
        if done or any(self._run(g, g.engine.has_transfer_events) for g in healthy):
            return done
        if not any(g.engine.in_flight for g in busy) and not len(self.transfers):
            return done  # nothing will arrive: the caller decides whether to wait for requests
        handles = [h for g in healthy for h in g.engine.wait_handles()] + self.wake_handles
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
            self.recovery.group_lost(group, err)
            return None

    def _look(self, group: Group) -> None:
        """Read what the group's ranks sent, now (kept for its step): a rank that died since
        the last read fails the group here, marked and its requests re-sent."""
        if group.healthy:
            self._run(group, group.engine.poll_ranks)

    def _on_group(self, group: Group, call: Callable[[], object]) -> tuple[bool, object]:
        """Place a request on (or check it against) ``group``: (True, the result), or (False,
        None) if the group turns out to have failed: its ranks gone (WorkerGroupError), or
        its engine failed already and refusing (RuntimeError). The group is then marked
        failed and its requests re-sent, and the caller tries another group. A request's
        own error (ValueError) propagates."""
        try:
            return True, call()
        except WorkerGroupError as err:
            self.recovery.group_lost(group, err)
        except RuntimeError:
            if group.engine is None or group.engine.failure is None:
                raise  # not a lost group: a bug, never to be taken for one
            self.recovery.group_lost(group, WorkerGroupError(group.engine.failure))
        return False, None

    # ---- placing requests ------------------------------------------------------------------

    def _dispatch_queued(self) -> None:
        while (request := self.requests.next_queued()) is not None:
            if not self._place(request):
                self.requests.push_front(request)
                return  # first come, first served: the rest wait behind it

    def _place(self, request: DisaggRequest) -> bool:
        """Start the request on the groups the policy ranks first; False: it waits for decode
        blocks. A group found failed on the way (its ranks died since the last step looked)
        is marked failed here, its own requests re-sent, and the request ranked again among
        the rest: it never fails while a healthy group of each role is left. That costs the
        request no retry (it never ran there); each such round takes a group out, so it ends."""
        while True:
            decodes = self._ranked(self.group_set.decode_role, request.prompt_ids)
            if not decodes:
                self.requests.fail(request, "no decode group is available")
                return True
            if not self.prefills or request.suspect:  # aggregated groups, or a suspect: whole on decode
                self._run_on_decode(request, decodes)
                return True
            prefills = self._ranked(GroupRole.PREFILL, request.prompt_ids)
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

    def _reserve(self, request: DisaggRequest, decodes: list[Group], prefill: Group) -> bool | None:
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
        idle = not len(self.transfers) and not any(g.healthy and g.engine.has_unfinished_requests()
                                                   for g in self.decodes)
        return idle or time.monotonic() - queued_at > self.config.queue_timeout_s

    def _start(self, request: DisaggRequest, prefill: Group, decode: Group, seq: Sequence) -> bool | None:
        """Queue the prompt on prefill, its KV bound for ``seq``'s blocks on decode; None (the
        reservation cancelled) if the prefill group turns out to have failed."""
        skip = seq.num_computed_tokens // decode.engine.kv_usage().block_size  # decode's own prefix hits
        transfer_id = self.transfers.new_id()
        prompt_ids, params = request.continuation()
        plan = SendPlan(transfer_id, skip, decode.namespace)
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
        self.transfers.open(transfer_id, request_id=request.request_id, request=request, prefill=prefill,
                            decode=decode, reservation=seq, skip_blocks=skip,
                            num_decode_ranks=decode.config.parallel.world_size,
                            queued_at=request.queued_at, now=time.monotonic())
        return True

    def _run_on_decode(self, request: DisaggRequest, decodes: list[Group] | None = None) -> None:
        """The whole request on a decode group (the policy's order; one found failed is marked
        so and the next tried); with none left it fails."""
        if decodes is None:
            decodes = self._ranked(self.group_set.decode_role, request.prompt_ids)
        prompt_ids, params = request.continuation()
        for decode in decodes:
            if decode.healthy and self._on_group(decode, lambda: decode.engine.add_request(
                    request.request_id, prompt_ids, params, stream=request.stream, prompt=request.prompt,
                    cache_salt=request.cache_salt))[0]:
                request.decode = decode
                if request.suspect:
                    decode.engine.isolate(request.request_id)
                return
        self.requests.fail(request, "no decode group is available")

    # ---- transfers -------------------------------------------------------------------------

    def _on_send(self, prefill: Group, cmds: list[SendCommand]) -> list[SendCommand]:
        """A prefill step that pushes these transfers is being submitted: each decode group's
        ranks post the receives, in the same order. Closed transfers are dropped."""
        by_decode: dict[str, tuple[Group, list[Transfer], list[SendCommand], list[RecvCommand]]] = {}
        for cmd in cmds:
            transfer = self.transfers.get(cmd.transfer_id)
            if transfer is None or transfer.phase is not Phase.RESERVED or not transfer.decode.healthy:
                continue
            skip = transfer.skip_blocks
            _, transfers, sends, recvs = by_decode.setdefault(transfer.decode.name, (transfer.decode, [], [], []))
            recvs.append(RecvCommand(cmd.transfer_id, transfer.reservation.block_ids[skip:skip + len(cmd.block_ids)],
                                     cmd.routes, cmd.layers_per_message, prefill.namespace))
            transfers.append(transfer)
            sends.append(cmd)
        out = []
        for decode, transfers, sends, recvs in by_decode.values():
            if not self._on_decode_ranks(decode, lambda: decode.engine.post_kv_receives(recvs)):
                continue
            now = time.monotonic()
            for transfer in transfers:
                self._handle(transfer, Posted(now))
            out += sends
        return out

    def _on_decode_ranks(self, decode: Group, call: Callable[[], None]) -> bool:
        """A control message to a decode group's ranks; False if they are gone (the group is
        marked, and handled once the prefill step being submitted is back)."""
        try:
            call()
            return True
        except WorkerGroupError as err:
            decode.error = decode.error or str(err)
            return False

    def _collect_prefill(self, group: Group) -> None:
        outputs = self._run(group, group.engine.step)
        self.recovery.prefill_batch_judged(group)
        for out in outputs or ():
            transfer = self.transfers.of_request(out.request_id)
            if transfer is not None and out.token_ids:
                self._handle(transfer, FirstToken(out.token_ids[0], out.logprobs[0] if out.logprobs else None,
                                                  time.monotonic()), from_rank=True)

    def _collect_decode(self, group: Group) -> None:
        outputs = self._run(group, group.engine.step)
        self.recovery.mark_suspects(group)
        for out in outputs or ():
            self.requests.emit(out)

    def _settle(self) -> None:
        for group in self.groups:  # a failure noticed while sending control messages
            if group.error is not None and group.engine is not None and group.engine.failure is None:
                self.recovery.group_lost(group, WorkerGroupError(group.error))
        # Deadlines first: an acknowledgement that comes after its lease expired does not count.
        now = time.monotonic()
        for transfer in self.transfers:
            if transfer.past_deadline(now) and self._still_open_after_looking(transfer):
                self._handle(transfer, Expired(now))
        for group in self.groups:  # also how a dead rank of an idle group is noticed
            for event in self._run(group, group.engine.poll_transfer_events) or []:
                self._on_rank_event(event)

    def _on_rank_event(self, event: TransferEvent) -> None:
        transfer = self.transfers.get(event.transfer_id)
        if transfer is None:
            return  # closed already: a late report
        if event.ok:
            if event.side == Direction.RECV:  # a prefill rank's own report adds nothing: decode's ack counts
                self._handle(transfer, Acked(event.rank, event.num_bytes, event.seconds, time.monotonic()),
                             from_rank=True)
            return
        if self._still_open_after_looking(transfer):
            side = Side.PREFILL if event.side == Direction.SEND else Side.DECODE
            self._handle(transfer, RankFailed(side, event.rank, event.error))

    def _still_open_after_looking(self, transfer: Transfer) -> bool:
        """Before a transfer fails, both its groups are looked at: a rank's error is often its
        peer's group dying (a receive fails when the sender's process is gone, before the
        driver reads that its pipe closed), and a dead group's failure takes the transfer over
        (its request re-sent, not put through the failure policy)."""
        for group in (transfer.prefill, transfer.decode):
            self._look(group)
        return self.transfers.get(transfer.transfer_id) is transfer

    def _handle(self, transfer: Transfer, event: Event, *, from_rank: bool = False) -> None:
        """Move the transfer on and carry out the effects on the groups (transfer_table.py)."""
        try:
            effects = self.transfers.handle(transfer, event)
        except IllegalTransition as err:
            if not from_rank:
                raise
            logger.error("ignored a rank's report: %s", err)  # a rank's bug must not stop the driver
            return
        for effect in effects:
            match effect:
                case CancelReceive(transfer=t):
                    if t.decode.healthy:  # ranks handle the cancel before any later message
                        self._on_decode_ranks(t.decode, lambda: t.decode.engine.cancel_kv_receive(t.transfer_id))
                case FreeBoth(transfer=t):  # a failed group's engine has freed everything already
                    t.prefill.engine.release(t.request_id)
                    t.prefill.engine.abort_request(t.request_id)
                    t.decode.engine.cancel_reservation(t.reservation)
                case Admit(transfer=t):
                    t.prefill.engine.release(t.request_id)
                    t.request.decode = t.decode
                    t.decode.engine.admit_prefilled(t.reservation, t.first_token, t.logprobs,
                                                    stream=t.request.stream, prompt=t.request.prompt)
                case ApplyPolicy(transfer=t, policy=policy, reason=reason):
                    logger.warning("KV transfer %d of request %s failed (%s): %s", t.transfer_id, t.request_id,
                                   policy, reason)
                    self._apply_policy(t.request, policy, reason)

    # ---- a request without a transfer ------------------------------------------------------

    def _no_transfer(self, request: DisaggRequest, reason: str) -> None:
        """No transfer can start: recompute on decode, or fail, by the policy."""
        self.transfers.count_unstarted()
        logger.warning("request %s gets no KV transfer (%s): %s", request.request_id,
                       self.config.failure_policy, reason)
        self._apply_policy(request, self.config.failure_policy, reason)

    def _apply_policy(self, request: DisaggRequest, policy: FailurePolicy, reason: str) -> None:
        """Recompute: decode prefills the prompt itself; fail: the request ends with an error."""
        if policy == FailurePolicy.RECOMPUTE:
            self._run_on_decode(request)
            return
        self.requests.fail(request, reason)


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
