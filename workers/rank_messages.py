"""The messages between a worker group's driver (`WorkerGroupExecutor`) and its ranks
(`worker.worker_main`), one frozen class each, over one connection per rank.

The conversation, in order:
    start    the rank rendezvouses with its peers and builds its runner, then sends `Ready`
             (the driver waits for every rank's, within the startup deadline).
    steps    the driver sends `RunStep` to every rank, up to pp of them ahead; the output
             rank answers each, in order, with `StepResult` (the sampled tokens), or with
             `StepFailed` (``fatal`` None) when the step raised and the rank goes on: only that
             batch is lost. Other ranks answer a step only when it ends them.
    KV       (disaggregated mode) `KVConnect` asks every rank to build its links to the other
             side's groups; each answers `KVConnected` once it has. `KVRecv` (a decode group's
             receives of one prefill step) and `KVCancel` are not answered: they are applied in
             order with the steps. Whenever a transfer ends, the rank's KV agent reports it
             with `TransferReport`, from its own thread, at any time.
    end      `Stop` (or a closed connection) ends the rank's loop. A rank that raises where
             it cannot go on sends `RankError` (its traceback) and ends, a step's exception
             announced first by `StepFailed` with ``fatal`` set (which step, and why): the
             first of the two fails the group.

Each message crosses a pipe (or a socket, for Ray actors) on every step: the classes hold
their payload as given, no copies, and pickle as a class reference and a tuple (``slots``).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.kvtransfer.messages import KVRoute, RankKVScales, RecvCommand, TransferEvent
from splitserve.workers.sampler import SamplerOutput
from splitserve.workers.step_batch import StepBatch

# ---- driver -> rank ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunStep:
    """Compute one micro-batch (every rank; the output rank answers it)."""

    batch: StepBatch


@dataclass(frozen=True, slots=True)
class Stop:
    """End the rank's loop (shutdown)."""


@dataclass(frozen=True, slots=True)
class KVConnect:
    """Build the links to the other side's groups, named by their namespaces; answered by
    `KVConnected` (both ends of a link connect together: the driver sends to every group
    before it waits for any answer)."""

    routes: list[KVRoute]
    namespaces: list[str]


@dataclass(frozen=True, slots=True)
class KVRecv:
    """Post the receives of one prefill step's transfers (decode ranks)."""

    commands: list[RecvCommand]


@dataclass(frozen=True, slots=True)
class KVCancel:
    """No write of this transfer may run after this message (decode ranks)."""

    transfer_id: int


#: What a rank's KV agent applies (`executor.handle_control`), in order with the steps.
ControlMessage = KVConnect | KVRecv | KVCancel
DriverMessage = RunStep | Stop | ControlMessage

# ---- rank -> driver ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The rank's runner is built: it serves steps from now on. ``kv_scales``: its slice of an
    FP8 cache's scales (None: unscaled), for the driver's KV layout check."""

    kv_scales: RankKVScales | None = None

    def __repr__(self) -> str:  # short in errors and logs: the scales are a table of floats
        return "Ready()" if self.kv_scales is None else "Ready(kv_scales=...)"


@dataclass(frozen=True, slots=True)
class StepResult:
    """The output rank's sampled tokens of the oldest step it has not answered."""

    output: SamplerOutput


@dataclass(frozen=True, slots=True)
class StepFailed:
    """Step ``step_id`` raised (``message``: one line). ``fatal`` None: the rank goes on and
    this takes the step's result's place; else why the rank ends."""

    step_id: int
    message: str
    fatal: str | None


@dataclass(frozen=True, slots=True)
class TransferReport:
    """A KV transfer of this rank ended (sent from the agent's thread, at any time)."""

    event: TransferEvent


@dataclass(frozen=True, slots=True)
class KVConnected:
    """The answer to `KVConnect`: this rank's links are built."""


@dataclass(frozen=True, slots=True)
class RankError:
    """The rank raised and ends (at start, in a control message, or after a fatal
    `StepFailed`): its traceback."""

    traceback: str


RankMessage = Ready | StepResult | StepFailed | TransferReport | KVConnected | RankError
