"""The disaggregated engine's table of KV transfers: explicit states, one transition function.

A transfer carries one request's prompt KV from a prefill group to the decode group that
reserved blocks for it. The table is pure Python: it knows neither engines nor ranks. The
driver (`DisaggEngine`) tells it what happened (an `Event`); `TransferTable.handle` moves the
transfer to its next `Phase` and returns the `Effect`s the driver must carry out on the groups,
in order. Nothing else writes a transfer's phase, deadline, acknowledgements or first token.

    RESERVED    decode reserved the blocks (``lease`` deadline); the prompt is queued on prefill.
                A first token may come back here only when the send was skipped (its decode
                group was found lost as the prefill step went out): it is kept, and the
                group's loss closes the transfer
       | Posted: the prefill step that pushes the KV is submitted, decode ranks post receives
    SENDING     acknowledgements and the first token outstanding (``ack`` deadline)
       | FirstToken                     | Acked by every decode rank
    TOKEN_BACK  acks outstanding         ACKED   the first token outstanding (no deadline:
       | (ack deadline)                  |       prefill's step is in flight; a lost prefill
       | Acked by every decode rank      |       group closes it)
       +------------> ADMITTED <---------+ FirstToken
                      effects: prefill releases its blocks (they stay cached), decode admits
                      the request as running with its first token

    from any live phase:
      RankFailed / Expired(past the phase's deadline) -> FAILED, effects: cancel the posted
                  receive (if posted), free both sides, apply the failure policy
      Aborted     -> FAILED with the "fail" policy (the client's choice: not counted as a failure)
      Dropped     -> DROPPED (a group is lost, or prefill's batch raised): cancel + free; the
                  driver re-sends the request itself (no policy)

Events the phase cannot take (a second first token, an ack before the receive was posted,
anything after the end) are refused with `IllegalTransition`; a refused event changes nothing.
The table also owns the service's counters (`TransferMetrics`) and each transfer's stage times.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from splitserve.kvtransfer.messages import Side, TransferMetrics
from splitserve.workers.roles import FailurePolicy

#: A transfer's stages, in order: its request queued, reserved on decode, the prefill step that
#: sends it submitted, the first token back from prefill, every decode rank's ack seen, admitted
#: on decode.
STAGES = ("queued", "reserved", "sending", "first_token", "acked", "admitted")

#: Stage-time records of completed transfers kept for `TransferTable.stage_summary`.
STAGE_LOG_KEPT = 20_000


class Phase(enum.Enum):
    RESERVED = "reserved"
    SENDING = "sending"
    TOKEN_BACK = "token_back"
    ACKED = "acked"
    ADMITTED = "admitted"
    FAILED = "failed"
    DROPPED = "dropped"

    @property
    def live(self) -> bool:
        return self not in (Phase.ADMITTED, Phase.FAILED, Phase.DROPPED)

    @property
    def posted(self) -> bool:
        """Decode ranks have a receive posted into the reserved blocks: it must be cancelled
        before those blocks are freed (nothing may write them afterwards)."""
        return self in (Phase.SENDING, Phase.TOKEN_BACK, Phase.ACKED)


# ---- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Posted:
    """The prefill step that sends the KV is submitted; decode ranks posted the receives."""

    now: float


@dataclass(frozen=True)
class Acked:
    """A decode rank wrote its part of the KV."""

    rank: int
    num_bytes: int
    seconds: float
    now: float


@dataclass(frozen=True)
class FirstToken:
    """Prefill sampled the request's first token (its own params and seed)."""

    token: int
    logprobs: Any
    now: float


@dataclass(frozen=True)
class RankFailed:
    """A rank reported an error on this transfer (``side``: the group it belongs to)."""

    side: Side
    rank: int
    error: str | None


@dataclass(frozen=True)
class Expired:
    """The clock passed ``now``: the phase's deadline, if it has one and it is past, ends it."""

    now: float


@dataclass(frozen=True)
class Aborted:
    """The client aborted the request."""


@dataclass(frozen=True)
class Dropped:
    """A group of the transfer is lost, or prefill's batch raised: the driver re-sends."""


Event = Posted | Acked | FirstToken | RankFailed | Expired | Aborted | Dropped


# ---- effects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CancelReceive:
    """Decode ranks drop the posted receive (before any later message; it waits out a write
    in progress), so nothing writes the blocks once they are free."""

    transfer: Transfer


@dataclass(frozen=True)
class FreeBoth:
    """Prefill frees the prompt's held blocks (and aborts it there); decode cancels the
    reservation."""

    transfer: Transfer


@dataclass(frozen=True)
class Admit:
    """Prefill releases its held blocks (they stay cached); decode runs the request from its
    first token."""

    transfer: Transfer


@dataclass(frozen=True)
class ApplyPolicy:
    """The request follows ``policy``: recompute on decode, or end with ``reason``."""

    transfer: Transfer
    policy: FailurePolicy
    reason: str


Effect = CancelReceive | FreeBoth | Admit | ApplyPolicy


