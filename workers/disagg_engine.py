"""Disaggregated engine: a prefill group and a decode group in one driver, KV moved between.

Lifecycle of a request (driver side; the transfer's `TransferState` in brackets):

    add_request  validated by both engines, queued (first come, first served)
    reserve      decode reserves blocks for prompt + first token, reusing its own prefix cache
                 (those blocks are not sent); without free blocks the request waits for running
                 requests to end, up to ``queue_timeout_s`` (or at once if decode has nothing
                 that could free any), then the failure policy applies
    prefill      [WAITING] the prefill engine computes the prompt; when the last chunk is
                 submitted its ranks get the `SendCommand` and the decode ranks a `RecvCommand`
                 with the transfer deadline  [TRANSFERRING]
    first token  sampled on prefill (the request's own params and seed); blocks held
    ack          [DONE] every decode rank reported the KV written: decode admits the request
                 as running with the first token; prefill frees its blocks (they stay cached)
    failure      [FAILED] a rank reported an error, the deadline or the reservation's lease
                 passed, the prefill group died, or the client aborted: decode ranks are told
                 to drop the transfer (`kv_cancel`: they process it before any later message,
                 and it waits out a write in progress, so nothing writes those blocks after
                 it), both sides free their blocks at once, then ``recompute`` (decode
                 prefills the prompt itself; the default) or ``fail`` (the request ends with
                 finish_reason "abort" and an error; always so for an abort)

`step` runs both engines (their rank processes work concurrently), then settles transfers.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace

from splitserve.kvtransfer.agent import KVAgentSpec
from splitserve.kvtransfer.messages import FaultConfig, RecvCommand, SendCommand, TransferEvent, TransferMetrics, TransferState
from splitserve.kvtransfer.plan import check_compatible, make_routes
from splitserve.workers.engine import (
    EngineConfig, KVSendHook, LLMEngine, SendPlan, first_token_params, resolve_device,
)
from splitserve.workers.executor import WorkerGroupError
from splitserve.workers.outputs import RequestOutput
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.sequence import Sequence

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class DisaggConfig:
    prefill: EngineConfig
    decode: EngineConfig
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

    def __post_init__(self) -> None:
        if self.failure_policy not in ("recompute", "fail"):
            raise ValueError(f"failure_policy must be 'recompute' or 'fail', got {self.failure_policy!r}")
        if self.transfer_timeout_s <= 0 or self.layers_per_message < 1:
            raise ValueError("transfer_timeout_s must be positive and layers_per_message >= 1")


@dataclass(frozen=True)
class _Request:
    """A request as the client gave it: what a transfer, a recompute or a failure needs."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    prompt: str | None
    queued_at: float


@dataclass
class _Transfer:
    transfer_id: int
    request: _Request
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


