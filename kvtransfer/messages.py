"""Typed messages of the cache-transmission service.

A transfer, as the ranks see it: a prefill rank gets a `SendCommand` with the step that
computes the prompt's last chunk and pushes its `KVRoute` slices, layer chunk by layer chunk; a
decode rank gets a `RecvCommand` (posted before that step runs), writes what arrives into the
reserved blocks and reports a `TransferEvent`. The driver's view of a transfer (its phases,
deadlines and effects) is `splitserve.workers.transfer_table`.

Commands go from the driver to ranks (`SendCommand` inside a prefill `StepBatch`,
`RecvCommand` as a control message to decode ranks); events come back from ranks.

The closed sets of names (a rank's `Side`, the `TransportKind`, an event's `Direction`) are
`enum.StrEnum`s: a value equals the string it replaced, so YAML, CLI flags, logs and pickled
messages read the same, while the code names a set the type checker can follow.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class Side(enum.StrEnum):
    """Which end of the service a rank is: its group's role, seen from the KV cache."""

    #: Computes prompts and sends their KV (`kvtransfer.sender`).
    PREFILL = "prefill"
    #: Receives KV into reserved blocks (`kvtransfer.receiver`).
    DECODE = "decode"

    @property
    def other(self) -> "Side":
        return Side.DECODE if self is Side.PREFILL else Side.PREFILL


class TransportKind(enum.StrEnum):
    """How packed KV moves between two ranks (`kvtransfer.transport`)."""

    #: Both groups in one process: a mailbox, one copy.
    INPROCESS = "inprocess"
    #: Pairwise gloo process groups: CPU tensors.
    GLOO = "gloo"
    #: Pairwise NCCL process groups: GPU tensors on different devices.
    NCCL = "nccl"
    #: Two processes on one GPU (NCCL refuses two ranks on one device).
    CUDA_IPC = "cuda_ipc"


class Direction(enum.StrEnum):
    """Which half of a transfer a `TransferEvent` reports."""

    #: A prefill rank: every message of the transfer has gone out.
    SEND = "send"
    #: A decode rank: every message has landed and been written into the blocks.
    RECV = "recv"


@dataclass(frozen=True)
class KVRoute:
    """One slice of the KV cache that one source rank sends to one destination rank."""

    #: Global rank in the prefill group / in the decode group.
    src_rank: int
    dst_rank: int
    #: Model layers (global indices) and KV heads (global indices) in the slice.
    layers: range
    heads: range


@dataclass(frozen=True)
class KVLayout:
    """What a group's KV blocks look like: a prefill group and a decode group must agree on
    all of it before they connect (`plan.check_layouts`), since blocks are copied byte for
    byte and read back with the receiver's own dtype and scales."""

    block_size: int
    #: The model's shape, over the whole model (not a rank's share).
    num_layers: int
    num_kv_heads: int
    head_dim: int
    #: The cache's element type, torch's name: "bfloat16", "float32", "float8_e4m3fn"...
    kv_dtype: str
    #: FP8 caches: a hash of the group's whole [num_layers, 2, num_kv_heads] scales
    #: (`workers.kv_scales.scales_fingerprint`); None for unscaled caches.
    scales_fingerprint: str | None = None


@dataclass(frozen=True)
class RankKVScales:
    """One rank's slice of its group's FP8 scales, reported to the driver when the rank is
    ready: [layers][K, V][heads] floats from global layer ``layer_start``, head ``head_start``."""

    layer_start: int
    head_start: int
    values: tuple[tuple[tuple[float, ...], ...], ...]


@dataclass(frozen=True)
class SendCommand:
    """For prefill ranks: push these blocks of one request once its prompt is computed."""

    transfer_id: int
    #: The prefill group's block ids to send, in order.
    block_ids: list[int]
    #: Every route of the transfer; each rank sends the ones whose src_rank is its own.
    routes: list[KVRoute]
    #: Layers per streamed message: KV goes out after each group of this many layers.
    layers_per_message: int
    #: The decode group's namespace (several decode groups); None: the sender's own.
    peer_namespace: str | None = None


@dataclass(frozen=True)
class RecvCommand:
    """For decode ranks: receive a transfer into these blocks (the driver owns the deadline
    and cancels the transfer when it passes)."""

    transfer_id: int
    #: The decode group's block ids, aligned with the sender's `SendCommand.block_ids`.
    block_ids: list[int]
    routes: list[KVRoute]
    layers_per_message: int
    #: The prefill group's namespace (several prefill groups); None: the receiver's own.
    peer_namespace: str | None = None


@dataclass(frozen=True)
class TransferEvent:
    """A rank's report on one transfer."""

    transfer_id: int
    #: SEND from a prefill rank, RECV from a decode rank.
    side: Direction
    rank: int
    ok: bool
    error: str | None = None
    num_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection, switchable from tests (all off by default). Only a config that asks
    for a fault gets the fault-injecting parts (`kvtransfer.faults`); the normal path checks
    nothing."""

    #: Decode ranks do not report the n-th transfer they complete (0-based); None: off.
    drop_ack_of_transfer: int | None = None
    #: Prefill ranks sleep this long before sending each message of the n-th transfer.
    delay_transfer: int | None = None
    delay_s: float = 0.0
    #: Prefill rank (global) that kills itself after sending its first message of the n-th transfer.
    kill_prefill_rank: int | None = None
    kill_on_transfer: int | None = None

    @property
    def on_send(self) -> bool:
        """Whether a prefill rank injects anything (a delay, or its own death)."""
        return self.delay_transfer is not None or (self.kill_prefill_rank is not None
                                                   and self.kill_on_transfer is not None)

    @property
    def on_recv(self) -> bool:
        """Whether a decode rank injects anything (a lost acknowledgement)."""
        return self.drop_ack_of_transfer is not None


#: Completed transfers whose (bytes, seconds) `TransferMetrics` keeps.
PER_TRANSFER_KEPT = 4096


@dataclass
class TransferMetrics:
    """Counters of the service, for logs and (later) Prometheus."""

    num_transfers: int = 0
    num_failures: int = 0
    num_timeouts: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    #: (bytes, seconds) of the latest completed transfers, as the decode ranks measured them
    #: (bounded: a server runs for months; the totals above count every one).
    per_transfer: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=PER_TRANSFER_KEPT))

    def record(self, num_bytes: int, seconds: float) -> None:
        """One completed transfer."""
        self.num_transfers += 1
        self.num_bytes += num_bytes
        self.seconds += seconds
        self.per_transfer.append((num_bytes, seconds))