class IllegalTransition(RuntimeError):
    """An event the transfer's phase cannot take (refused; nothing changed)."""


# ---- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferTimeouts:
    #: The reservation's lease: how long decode holds blocks for a prompt prefill has not sent.
    lease_s: float
    #: From the prefill step that sends to the last decode rank's acknowledgement.
    ack_s: float


@dataclass(eq=False)
class Transfer:
    """One transfer's record. ``request``, ``prefill``, ``decode`` and ``reservation`` are the
    driver's objects (the table never looks inside them); the rest is the table's."""

    transfer_id: int
    request_id: str
    request: Any
    prefill: Any
    decode: Any
    #: Decode's reserved sequence (its block ids receive the KV).
    reservation: Any
    #: Leading prompt blocks decode already had (its prefix cache): not sent.
    skip_blocks: int
    #: Decode ranks that must acknowledge.
    num_decode_ranks: int
    phase: Phase = Phase.RESERVED
    #: The reservation's end (RESERVED only).
    lease_deadline: float = float("inf")
    #: The last acknowledgement's deadline (SENDING, TOKEN_BACK).
    ack_deadline: float = float("inf")
    first_token: int | None = None
    logprobs: Any = None
    acks: set[int] = field(default_factory=set)
    #: Bytes received over all decode ranks, and the slowest rank's time.
    num_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    #: When it reached each stage (`STAGES`), on the driver's monotonic clock.
    times: dict[str, float] = field(default_factory=dict)

    def past_deadline(self, now: float) -> bool:
        """`Expired(now)` would end it (the lease while RESERVED, the ack deadline while SENDING
        or TOKEN_BACK; ACKED has none)."""
        if self.phase is Phase.RESERVED:
            return now > self.lease_deadline
        return self.phase in (Phase.SENDING, Phase.TOKEN_BACK) and now > self.ack_deadline