class DisaggEngine:
    def __init__(self, config: DisaggConfig):
        self.config = config
        self.metrics = TransferMetrics()
        p_par, d_par = config.prefill.parallel, config.decode.parallel
        local = config.in_process if config.in_process is not None else p_par.world_size == d_par.world_size == 1
        if local and p_par.world_size * d_par.world_size > 1:
            raise ValueError("in_process needs 1 x 1 groups on both sides")
        self._store = None if local else _start_store()
        namespace = uuid.uuid4().hex[:8] + "/"
        self.prefill = LLMEngine(self._role(config.prefill, "prefill", local, namespace))
        try:
            self.decode = LLMEngine(self._role(config.decode, "decode", local, namespace))
        except BaseException:
            self.prefill.shutdown()
            raise
        try:
            self._check_compatible()
            self.routes = make_routes(p_par.mapping(), d_par.mapping(), self.prefill.model_cfg.num_layers,
                                      self.prefill.model_cfg.num_kv_heads)
            self._connect()
        except BaseException:  # no rank process outlives a failed start
            self.shutdown()
            raise
        self.prefill.enable_kv_sends(KVSendHook(self.routes, config.layers_per_message, self._on_send))
        self.tokenizer = self.decode.tokenizer
        self._queue: deque[_Request] = deque()
        self._transfers: dict[int, _Transfer] = {}
        self._by_request: dict[str, int] = {}
        self._outputs: list[RequestOutput] = []
        self._decode_error: WorkerGroupError | None = None
        self._transfer_ids = itertools.count()
        self._request_ids = itertools.count()

    def _role(self, cfg: EngineConfig, role: str, local: bool, namespace: str) -> EngineConfig:
        port = self._store.port if self._store is not None else 0
        kv = KVAgentSpec(role, _transport(cfg, self.config, local), namespace, "127.0.0.1", port,
                         faults=self.config.faults)
        # The decode group's GPUs come after the prefill group's (they wrap if there are too few).
        offset = self.config.prefill.parallel.world_size if role == "decode" else 0
        return replace(cfg, kv=kv, rank_processes=not local, device_offset=offset)

    def _check_compatible(self) -> None:
        p, d = self.prefill.model_cfg, self.decode.model_cfg
        check_compatible(self.config.prefill.cache.block_size, self.config.decode.cache.block_size,
                         (p.num_layers, p.num_kv_heads, p.head_dim), (d.num_layers, d.num_kv_heads, d.head_dim))

    def _connect(self) -> None:
        """Pairwise groups between the two groups' ranks, made once (both sides at once)."""
        for engine in (self.prefill, self.decode):
            engine.executor.control("kv_connect", self.routes)
        for engine in (self.prefill, self.decode):
            engine.executor.wait_replies("kv_connect", self.config.transfer_timeout_s)

    # ---- the API LLM uses ------------------------------------------------------------------

    @property
    def model_cfg(self):
        return self.decode.model_cfg

    def tokenize(self, prompt) -> list[int]:
        return self.decode.tokenize(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.decode.validate(prompt_ids, params)
        self.prefill.validate(prompt_ids, first_token_params(params))

    def add_request(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams | None = None,
                    *, stream: bool = False, prompt: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        if (request_id in self._by_request or any(q.request_id == request_id for q in self._queue)
                or self.decode.has_request(request_id) or self.prefill.has_request(request_id)):
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        self._queue.append(_Request(request_id, list(prompt_ids), params, stream, prompt, time.monotonic()))
        return request_id

    def abort_request(self, request_id: str) -> None:
        queued = [q for q in self._queue if q.request_id == request_id]
        if queued:
            self._queue = deque(q for q in self._queue if q.request_id != request_id)
            self._apply_policy(queued[0], "fail", "aborted by the client")
        transfer_id = self._by_request.get(request_id)
        if transfer_id is not None:
            self._fail(self._transfers[transfer_id], "aborted by the client", policy="fail")
        self.decode.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._queue or self._transfers or self._outputs or self.decode.has_unfinished_requests())

    @property
    def num_open_transfers(self) -> int:
        return len(self._transfers)

    def shutdown(self) -> None:
        self.prefill.shutdown()
        self.decode.shutdown()

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self._reserve_queued()
        self._step_prefill()
        self._settle()
        self._check_decode()
        if self.decode.has_unfinished_requests():
            try:
                self._outputs += self.decode.step()
            except WorkerGroupError as err:
                self._decode_error = err
            self._check_decode()
        elif self._transfers:
            time.sleep(0.001)  # only transfers in flight: don't spin the driver
        outputs, self._outputs = self._outputs, []
        return outputs

    def _check_decode(self) -> None:
        """Decode is gone: end every transfer and queued request (blocks freed on both sides),
        then raise, as an aggregated engine does when its group fails."""
        err = self._decode_error
        if err is None:
            return
        self.decode.fail_all(str(err))
        for transfer in list(self._transfers.values()):
            self._drop(transfer)
        self._queue.clear()
        raise WorkerGroupError(f"the decode group failed: {err}")

    def _reserve_queued(self) -> None:
        while self._queue:
            request = self._queue[0]
            if self.prefill.failure is not None:
                self._queue.popleft()
                self._no_transfer(request, "the prefill group failed")
                continue
            seq = self.decode.reserve(request.request_id, request.prompt_ids, request.params)
            if seq is None and not self._give_up_waiting(request.queued_at):
                return  # first come, first served: the rest wait behind it
            self._queue.popleft()
            if seq is None:
                self._no_transfer(request, "decode has no free KV blocks")
                continue
            self._start(request, seq)

    def _give_up_waiting(self, queued_at: float) -> bool:
        """Blocks come back only as decode requests end or transfers close: with none of those
        pending, or past the queue timeout, waiting longer is pointless."""
        idle = not self._transfers and not self.decode.has_unfinished_requests()
        return idle or time.monotonic() - queued_at > self.config.queue_timeout_s

    def _start(self, request: _Request, seq: Sequence) -> None:
        skip = seq.num_computed_tokens // self.decode.block_manager.block_size  # decode's own prefix hits
        transfer = _Transfer(next(self._transfer_ids), request, seq, skip)
        transfer.deadline = time.monotonic() + self.config.reservation_timeout_s  # the lease
        self._transfers[transfer.transfer_id] = transfer
        self._by_request[request.request_id] = transfer.transfer_id
        self.prefill.add_prefill_request(request.request_id, request.prompt_ids, request.params,
                                         SendPlan(transfer.transfer_id, skip))

    def _on_send(self, cmds: list[SendCommand]) -> list[SendCommand]:
        """A prefill step that pushes these transfers is being submitted: decode ranks post the
        receives, in the same order. Closed transfers are dropped."""
        sends, recvs = [], []
        for cmd in cmds:
            transfer = self._transfers.get(cmd.transfer_id)
            if transfer is None or transfer.state is not TransferState.WAITING:
                continue
            skip = transfer.skip_blocks
            recvs.append(RecvCommand(cmd.transfer_id, transfer.reservation.block_ids[skip:skip + len(cmd.block_ids)],
                                     cmd.routes, cmd.layers_per_message))
            sends.append(cmd)
        if not sends or self._decode_error or not self._decode_control("kv_recv", recvs):
            return []
        deadline = time.monotonic() + self.config.transfer_timeout_s
        for cmd in sends:
            transfer = self._transfers[cmd.transfer_id]
            transfer.state, transfer.deadline = TransferState.TRANSFERRING, deadline
        return sends

    def _decode_control(self, kind: str, payload: object) -> bool:
        try:
            self.decode.executor.control(kind, payload)
            return True
        except WorkerGroupError as err:  # handled after the step, in _check_decode
            self._decode_error = err
            return False

    def _step_prefill(self) -> None:
        if self.prefill.failure is not None or not self.prefill.has_unfinished_requests():
            return
        try:
            outputs = self.prefill.step()
        except WorkerGroupError as err:
            self._prefill_failed(err)
            return
        for out in outputs:
            transfer = self._transfers.get(self._by_request.get(out.request_id, -1))
            if transfer is not None and out.token_ids:
                transfer.first_token = out.token_ids[0]
                transfer.logprobs = out.logprobs[0] if out.logprobs else None

    # ---- acknowledgements, deadlines, failures ---------------------------------------------

    def _settle(self) -> None:
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
        try:
            events = self.decode.executor.poll_events()
        except WorkerGroupError as err:
            self._decode_error = err
            return []
        if self.prefill.failure is None:
            try:
                events += self.prefill.executor.poll_events()
            except WorkerGroupError as err:
                self._prefill_failed(err)
        return events

    def _prefill_failed(self, err: WorkerGroupError) -> None:
        """Prefill is gone: its requests end there, every transfer follows the failure policy."""
        if self.prefill.failure is None:
            self.prefill.fail_all(str(err))
        for transfer in list(self._transfers.values()):
            self._fail(transfer, f"the prefill group failed: {err}")

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
        if transfer.state is TransferState.TRANSFERRING and len(transfer.acks) == self.decode.config.parallel.world_size:
            transfer.state = TransferState.DONE
            self.metrics.record(transfer.num_bytes, transfer.seconds)

    def _fail(self, transfer: _Transfer, reason: str, policy: str | None = None) -> None:
        """End the transfer now: cancel it on decode if posted, free both sides, apply the policy."""
        was_posted = transfer.state in (TransferState.TRANSFERRING, TransferState.DONE)
        transfer.state, transfer.error = TransferState.FAILED, reason
        transfer.policy = policy or self.config.failure_policy
        if policy is None:  # an abort is the client's choice, not a failure of the service
            self.metrics.num_failures += 1
        logger.warning("KV transfer %d of request %s failed (%s): %s", transfer.transfer_id,
                       transfer.request.request_id, transfer.policy, reason)
        if was_posted:  # ranks handle the cancel before any later message: no write after it
            self._decode_control("kv_cancel", transfer.transfer_id)
        self._close_failed(transfer)

    def _close_done(self, transfer: _Transfer) -> None:
        request = transfer.request
        self._forget(transfer)
        self.prefill.release(request.request_id)
        self.decode.admit_prefilled(transfer.reservation, transfer.first_token, transfer.logprobs,
                                    stream=request.stream, prompt=request.prompt)

    def _close_failed(self, transfer: _Transfer) -> None:
        self._drop(transfer)
        self._apply_policy(transfer.request, transfer.policy, transfer.error)

    def _drop(self, transfer: _Transfer) -> None:
        """Forget the transfer and free both sides: prefill's held blocks, decode's reservation."""
        self._forget(transfer)
        self.prefill.release(transfer.request.request_id)
        self.prefill.abort_request(transfer.request.request_id)
        self.decode.cancel_reservation(transfer.reservation)

    def _forget(self, transfer: _Transfer) -> None:
        del self._transfers[transfer.transfer_id]
        del self._by_request[transfer.request.request_id]

    def _no_transfer(self, request: _Request, reason: str) -> None:
        """No transfer can start: recompute on decode, or fail, by the policy."""
        self.metrics.num_failures += 1
        logger.warning("request %s gets no KV transfer (%s): %s", request.request_id,
                       self.config.failure_policy, reason)
        self._apply_policy(request, self.config.failure_policy, reason)

    def _apply_policy(self, request: _Request, policy: str, reason: str) -> None:
        """"recompute": decode prefills the prompt itself; "fail": the request ends with an error."""
        if policy == "recompute":
            self.decode.add_request(request.request_id, request.prompt_ids, request.params,
                                    stream=request.stream, prompt=request.prompt)
        else:
            self._outputs.append(RequestOutput(
                request_id=request.request_id, prompt_token_ids=request.prompt_ids, token_ids=[], text="",
                finished=True, finish_reason="abort", error=reason))


def _transport(cfg: EngineConfig, config: DisaggConfig, local: bool) -> str:
    """In-process for two local engines; gloo on CPU; NCCL when every rank of both groups has
    a GPU of its own, else CUDA IPC (NCCL refuses two ranks on one device)."""
    if local:
        return "inprocess"
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        return "gloo"
    import torch

    ranks = config.prefill.parallel.world_size + config.decode.parallel.world_size
    return "nccl" if torch.cuda.device_count() >= ranks else "cuda_ipc"



def _start_store():
    """The TCPStore the pairwise groups rendezvous on; lives as long as the engine."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)
