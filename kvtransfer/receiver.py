"""The decode rank's half of the cache-transmission service: receives KV into reserved blocks.

Lifecycle of a transfer on the receiving side:

1. `KVReceiver.post_recv` (the commands of one prefill step) queues the receives for the
   posting thread, which posts every message's receive into a pooled staging buffer in the
   order the senders send (`wire.message_order`: NCCL matches by order, gloo by tag). Posting
   is off the caller's thread: a NCCL receive can block the thread that posts it until the
   sender's matching send starts, and the decode step loop must never wait for prefill.
2. A thread per transfer waits for each message to land (up to the link timeout) and only then
   queues its write into the cache blocks, so the writes overlap the messages still on the
   wire and a late transfer holds up no other transfer's writes (never a stream wait on a
   message still in flight).
3. Once every write has run (not just been queued: decode may read the blocks after the
   report), the buffers go back to the pool and the transfer is reported (`TransferEvent`,
   `Direction.RECV`). A failure is reported at once; its buffers are abandoned, as a late
   message may still land in them.
4. `cancel` (the driver gave up: deadline passed, a rank failed) takes the lock the writes
   take, so once it returns a cancelled transfer queues no write, and on CUDA the caller's
   stream waits for any write already queued: nothing touches those blocks after their next
   owner does. The cancelled transfer's remaining messages are drained (the sender keeps
   sending) and nothing is reported.

The threads run on the rank's side stream: a receive posted on the compute stream would
start only after the compute queued before it.
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
from splitserve.kvtransfer.messages import Direction, RecvCommand, Side, TransferEvent
from splitserve.kvtransfer.transport import Transport, Work, on_stream, order_after, wait_until
from splitserve.kvtransfer.wire import KVMessage, RankKV, message_order, peer_name

#: How long the receive side spins on the writes of a transfer before it sleeps between polls.
WRITTEN_SPIN_S = 1e-3


@dataclass(frozen=True, eq=False)
class Posted:
    """One message's receive, posted into its staging buffer."""

    message: KVMessage
    buf: torch.Tensor
    work: Work


@dataclass(frozen=True, eq=False)
class _PostRequest:
    """The receives of one prefill step, for the posting thread."""

    commands: list[RecvCommand]
    #: Set once they are posted (or failed to be).
    posted: threading.Event


