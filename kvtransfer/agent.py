"""A rank's place in the cache-transmission service: its transport plus its side's part.

One `KVTransferAgent` per rank of a prefill or decode group, beside the rank's KV cache. It
opens the rank's transport, connects the links (`connect`, once, at start-up) and holds the
part of its `Side`: a `KVSender` on a prefill rank (layer-wise sends during the forward,
`kvtransfer.sender`), a `KVReceiver` on a decode rank (receives written into the reserved
blocks, cancellation, `kvtransfer.receiver`). Each module tells its side's lifecycle; test
faults come from `kvtransfer.faults`, only when `KVAgentSpec.faults` asks for one.

Deadlines: the driver owns each transfer's deadline and cancels it. The ranks' own waits use
the long link timeout instead, because gloo closes a pair when a wait times out: a transfer
that is merely late must not break the connection every later transfer uses. A rank whose
peer died gets an error from the transport at once. Every host wait (a message, the writes
of a transfer) has that deadline; the staging pool never waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from splitserve.kvtransfer.faults import make_receiver, make_sender
from splitserve.kvtransfer.messages import (
    FaultConfig, KVRoute, RecvCommand, SendCommand, Side, TransferEvent, TransportKind,
)
from splitserve.kvtransfer.receiver import KVReceiver
from splitserve.kvtransfer.sender import KVSender
from splitserve.kvtransfer.transport import Mailboxes, open_transport, side_stream
from splitserve.kvtransfer.wire import RankKV, link_peers, peer_name

#: The in-process transport's mailboxes, shared by every engine of this process.
MAILBOXES = Mailboxes()


@dataclass(frozen=True)
class KVAgentSpec:
    """What a rank needs to join the service (picklable, travels with the RunnerSpec)."""

    #: Prefill (sends) or decode (receives); the plain strings are taken too.
    role: Side
    transport: TransportKind
    #: Distinguishes the services of several engines in one process (in-process mailboxes).
    namespace: str = ""
    store_host: str = "127.0.0.1"
    store_port: int = 0
    faults: FaultConfig = FaultConfig()
    #: Longest a rank waits on one message: only a stuck but living peer meets this backstop.
    link_timeout_s: float = 300.0

    def __post_init__(self):
        # Configs and CLIs give strings: checked here, once (an unknown name raises ValueError).
        object.__setattr__(self, "role", Side(self.role))
        object.__setattr__(self, "transport", TransportKind(self.transport))


class KVTransferAgent:
    def __init__(self, spec: KVAgentSpec, rank: int, cache_data: torch.Tensor, layer_start: int,
                 head_start: int, report: Callable[[TransferEvent], None], mailboxes: Mailboxes | None = None):
        self.spec, self.rank = spec, rank
        me = peer_name(spec.role, rank, spec.namespace)
        self.transport = open_transport(spec.transport, me, spec.store_host, spec.store_port, spec.link_timeout_s,
                                        cache_data.device, mailboxes or MAILBOXES)
        # The part's threads run on a side stream of their own: receives are posted, and writes
        # queued, there. A thread's current stream is by default the one the model computes on,
        # and a receive posted there would start only after the compute queued before it.
        args = (rank, spec.namespace, RankKV(cache_data, layer_start, head_start), self.transport, report,
                timedelta(seconds=spec.link_timeout_s), side_stream(cache_data.device))
        self.sender: KVSender | None = make_sender(spec.faults, *args) if spec.role == Side.PREFILL else None
        self.receiver: KVReceiver | None = make_receiver(spec.faults, *args) if spec.role == Side.DECODE else None

    def connect(self, routes: list[KVRoute], peer_namespaces: list[str] | None = None) -> None:
        """Build the pairwise links this rank will use with the other side's groups (each
        named by its namespace; None: the one that shares this rank's), once, every rank in
        the same global order."""
        namespaces = peer_namespaces if peer_namespaces is not None else [self.spec.namespace]
        self.transport.connect(link_peers(self.spec.role, self.rank, routes, namespaces))

    def close(self) -> None:
        (self.sender or self.receiver).close()

    def layer_hook(self, sends: list[SendCommand]) -> Callable[[int], None] | None:
        """Prefill: a callback for the forward that sends each layer chunk once computed."""
        return self._sender().layer_hook(sends)

    def post_recv(self, cmds: list[RecvCommand]) -> threading.Event:
        """Decode: post the receives of one prefill step (set: posted)."""
        return self._receiver().post_recv(cmds)

    def cancel(self, transfer_id: int) -> None:
        """Decode: no write of that transfer runs after this returns."""
        self._receiver().cancel(transfer_id)

    def _sender(self) -> KVSender:
        if self.sender is None:
            raise RuntimeError(f"{self.spec.role} rank {self.rank} sends no KV")
        return self.sender

    def _receiver(self) -> KVReceiver:
        if self.receiver is None:
            raise RuntimeError(f"{self.spec.role} rank {self.rank} receives no KV")
        return self.receiver