class TransferTable:
    def __init__(self, timeouts: TransferTimeouts, failure_policy: FailurePolicy):
        self.timeouts = timeouts
        self.failure_policy = FailurePolicy(failure_policy)
        self.metrics = TransferMetrics()
        #: Stage times of the latest admitted transfers (`stage_summary`).
        self.stage_log: deque[dict[str, float]] = deque(maxlen=STAGE_LOG_KEPT)
        self._by_id: dict[int, Transfer] = {}
        self._by_request: dict[str, int] = {}
        self._next_id = 0

    # ---- lookups ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Transfer]:
        """The open transfers, oldest first (a snapshot: handling events while iterating is safe)."""
        return iter(list(self._by_id.values()))

    def get(self, transfer_id: int) -> Transfer | None:
        return self._by_id.get(transfer_id)

    def of_request(self, request_id: str) -> Transfer | None:
        transfer_id = self._by_request.get(request_id)
        return None if transfer_id is None else self._by_id[transfer_id]

    def incoming(self) -> Counter:
        """Open transfers per decode group (load it has taken on but not admitted yet)."""
        return Counter(t.decode for t in self._by_id.values())

    def involving(self, group: Any) -> list[Transfer]:
        return [t for t in self._by_id.values() if group is t.prefill or group is t.decode]

    # ---- opening and events ----------------------------------------------------------------

    def new_id(self) -> int:
        """The id of a transfer about to open (prefill's send plan names it before `open`)."""
        transfer_id = self._next_id
        self._next_id += 1
        return transfer_id

    def open(self, transfer_id: int, *, request_id: str, request: Any, prefill: Any, decode: Any, reservation: Any,
             skip_blocks: int, num_decode_ranks: int, queued_at: float, now: float) -> Transfer:
        """The transfer ``transfer_id`` (from `new_id`) opens in RESERVED, its lease starting ``now``."""
        if transfer_id >= self._next_id or transfer_id in self._by_id:
            raise IllegalTransition(f"transfer id {transfer_id} was not issued by new_id, or is open already")
        if request_id in self._by_request:
            raise IllegalTransition(f"request {request_id!r} has an open transfer already")
        transfer = Transfer(transfer_id, request_id, request, prefill, decode, reservation, skip_blocks,
                            num_decode_ranks, lease_deadline=now + self.timeouts.lease_s)
        transfer.times["queued"], transfer.times["reserved"] = queued_at, now
        self._by_id[transfer.transfer_id] = transfer
        self._by_request[request_id] = transfer.transfer_id
        return transfer

    def handle(self, transfer: Transfer, event: Event) -> list[Effect]:
        """Move ``transfer`` on by ``event``; the effects to carry out, in order. Raises
        `IllegalTransition` (changing nothing) for an event its phase cannot take."""
        phase = transfer.phase
        if not phase.live:
            raise IllegalTransition(f"transfer {transfer.transfer_id} is {phase.value}: {event} comes after its end")
        match event:
            case Posted(now=now):
                self._expect(transfer, event, Phase.RESERVED)
                transfer.phase, transfer.ack_deadline = Phase.SENDING, now + self.timeouts.ack_s
                transfer.lease_deadline = float("inf")
                transfer.times["sending"] = now
                return []
            case Acked():
                self._expect(transfer, event, Phase.SENDING, Phase.TOKEN_BACK)
                if event.rank in transfer.acks:
                    raise IllegalTransition(f"transfer {transfer.transfer_id}: rank {event.rank} acknowledged twice")
                transfer.acks.add(event.rank)
                transfer.num_bytes += event.num_bytes
                transfer.seconds = max(transfer.seconds, event.seconds)
                if len(transfer.acks) < transfer.num_decode_ranks:
                    return []
                transfer.times["acked"] = event.now
                self.metrics.record(transfer.num_bytes, transfer.seconds)
                if phase is Phase.SENDING:
                    transfer.phase, transfer.ack_deadline = Phase.ACKED, float("inf")
                    return []
                return self._admit(transfer, event.now)
            case FirstToken():
                self._expect(transfer, event, Phase.RESERVED, Phase.SENDING, Phase.ACKED)
                if transfer.first_token is not None:
                    raise IllegalTransition(f"transfer {transfer.transfer_id}: a second first token")
                transfer.first_token, transfer.logprobs = event.token, event.logprobs
                transfer.times["first_token"] = event.now
                if phase is Phase.SENDING:
                    transfer.phase = Phase.TOKEN_BACK
                elif phase is Phase.ACKED:
                    return self._admit(transfer, event.now)
                return []
            case RankFailed(side=side, rank=rank, error=error):
                reason = (f"prefill rank {rank} could not send: {error}" if side is Side.PREFILL
                          else f"decode rank {rank}: {error}")
                return self._fail(transfer, reason, self.failure_policy)
            case Expired(now=now):
                if phase is Phase.RESERVED and now > transfer.lease_deadline:
                    return self._fail(transfer, f"reservation lease of {self.timeouts.lease_s:.0f} s expired "
                                                "before prefill got to the prompt", self.failure_policy)
                if phase in (Phase.SENDING, Phase.TOKEN_BACK) and now > transfer.ack_deadline:
                    self.metrics.num_timeouts += 1
                    return self._fail(transfer, f"no acknowledgement within {self.timeouts.ack_s:.1f} s",
                                      self.failure_policy)
                return []
            case Aborted():
                return self._fail(transfer, "aborted by the client", FailurePolicy.FAIL, counted=False)
            case Dropped():
                return self._close(transfer, Phase.DROPPED)
        raise IllegalTransition(f"not a transfer event: {event!r}")

    def count_unstarted(self) -> None:
        """A request that got no transfer at all (no prefill group, no blocks, refused by
        prefill) counts as a failure of the service."""
        self.metrics.num_failures += 1

    # ---- reports ---------------------------------------------------------------------------

    def stage_summary(self, clear: bool = False) -> dict[str, dict[str, float]]:
        """Milliseconds each stage took over the logged transfers (n, mean, p50, p90, p99):
        where a request's time to first token goes in disaggregated mode."""
        out: dict[str, dict[str, float]] = {}
        for a, b in [*zip(STAGES, STAGES[1:]), (STAGES[0], STAGES[-1])]:
            xs = sorted(1e3 * (t[b] - t[a]) for t in self.stage_log if a in t and b in t)
            if xs:
                out[f"{a}->{b}"] = {"n": len(xs), "mean": sum(xs) / len(xs),
                                    **{f"p{q}": xs[min(len(xs) - 1, len(xs) * q // 100)] for q in (50, 90, 99)}}
        if clear:
            self.stage_log.clear()
        return out

    # ---- transitions' shared ends ----------------------------------------------------------

    @staticmethod
    def _expect(transfer: Transfer, event: Event, *phases: Phase) -> None:
        if transfer.phase not in phases:
            raise IllegalTransition(f"transfer {transfer.transfer_id} is {transfer.phase.value}: "
                                    f"{type(event).__name__} is not taken there")

    def _admit(self, transfer: Transfer, now: float) -> list[Effect]:
        transfer.times["admitted"] = now
        self.stage_log.append(transfer.times)
        self._forget(transfer, Phase.ADMITTED)
        return [Admit(transfer)]

    def _fail(self, transfer: Transfer, reason: str, policy: FailurePolicy, counted: bool = True) -> list[Effect]:
        if counted:  # an abort is the client's choice, not a failure of the service
            self.metrics.num_failures += 1
        transfer.error = reason
        return [*self._close(transfer, Phase.FAILED), ApplyPolicy(transfer, policy, reason)]

    def _close(self, transfer: Transfer, phase: Phase) -> list[Effect]:
        posted = transfer.phase.posted
        self._forget(transfer, phase)
        return [CancelReceive(transfer), FreeBoth(transfer)] if posted else [FreeBoth(transfer)]

    def _forget(self, transfer: Transfer, phase: Phase) -> None:
        transfer.phase = phase
        del self._by_id[transfer.transfer_id]
        del self._by_request[transfer.request_id]
