"""Fault injection for tests: a sender and a receiver that misbehave as a `FaultConfig` says.

Each wraps one step of the normal part (`KVSender._send`, `KVReceiver._acknowledge`) and
otherwise is that part; `make_sender` / `make_receiver` build one only when the config asks for
a fault on that side, so a serving rank's send and receive paths carry no fault checks at all.

- `FaultySender`: sleeps ``delay_s`` before packing each message of transfer
  ``delay_transfer``; rank ``kill_prefill_rank`` kills its own process (SIGKILL, as a crash
  would) right after sending its first message of transfer ``kill_on_transfer``.
- `FaultyReceiver`: writes transfer ``drop_ack_of_transfer`` but never acknowledges it (a
  lost report); a failure is still reported.
"""

from __future__ import annotations

import os
import signal
import time

from splitserve.kvtransfer.messages import FaultConfig, TransferEvent
from splitserve.kvtransfer.receiver import KVReceiver
from splitserve.kvtransfer.sender import KVSender, Outgoing


class FaultySender(KVSender):
    def __init__(self, *args, faults: FaultConfig, **kwargs):
        self.faults = faults
        super().__init__(*args, **kwargs)

    def _send(self, out: Outgoing) -> None:
        transfer_id = out.message.transfer_id
        if self.faults.delay_transfer == transfer_id:
            time.sleep(self.faults.delay_s)
        super()._send(out)
        if self.faults.kill_prefill_rank == self.rank and self.faults.kill_on_transfer == transfer_id:
            os.kill(os.getpid(), signal.SIGKILL)  # die mid-transfer


class FaultyReceiver(KVReceiver):
    def __init__(self, *args, faults: FaultConfig, **kwargs):
        self.faults = faults
        super().__init__(*args, **kwargs)

    def _acknowledge(self, event: TransferEvent) -> None:
        if self.faults.drop_ack_of_transfer == event.transfer_id:
            return  # the acknowledgement is lost
        super()._acknowledge(event)


def make_sender(faults: FaultConfig, *args, **kwargs) -> KVSender:
    """A `KVSender`, or a `FaultySender` when ``faults`` asks for a fault on the sending side."""
    return FaultySender(*args, faults=faults, **kwargs) if faults.on_send else KVSender(*args, **kwargs)


def make_receiver(faults: FaultConfig, *args, **kwargs) -> KVReceiver:
    """A `KVReceiver`, or a `FaultyReceiver` when ``faults`` asks for a fault on the receiving side."""
    return FaultyReceiver(*args, faults=faults, **kwargs) if faults.on_recv else KVReceiver(*args, **kwargs)
