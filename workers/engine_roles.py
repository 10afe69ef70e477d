"""A group engine's part in disaggregated serving: hooks that `LLMEngine` calls at fixed points
of a request's life (in the spirit of vLLM's scheduler-side KV connector), so that the engine
itself is one engine whatever its group does.

Lifecycle: the engine builds its role next to its scheduler (`make_role`: the role of its KV
agent, ``EngineConfig.kv.role``; no KV service: aggregated) and calls it

    on_scheduled(out)          as a step is submitted: the KV sends that go with it
    on_finished(seq, status)   as a sequence finishes (the scheduler's hook): keep its blocks?
    on_dropped(request_id)     as a request fails with an error here: forget what is kept for it
    release_all()              as the group is lost: give back every block kept past a request

and reads ``generates``: whether the requests of this group run to their end here (a batch
that raised is run again, a lost group's outputs continue elsewhere) or are the driver's to
send again from the start (prefill).

- `EngineRole` (aggregated, ``GroupRole.WORKER``): the null role; no hook does anything.
- `PrefillRole`: computes a prompt and its first token for a decode group; the KV goes out with
  the step that computes the last prompt chunk (`SendPlan`, `KVSendHook`); the finished
  sequence's blocks are kept until the driver `release`s them (decode has the KV, or gave up).
- `DecodeRole`: `reserve`s blocks for a prompt's KV before prefill computes it, and `admit`s the
  sequence once the KV is there (or `cancel`s the reservation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from splitserve.kvtransfer.messages import KVRoute, SendCommand
from splitserve.workers.roles import GroupRole
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import Scheduler, SchedulerOutput
from splitserve.workers.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class KVSendHook:
    """Prefill role: where the KV of finished prompts goes, and who to tell."""

    routes: list[KVRoute]
    layers_per_message: int
    #: Called with a step's commands as it is submitted (the decode side then posts the
    #: receives, in this order); returns the commands to send (a closed transfer is dropped).
    on_send: Callable[[list[SendCommand]], list[SendCommand]]


@dataclass(frozen=True)
class SendPlan:
    transfer_id: int
    #: Leading prompt blocks the decode side already has (its prefix cache): not sent.
    skip_blocks: int
    #: The destination decode group's KV namespace (None: the one sharing this group's).
    peer_namespace: str | None = None


def first_token_params(params: SamplingParams) -> SamplingParams:
    """The prefill role's params: the request's own sampling for exactly its first token."""
    return params.with_(max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=(),
                        include_stop_str_in_output=False)


class EngineRole:
    """The null role (aggregated): requests run to their end here, nothing is sent or kept."""

    kind: GroupRole = GroupRole.WORKER
    #: Requests run to their end here (see the module doc).
    generates: bool = True

    def on_scheduled(self, out: SchedulerOutput) -> list[SendCommand]:
        """The KV sends that go with this step, as it is submitted."""
        return []

    def on_finished(self, seq: Sequence, status: SequenceStatus) -> bool:
        """``seq`` just finished: True keeps its blocks (the role gives them back later)."""
        return False

    def on_dropped(self, request_id: str) -> None:
        """The request failed here with an error."""

    def holds(self, request_id: str) -> bool:
        """The request finished and its blocks are kept."""
        return False

    def release_all(self) -> None:
        """The group is gone: every kept block goes back."""


class PrefillRole(EngineRole):
    """Every request of a prefill group is a prompt for a decode group (`add`)."""

    kind = GroupRole.PREFILL
    generates = False  # the driver sends a lost prompt again, to this group or another

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self._hook: KVSendHook | None = None
        #: Queued or running prompts whose KV has not gone out yet.
        self._plans: dict[str, SendPlan] = {}
        #: Finished prompts whose blocks are kept until `release`.
        self._held: dict[str, Sequence] = {}

    def enable_sends(self, hook: KVSendHook) -> None:
        self._hook = hook

    def add(self, request_id: str, plan: SendPlan) -> None:
        self._plans[request_id] = plan

    def on_scheduled(self, out: SchedulerOutput) -> list[SendCommand]:
        """The KV of every prompt whose last chunk this step computes (the step that samples)."""
        if self._hook is None:
            return []
        sends = []
        for item in out.scheduled:
            plan = self._plans.pop(item.seq.request_id, None) if item.samples else None
            if plan is None:
                continue
            last = self._scheduler.block_manager.blocks_needed(item.seq.num_prompt_tokens)
            sends.append(SendCommand(plan.transfer_id, item.seq.block_ids[plan.skip_blocks:last],
                                     self._hook.routes, self._hook.layers_per_message, plan.peer_namespace))
        return self._hook.on_send(sends) if sends else []

    def on_finished(self, seq: Sequence, status: SequenceStatus) -> bool:
        """Kept until decode has the KV; an aborted one has nothing to give."""
        keep = status is not SequenceStatus.FINISHED_ABORTED
        if keep:
            self._held[seq.request_id] = seq
        return keep

    def on_dropped(self, request_id: str) -> None:
        self._plans.pop(request_id, None)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def release(self, request_id: str) -> None:
        """Decode has the KV (or gave up): the blocks go back, still cached."""
        self._plans.pop(request_id, None)
        seq = self._held.pop(request_id, None)
        if seq is not None:
            self._scheduler.free_blocks(seq)

    def release_all(self) -> None:
        for request_id in list(self._held):
            self.release(request_id)


class DecodeRole(EngineRole):
    """A decode group: its requests' prompts arrive as KV from a prefill group (or are computed
    here: plain requests, recomputed ones)."""

    kind = GroupRole.DECODE

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        #: Reservations neither admitted nor cancelled yet.
        self._reserved: set[Sequence] = set()

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def reserve(self, seq: Sequence) -> bool:
        """Blocks for the prompt and its first token (the one prefill samples), minus this
        group's prefix-cache hits; False if they are not free now."""
        if not self._scheduler.reserve(seq, num_extra=1):
            return False
        self._reserved.add(seq)
        return True

    def cancel(self, seq: Sequence) -> None:
        self._reserved.discard(seq)
        self._scheduler.free_blocks(seq)

    def admit(self, seq: Sequence) -> None:
        """The prompt's KV is in the reserved blocks: it runs from here."""
        self._reserved.discard(seq)
        self._scheduler.admit_prefilled(seq)


def make_role(kind: GroupRole, scheduler: Scheduler) -> EngineRole:
    if kind is GroupRole.PREFILL:
        return PrefillRole(scheduler)
    if kind is GroupRole.DECODE:
        return DecodeRole(scheduler)
    return EngineRole()
