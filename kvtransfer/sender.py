"""The prefill rank's half of the cache-transmission service: packs and sends KV, layer by layer.

Lifecycle of a transfer on the sending side:

1. A `StepBatch` carries `SendCommand`s for the requests whose prompt completes in that step;
   before the forward, `KVSender.layer_hook` cuts them into this rank's messages (`wire`) and
   makes everything the hook needs (cache views, block ids on the device).
2. During the forward the hook runs after every layer; each message whose layer chunk is
   complete is packed (one gather, on the step's stream, right behind the layers it reads)
   into a pooled staging buffer and sent at once, while the next layers compute.
3. The buffer goes straight back to the `BufferPool` with the send's work: it is lent again
   only once that work has completed, so the step's thread never waits for a send.
4. A waiter thread waits for each message (up to the link timeout) and reports the transfer
   (`TransferEvent`, `Direction.SEND`) once all its messages are through, or one failed; a
   failed message's buffer is never lent again (the transport may still read it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from splitserve.kernels.dispatch import upload
from splitserve.kvtransfer.buffer_pool import BufferPool, nbytes
from splitserve.kvtransfer.messages import Direction, SendCommand, Side, TransferEvent
from splitserve.kvtransfer.transport import Transport, Work, on_stream
from splitserve.kvtransfer.wire import KVMessage, RankKV, message_order, peer_name


@dataclass(frozen=True, eq=False)
class Outgoing:
    """A message ready to go once the forward has computed its last layer: all the hook needs,
    made before the forward (the hook runs between layers, on the hot path)."""

    message: KVMessage
    #: The cache view it is packed from (every block).
    source: torch.Tensor
    #: The transfer's block ids, on the cache's device.
    blocks: torch.Tensor
    #: How many messages this rank sends for the transfer: it is reported after the last.
    num_messages: int


@dataclass(frozen=True, eq=False)
class _Sent:
    """A message on the wire, for the waiter thread."""

    transfer_id: int
    num_messages: int
    buf: torch.Tensor
    work: Work


@dataclass(eq=False)
class _Progress:
    """The waiter thread's count of one transfer (its own, touched by that thread only)."""

    messages_left: int
    started: float
    num_bytes: int = 0
    error: str | None = None


class KVSender:
    def __init__(self, rank: int, namespace: str, kv: RankKV, transport: Transport,
                 report: Callable[[TransferEvent], None], link_timeout: timedelta, stream):
        self.rank, self.namespace, self.kv = rank, namespace, kv
        self.transport, self.report = transport, report
        self._link_timeout = link_timeout
        self._pool = BufferPool(kv.data.dtype, kv.device)
        self._abandoned: list[torch.Tensor] = []  # buffers of failed messages: the transport may still use them
        self._sent: queue.Queue[_Sent | None] = queue.Queue()
        threading.Thread(target=self._waiter, args=(stream,), name=f"kv-send-{peer_name(Side.PREFILL, rank, namespace)}",
                         daemon=True).start()

    def close(self) -> None:
        self._sent.put(None)

    def layer_hook(self, sends: list[SendCommand]) -> Callable[[int], None] | None:
        """A callback for the forward: after layer ``l`` (global index), send what is complete."""
        messages = message_order(sends, lambda r: r.src_rank == self.rank)
        if not messages:
            return None
        blocks = {cmd.transfer_id: upload(cmd.block_ids, self.kv.device) for cmd in sends}
        counts: dict[int, int] = {}
        for message in messages:
            counts[message.transfer_id] = counts.get(message.transfer_id, 0) + 1
        views: dict[tuple, torch.Tensor] = {}
        due: dict[int, list[Outgoing]] = {}
        for message in messages:
            key = (message.route, message.chunk.start)
            if key not in views:
                views[key] = self.kv.view(message)
            due.setdefault(message.last_layer, []).append(
                Outgoing(message, views[key], blocks[message.transfer_id], counts[message.transfer_id]))

        def hook(layer: int) -> None:
            for outgoing in due.get(layer, ()):
                self._send(outgoing)
        return hook

    def _send(self, out: Outgoing) -> None:
        """Pack on the step's stream (after the layers just computed), send, and hand the buffer
        back at once: the pool lends it again only once the send has completed."""
        message = out.message
        shape = (*out.source.shape[:2], len(out.blocks), *out.source.shape[3:])
        buf = torch.index_select(out.source, 2, out.blocks, out=self._pool.take(shape))  # one copy
        peer = peer_name(Side.DECODE, message.route.dst_rank, self._peer_namespace(message.command))
        work = self.transport.send(buf, peer, message.tag)
        self._pool.give(buf, work)
        self._sent.put(_Sent(message.transfer_id, out.num_messages, buf, work))

    def _peer_namespace(self, cmd: SendCommand) -> str:
        return self.namespace if cmd.peer_namespace is None else cmd.peer_namespace

    def _waiter(self, stream) -> None:
        with on_stream(stream):
            self._wait_sends()

    def _wait_sends(self) -> None:
        """Reports each transfer once all its messages are through (or one failed). Nothing
        waits on this thread: the buffers went back to the pool when the messages were sent."""
        pending: dict[int, _Progress] = {}
        while (sent := self._sent.get()) is not None:
            progress = pending.setdefault(sent.transfer_id, _Progress(sent.num_messages, time.monotonic()))
            try:
                sent.work.wait(self._link_timeout)
                progress.num_bytes += nbytes(sent.buf)
            except Exception as err:  # noqa: BLE001 - reported, the driver decides
                progress.error = str(err)
                self._pool.forget(sent.buf)  # the transport may still read it
                self._abandoned.append(sent.buf)
            progress.messages_left -= 1
            if progress.messages_left == 0:
                del pending[sent.transfer_id]
                self.report(TransferEvent(sent.transfer_id, Direction.SEND, self.rank, progress.error is None,
                                          progress.error, progress.num_bytes, time.monotonic() - progress.started))