class KVReceiver:
    def __init__(self, rank: int, namespace: str, kv: RankKV, transport: Transport,
                 report: Callable[[TransferEvent], None], link_timeout: timedelta, stream):
        self.rank, self.namespace, self.kv = rank, namespace, kv
        self.transport, self.report = transport, report
        self._link_timeout = link_timeout
        self._stream = stream
        self._pool = BufferPool(kv.data.dtype, kv.device)
        self._abandoned: list[list[Posted]] = []  # messages of failed transfers: a late one may still land
        self._cancelled: set[int] = set()
        self._write_lock = threading.Lock()  # guards `_cancelled` and queueing a write
        self._to_post: queue.Queue[_PostRequest | None] = queue.Queue()
        threading.Thread(target=self._poster, name=f"kv-post-{peer_name(Side.DECODE, rank, namespace)}",
                         daemon=True).start()

    def close(self) -> None:
        self._to_post.put(None)

    def post_recv(self, cmds: list[RecvCommand]) -> threading.Event:
        """Queue the receives of one prefill step's transfers for the posting thread (see the
        module's lifecycle, step 1).

        The returned event is set once these receives are posted (or failed to be): serving
        ignores it (decode posts when it reserves, long before prefill sends); a benchmark
        waits for it so that it times the transfer, not the posting."""
        posted = threading.Event()
        self._to_post.put(_PostRequest(cmds, posted))
        return posted

    def cancel(self, transfer_id: int) -> None:
        """After this, no write of that transfer runs or will run: none is queued once it is
        cancelled (the lock waits out one being queued), and on CUDA the caller's stream (the
        rank's compute stream, which reuses the blocks next) waits for those already queued.
        Writes are queued only for messages that have landed, so that wait is short."""
        with self._write_lock:
            self._cancelled.add(transfer_id)
            order_after(self._stream, self.kv.device)

    # ---- posting (the posting thread) ------------------------------------------------------

    def _poster(self) -> None:
        with on_stream(self._stream):  # also the device: the current one is per thread
            while (request := self._to_post.get()) is not None:
                try:
                    self._post_and_receive(request.commands)
                finally:
                    request.posted.set()

    def _post_and_receive(self, cmds: list[RecvCommand]) -> None:
        try:
            posted = self._post(cmds)
        except Exception as err:  # noqa: BLE001 - reported, the driver decides
            for cmd in cmds:
                self._report_failure(cmd, err)
            return
        for cmd in cmds:
            messages = [p for p in posted if p.message.command is cmd]
            threading.Thread(target=self._receive, args=(cmd, messages), name=f"kv-recv-{cmd.transfer_id}",
                             daemon=True).start()

    def _post(self, cmds: list[RecvCommand]) -> list[Posted]:
        posted = []
        for message in message_order(cmds, lambda r: r.dst_rank == self.rank):
            cmd = message.command
            buf = self._pool.take(self.kv.message_shape(message, len(cmd.block_ids)))
            peer = peer_name(Side.PREFILL, message.route.src_rank, self._peer_namespace(cmd))
            posted.append(Posted(message, buf, self.transport.recv(buf, peer, message.tag)))
        return posted

    def _peer_namespace(self, cmd: RecvCommand) -> str:
        return self.namespace if cmd.peer_namespace is None else cmd.peer_namespace

    # ---- writing (a thread per transfer) -------------------------------------------------

    def _receive(self, cmd: RecvCommand, messages: list[Posted]) -> None:
        with on_stream(self._stream):
            self._receive_on_stream(cmd, messages)

    def _receive_on_stream(self, cmd: RecvCommand, messages: list[Posted]) -> None:
        """Write each message into the cache as it lands (under the lock, unless cancelled),
        so the writes overlap the messages still on the wire; report once they are written."""
        start = time.monotonic()
        blocks = upload(cmd.block_ids, self.kv.device)
        size = 0
        try:
            for posted in messages:
                posted.work.wait(self._link_timeout)  # landed: only now is its unpack queued
                if not self._write(posted, blocks):
                    self._drain(cmd.transfer_id, messages)
                    return  # cancelled: the driver no longer waits for a report
                size += nbytes(posted.buf)
            self._wait_written()  # written, not just queued: decode may read them after the report
        except Exception as err:  # noqa: BLE001 - reported, the driver decides
            self._abandoned.append(messages)
            self._report_failure(cmd, err)
            return
        self._give_back(messages)
        self._acknowledge(TransferEvent(cmd.transfer_id, Direction.RECV, self.rank, True, None, size,
                                        time.monotonic() - start))

    def _acknowledge(self, event: TransferEvent) -> None:
        """Report a transfer received and written."""
        self.report(event)

    def _report_failure(self, cmd: RecvCommand, err: Exception) -> None:
        self.report(TransferEvent(cmd.transfer_id, Direction.RECV, self.rank, False, f"{type(err).__name__}: {err}"))

    def _write(self, posted: Posted, blocks: torch.Tensor) -> bool:
        with self._write_lock:
            if posted.message.transfer_id in self._cancelled:
                return False  # the blocks may belong to another request by now
            self.kv.view(posted.message).index_copy_(2, blocks, posted.buf)
            return True

    def _drain(self, transfer_id: int, messages: list[Posted]) -> None:
        """A cancelled transfer: let its remaining messages land (the sender keeps sending),
        so the buffers can be reused and the pair carries nothing stale."""
        try:
            for posted in messages:
                posted.work.wait(self._link_timeout)
            self._wait_written()  # the writes queued before the cancel still read their buffers
            self._give_back(messages)
        except Exception:  # noqa: BLE001 - nothing to report for a cancelled transfer
            self._abandoned.append(messages)
        with self._write_lock:
            self._cancelled.discard(transfer_id)

    def _wait_written(self) -> None:
        """Host-wait, with the deadline, for the writes queued so far (CPU: done already).
        They copy landed messages only, so they end within microseconds: spin first."""
        if self._stream is not None:
            written = torch.cuda.Event()
            written.record(self._stream)
            wait_until(written.query, self._link_timeout, "KV unpack", spin_s=WRITTEN_SPIN_S)

    def _give_back(self, messages: list[Posted]) -> None:
        for posted in messages:
            self._pool.give(posted.buf)
