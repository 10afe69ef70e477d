"""The rank side of the cache-transmission service: packs, sends, receives and unpacks KV.

One `KVTransferAgent` per rank of a prefill or decode group, beside the rank's KV cache.

Prefill rank (sender): a `StepBatch` carries `SendCommand`s for the requests whose prompt
completes in that step. During the forward, `layer_hook` is called after every layer; when a
route's layer group is complete, its slice (layers x 2 x blocks x block_size x heads x dim)
is packed into one contiguous buffer (on the step's stream, right behind the layers it
reads) and sent at once, while the next layers compute (the layer-wise streaming). The
buffer goes straight back to the `BufferPool` with the send's work: it is lent again only
once that work has completed, so the step's thread never waits for a send. A waiter thread
holds the sends to their deadline and reports.

Decode rank (receiver): `post_recv(commands of one prefill step)` posts every message's
receive into a staging buffer, on the rank's own thread and in the order the senders send
(`message_order`: NCCL matches by order, gloo by tag), then a thread per transfer writes each
message into the cache blocks as it lands and reports when all are written. The agent's
threads use a side stream of their own: a receive posted on the compute stream would wait
for the compute queued before it. A message's write is queued only once the host has seen
it land (NCCL: its end event, seen by the transport's `Watcher`), never a stream wait on
a message still in flight, so a late transfer holds no other transfer's writes. `cancel`
(the driver gave up: deadline passed, a rank failed) takes the same lock as the write, so
once it returns a cancelled transfer queues no write, and on CUDA the caller's stream waits
for any write already queued: nothing touches those blocks after their next owner does.

Deadlines: the driver owns each transfer's deadline and cancels it. The ranks' own waits use
the long link timeout instead, because gloo closes a pair when a wait times out: a transfer
that is merely late must not break the connection every later transfer uses. A rank whose
peer died gets an error from the transport at once. Every host wait (a message, the writes
of a transfer) has that deadline; the pool never waits.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from splitserve.kvtransfer.messages import FaultConfig, KVRoute, RecvCommand, SendCommand, TransferEvent
from splitserve.kernels.dispatch import upload
from splitserve.kvtransfer.transport import (
    CudaIpcTransport, InProcessTransport, Mailboxes, PairwiseTransport, Transport, side_stream, wait_until,
)

#: The in-process transport's mailboxes, shared by every engine of this process.
MAILBOXES = Mailboxes()

#: How long the receive side spins on the writes of a transfer before it sleeps between polls.
WRITTEN_SPIN_S = 1e-3


@dataclass(frozen=True)
class KVAgentSpec:
    """What a rank needs to join the service (picklable, travels with the RunnerSpec)."""

    #: "prefill" or "decode".
    role: str
    #: "gloo", "nccl" or "inprocess".
    transport: str
    #: Distinguishes the services of several engines in one process (in-process mailboxes).
    namespace: str = ""
    store_host: str = "127.0.0.1"
    store_port: int = 0
    faults: FaultConfig = FaultConfig()
    #: Longest a rank waits on one message: only a stuck but living peer meets this backstop.
    link_timeout_s: float = 300.0


def peer_name(role: str, rank: int, namespace: str = "") -> str:
    return f"{namespace}{'P' if role == 'prefill' else 'D'}{rank}"


def layer_groups(layers: range, per_message: int) -> list[range]:
    return [range(s, min(s + per_message, layers.stop)) for s in range(layers.start, layers.stop, per_message)]


def message_tag(transfer_id: int, group: range) -> int:
    # One route per (src, dst) pair, so the transfer and the group's first layer are unique;
    # wrapped to stay a C int (ids 2**19 apart never share a pair's queue at once).
    return (transfer_id % (1 << 19)) * 4096 + group.start


def message_order(cmds: list, keep: Callable[[KVRoute], bool]) -> list[tuple[object, KVRoute, range]]:
    """The order messages go out in (and, per pair, are received in): by the layer after which
    they are sent, then by the command's place in its step. Both sides compute it."""
    items = []
    for index, cmd in enumerate(cmds):
        for route in (r for r in cmd.routes if keep(r)):
            for group in layer_groups(route.layers, cmd.layers_per_message):
                items.append(((group.stop - 1, index), cmd, route, group))
    items.sort(key=lambda item: item[0])
    return [(cmd, route, group) for _, cmd, route, group in items]


class BufferPool:
    """Staging buffers, reused across messages of any shape (thread-safe).

    Lifecycle of a buffer: `take` lends a view of the asked shape on a flat buffer at least
    that large (a fresh one when none is free: a pack never waits); the message is packed or
    received into it; `give` hands it back together with the work that may still read or
    write it. It is lent again only once that work `is_completed` (for NCCL, its end event
    has passed: asked without blocking), so no host thread waits for a send before its buffer
    can return, and no pack overwrites bytes NCCL still reads. Free buffers beyond `keep_bytes`
    (or `max_free` of them) go back to the allocator, oldest first, completed ones only.
    A buffer fits a request of n elements when it holds n to 2n: prompts of nearby lengths
    share buffers, and memory stays bounded however many shapes come by.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, keep_bytes: int = 1 << 30, max_free: int = 64):
        self.dtype, self.device = dtype, device
        self.keep_bytes, self.max_free = keep_bytes, max_free
        self._free: list[list] = []  # [flat buffer, work or None, last view], oldest first
        self._free_bytes = 0
        self._lent: dict[int, list] = {}  # data_ptr of a lent view -> its entry
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        with self._lock:
            entry = self._take_free(max(1, numel))  # never empty: a lent buffer's address is its key
        if entry is None:
            flat = torch.empty(_capacity(max(1, numel)), dtype=self.dtype, device=self.device)
            entry = [flat, None, None]
        if entry[2] is None or entry[2].shape != shape:
            entry[2] = entry[0][:numel].view(shape)  # kept: a buffer mostly serves one shape
        with self._lock:
            self._lent[entry[2].data_ptr()] = entry
        return entry[2]

    def give(self, buf: torch.Tensor, work=None) -> None:
        """Take ``buf`` back; it is reused once ``work`` (None: nothing) has completed."""
        with self._lock:
            entry = self._lent.pop(buf.data_ptr(), None)
            if entry is not None:
                entry[1] = work
                self._free.append(entry)
                self._free_bytes += _nbytes(entry[0])
                self._trim()

    def forget(self, buf: torch.Tensor) -> None:
        """Never lend ``buf`` again (its message failed: the transport may still use it)."""
        with self._lock:
            self._lent.pop(buf.data_ptr(), None)
            gone = [i for i, e in enumerate(self._free) if e[0].data_ptr() == buf.data_ptr()]
            for i in reversed(gone):
                self._drop(i)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _take_free(self, numel: int) -> list | None:
        """The oldest free buffer that fits, if its work has completed. Only that one is asked
        (asking torch costs, and a pair's messages end in order: a newer one is no further);
        one still in flight goes to the back, so a stuck one holds up no other."""
        for i, entry in enumerate(self._free):
            if numel <= entry[0].numel() <= 2 * numel:
                if _ready(entry):
                    return self._drop(i)
                self._free.append(self._free.pop(i))
                return None
        return None

    def _trim(self) -> None:
        while len(self._free) > self.max_free or self._free_bytes > self.keep_bytes:
            done = next((i for i, e in enumerate(self._free) if _ready(e)), None)
            if done is None:
                return  # the rest are still in flight: freed once they have completed
            self._drop(done)

    def _drop(self, index: int) -> list:
        entry = self._free.pop(index)  # by place: entries hold tensors, `==` would compare them
        self._free_bytes -= _nbytes(entry[0])
        return entry


def _ready(entry: list) -> bool:
    """A free buffer's work has completed (remembered, so it is asked at most until then)."""
    if entry[1] is not None and entry[1].is_completed():
        entry[1] = None
    return entry[1] is None


def _capacity(numel: int) -> int:
    """Round up to one of 8 to 16 sizes per power of two: at most 1/8 more than asked."""
    step = 1 << max(0, numel.bit_length() - 4)
    return -(-numel // step) * step


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class KVTransferAgent:
    def __init__(self, spec: KVAgentSpec, rank: int, cache_data: torch.Tensor, layer_start: int,
                 head_start: int, report: Callable[[TransferEvent], None], mailboxes: Mailboxes | None = None):
        self.spec, self.rank, self.report = spec, rank, report
        self.cache = cache_data  # [layers, 2, blocks, block_size, kv_heads, head_dim] of this rank
        self.layer_start, self.head_start = layer_start, head_start
        self.me = peer_name(spec.role, rank, spec.namespace)
        self.transport = self._make_transport(mailboxes)
        self._cancelled: set[int] = set()
        self._abandoned: list = []  # buffers of failed messages: the transport may still use them
        self._write_lock = threading.Lock()
        self._sent: queue.Queue = queue.Queue()
        self._link_timeout = timedelta(seconds=spec.link_timeout_s)
        # Staging buffers are reused: a fresh one per message costs page faults (CPU) or
        # allocator calls on the hot path.
        self._pool = BufferPool(cache_data.dtype, cache_data.device)
        self._to_post: queue.Queue = queue.Queue()
        # The agent's threads run on a side stream: receives are posted, and unpacks queued,
        # there. A thread's current stream is by default the one the model computes on, and a
        # receive posted there would start only after the compute queued before it.
        self._stream = side_stream(cache_data.device)
        if spec.role == "prefill":
            threading.Thread(target=self._send_waiter, name=f"kv-send-{self.me}", daemon=True).start()
        else:
            threading.Thread(target=self._poster, name=f"kv-post-{self.me}", daemon=True).start()

    def _make_transport(self, mailboxes: Mailboxes | None) -> Transport:
        if self.spec.transport == "inprocess":
            return InProcessTransport(self.me, mailboxes or MAILBOXES)
        if self.spec.transport == "cuda_ipc":
            return CudaIpcTransport(self.me, self.spec.store_host, self.spec.store_port, self.spec.link_timeout_s)
        return PairwiseTransport(self.me, self.spec.transport, self.spec.store_host, self.spec.store_port,
                                 self.spec.link_timeout_s, device=self.cache.device)

    def connect(self, routes: list[KVRoute], peer_namespaces: list[str] | None = None) -> None:
        """Build the pairwise groups this rank will use with the other side's groups (each
        named by its namespace; None: the one that shares this rank's), once, every rank in
        the same global order."""
        namespaces = peer_namespaces if peer_namespaces is not None else [self.spec.namespace]
        if self.spec.role == "prefill":
            peers = {peer_name("decode", r.dst_rank, ns) for r in routes if r.src_rank == self.rank for ns in namespaces}
        else:
            peers = {peer_name("prefill", r.src_rank, ns) for r in routes if r.dst_rank == self.rank for ns in namespaces}
        self.transport.connect(sorted(peers))

    def _namespace(self, cmd: SendCommand | RecvCommand) -> str:
        return self.spec.namespace if cmd.peer_namespace is None else cmd.peer_namespace

    def close(self) -> None:
        self._sent.put(None)
        self._to_post.put(None)

    # ---- slices of the cache ---------------------------------------------------------------

    def _slice(self, route: KVRoute, group: range) -> tuple[slice, slice]:
        layers = slice(group.start - self.layer_start, group.stop - self.layer_start)
        heads = slice(route.heads.start - self.head_start, route.heads.stop - self.head_start)
        return layers, heads

    def _view(self, route: KVRoute, group: range) -> torch.Tensor:
        """The (layers, heads) view of the cache that a message of ``route`` carries."""
        layers, heads = self._slice(route, group)
        return self.cache[layers][:, :, :, :, heads]

    def _pack(self, source: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """One copy: the view's blocks gathered straight into a pooled buffer."""
        shape = (*source.shape[:2], len(blocks), *source.shape[3:])
        return torch.index_select(source, 2, blocks, out=self._pool.take(shape))

    def _unpack(self, route: KVRoute, group: range, blocks: torch.Tensor, buf: torch.Tensor) -> None:
        self._view(route, group).index_copy_(2, blocks, buf)

    def _shape(self, route: KVRoute, group: range, num_blocks: int) -> tuple[int, ...]:
        _, two, _, block_size, _, head_dim = self.cache.shape
        return (len(group), two, num_blocks, block_size, len(route.heads), head_dim)

    # ---- sending (prefill ranks, on the step's thread) -----------------------------------

    def layer_hook(self, sends: list[SendCommand]) -> Callable[[int], None] | None:
        """A callback for the forward: after layer ``l`` (global index), send what is complete."""
        due: dict[int, list[tuple[SendCommand, KVRoute, range]]] = {}
        for cmd, route, group in message_order(sends, lambda r: r.src_rank == self.rank):
            due.setdefault(group.stop - 1, []).append((cmd, route, group))
        if not due:
            return None
        blocks = {cmd.transfer_id: upload(cmd.block_ids, self.cache.device) for cmd in sends}
        counts = {cmd.transfer_id: sum(1 for items in due.values() for c, _, _ in items if c is cmd) for cmd in sends}
        # The views, ready before the forward: the hook runs between layers, on the hot path.
        views = {(route, group.start): self._view(route, group) for items in due.values() for _, route, group in items}

        def hook(layer: int) -> None:
            for cmd, route, group in due.get(layer, ()):
                tid = cmd.transfer_id
                self._send(cmd, route, group, views[route, group.start], blocks[tid], counts[tid])
        return hook

    def _send(self, cmd: SendCommand, route: KVRoute, group: range, source: torch.Tensor, blocks: torch.Tensor,
              count: int) -> None:
        """Pack on the step's stream (after the layers just computed), send, and hand the buffer
        back at once: the pool lends it again only once the send has completed."""
        faults = self.spec.faults
        if faults.delay_transfer == cmd.transfer_id:
            time.sleep(faults.delay_s)
        buf = self._pack(source, blocks)
        work = self.transport.send(buf, peer_name("decode", route.dst_rank, self._namespace(cmd)), message_tag(cmd.transfer_id, group))
        self._pool.give(buf, work)
        self._sent.put((cmd.transfer_id, count, buf, work))
        if faults.kill_prefill_rank == self.rank and faults.kill_on_transfer == cmd.transfer_id:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die mid-transfer

    def _send_waiter(self) -> None:
        with _on_stream(self._stream):
            self._wait_sends()

    def _wait_sends(self) -> None:
        """Reports each transfer once all its messages are through (or one failed). Nothing
        waits on this thread: the buffers went back to the pool when the messages were sent."""
        pending: dict[int, list] = {}
        while (item := self._sent.get()) is not None:
            transfer_id, count, buf, work = item
            state = pending.setdefault(transfer_id, [count, 0, time.monotonic(), None])
            try:
                work.wait(self._link_timeout)
                state[1] += _nbytes(buf)
            except Exception as err:  # noqa: BLE001 - reported, the driver decides
                state[3] = str(err)
                self._pool.forget(buf)  # the transport may still read it
                self._abandoned.append(buf)
            state[0] -= 1
            if state[0] == 0:
                del pending[transfer_id]
                self.report(TransferEvent(transfer_id, "send", self.rank, state[3] is None, state[3],
                                          state[1], time.monotonic() - state[2]))

    # ---- receiving (decode ranks, on the receiver thread) --------------------------------

    def post_recv(self, cmds: list[RecvCommand]) -> threading.Event:
        """Queue the receives of one prefill step's transfers for the posting thread, which
        posts them in the senders' order (NCCL matches messages by order, not tag) and then
        waits for and writes each transfer on a thread of its own. Posting is off the caller's
        thread because a NCCL receive can block the thread that posts it until the sender's
        matching send starts: the decode rank's step loop must never wait for prefill.

        The returned event is set once these receives are posted (or failed to be): serving
        ignores it (decode posts when it reserves, long before prefill sends); a benchmark
        waits for it so that it times the transfer, not the posting."""
        posted = threading.Event()
        self._to_post.put((cmds, posted))
        return posted

    def _poster(self) -> None:
        with _on_stream(self._stream):  # also the device: the current one is per thread
            while (item := self._to_post.get()) is not None:
                cmds, posted = item
                try:
                    self._post_and_receive(cmds)
                finally:
                    posted.set()

    def _post_and_receive(self, cmds: list[RecvCommand]) -> None:
        try:
            posted = self._post(cmds)
        except Exception as err:  # noqa: BLE001 - reported, the driver decides
            for cmd in cmds:
                self.report(TransferEvent(cmd.transfer_id, "recv", self.rank, False, f"{type(err).__name__}: {err}"))
            return
        for cmd in cmds:
            messages = [m for c, *m in posted if c is cmd]
            threading.Thread(target=self._receive, args=(cmd, messages), name=f"kv-recv-{cmd.transfer_id}",
                             daemon=True).start()

    def cancel(self, transfer_id: int) -> None:
        """After this, no write of that transfer runs or will run: none is queued once it is
        cancelled (the lock waits out one being queued), and on CUDA the caller's stream (the
        rank's compute stream, which reuses the blocks next) waits for those already queued.
        Writes are queued only for messages that have landed, so that wait is short."""
        with self._write_lock:
            self._cancelled.add(transfer_id)
            _order_after(self._stream, self.cache.device)

    def _receive(self, cmd: RecvCommand, messages: list) -> None:
        with _on_stream(self._stream):
            self._receive_on_stream(cmd, messages)

    def _receive_on_stream(self, cmd: RecvCommand, messages: list) -> None:
        """Write each message into the cache as it lands (under the lock, unless cancelled),
        so the writes overlap the messages still on the wire; report once they are written."""
        start = time.monotonic()
        blocks = upload(cmd.block_ids, self.cache.device)
        size = 0
        try:
            for route, group, buf, work in messages:
                work.wait(self._link_timeout)  # landed: only now is its unpack queued
                if not self._write(cmd.transfer_id, route, group, blocks, buf):
                    self._drain(cmd.transfer_id, messages)
                    return  # cancelled: the driver no longer waits for a report
                size += _nbytes(buf)
            self._wait_written()  # written, not just queued: decode may read them after the report
        except Exception as err:  # noqa: BLE001 - reported, the driver decides
            self._abandoned.append(messages)
            self.report(TransferEvent(cmd.transfer_id, "recv", self.rank, False, f"{type(err).__name__}: {err}"))
            return
        self._give_back(messages)
        if self.spec.faults.drop_ack_of_transfer == cmd.transfer_id:
            return  # fault injection: the acknowledgement is lost
        self.report(TransferEvent(cmd.transfer_id, "recv", self.rank, True, None, size, time.monotonic() - start))

    def _drain(self, transfer_id: int, messages: list) -> None:
        """A cancelled transfer: let its remaining messages land (the sender keeps sending),
        so the buffers can be reused and the pair carries nothing stale."""
        try:
            for _, _, _, work in messages:
                work.wait(self._link_timeout)
            self._wait_written()  # the writes queued before the cancel still read their buffers
            self._give_back(messages)
        except Exception:  # noqa: BLE001 - nothing to report for a cancelled transfer
            self._abandoned.append(messages)
        with self._write_lock:
            self._cancelled.discard(transfer_id)

    def _write(self, transfer_id: int, route: KVRoute, group: range, blocks: torch.Tensor, buf: torch.Tensor) -> bool:
        with self._write_lock:
            if transfer_id in self._cancelled:
                return False  # the blocks may belong to another request by now
            self._unpack(route, group, blocks, buf)
            return True

    def _wait_written(self) -> None:
        """Host-wait, with the deadline, for the writes queued so far (CPU: done already).
        They copy landed messages only, so they end within microseconds: spin first."""
        if self._stream is not None:
            written = torch.cuda.Event()
            written.record(self._stream)
            wait_until(written.query, self._link_timeout, "KV unpack", spin_s=WRITTEN_SPIN_S)

    def _give_back(self, messages: list) -> None:
        for _, _, buf, _ in messages:
            self._pool.give(buf)

    def _post(self, cmds: list[RecvCommand]) -> list:
        posted = []
        for cmd, route, group in message_order(cmds, lambda r: r.dst_rank == self.rank):
            buf = self._pool.take(self._shape(route, group, len(cmd.block_ids)))
            work = self.transport.recv(buf, peer_name("prefill", route.src_rank, self._namespace(cmd)), message_tag(cmd.transfer_id, group))
            posted.append((cmd, route, group, buf, work))
        return posted


def _on_stream(stream):
    """Make ``stream`` (and its device) current on this thread; nothing on CPU."""
    if stream is None:
        return contextlib.nullcontext()
    torch.cuda.set_device(stream.device)
    return torch.cuda.stream(stream)


def _order_after(stream, device: torch.device) -> None:
    """The calling thread's current stream waits (on the device, not the host) for the work
    queued so far on ``stream``; nothing on CPU."""
    if stream is not None:
        queued = torch.cuda.Event()
        queued.record(stream)
        torch.cuda.current_stream(device).wait_event(queued)
