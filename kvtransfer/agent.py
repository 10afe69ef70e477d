"""The rank side of the cache-transmission service: packs, sends, receives and unpacks KV.

One `KVTransferAgent` per rank of a prefill or decode group, beside the rank's KV cache.

Prefill rank (sender): a `StepBatch` carries `SendCommand`s for the requests whose prompt
completes in that step. During the forward, `layer_hook` is called after every layer; when a
route's layer group is complete, its slice (layers x 2 x blocks x block_size x heads x dim)
is packed into one contiguous buffer and sent at once, while the next layers compute (the
layer-wise streaming). A waiter thread holds the sends to their deadline and reports.

Decode rank (receiver): `post_recv(commands of one prefill step)` posts every message's
receive into a staging buffer, on the rank's own thread and in the order the senders send
(`message_order`: NCCL matches by order, gloo by tag), then a thread per transfer writes each
message into the cache blocks as it lands and reports when all have. `cancel` (the driver gave up: deadline passed,
a rank failed) takes the same lock as the write, so once it returns a cancelled transfer
never touches the cache (the blocks may belong to someone else by then).

Deadlines: the driver owns each transfer's deadline and cancels it. The ranks' own waits use
the long link timeout instead, because gloo closes a pair when a wait times out: a transfer
that is merely late must not break the connection every later transfer uses. A rank whose
peer died gets an error from the transport at once.
"""

from __future__ import annotations

import contextlib
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
from splitserve.kvtransfer.transport import (
    CudaIpcTransport, InProcessTransport, Mailboxes, PairwiseTransport, Transport,
)

#: The in-process transport's mailboxes, shared by every engine of this process.
MAILBOXES = Mailboxes()


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
    """Reusable staging buffers by shape (thread-safe); bounded per shape."""

    def __init__(self, dtype: torch.dtype, device: torch.device, keep: int = 8):
        self.dtype, self.device, self.keep = dtype, device, keep
        self._free: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            free = self._free.get(shape)
            if free:
                return free.pop()
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            free = self._free.setdefault(tuple(buf.shape), [])
            if len(free) < self.keep:
                free.append(buf)


class KVTransferAgent:
    def __init__(self, spec: KVAgentSpec, rank: int, cache_data: torch.Tensor, layer_start: int,
                 head_start: int, report: Callable[[TransferEvent], None], mailboxes: Mailboxes | None = None):
        self.spec, self.rank, self.report = spec, rank, report
        self.cache = cache_data  # [layers, 2, blocks, block_size, kv_heads, head_dim] of this rank
        self.layer_start, self.head_start = layer_start, head_start
        self.me = peer_name(spec.role, rank, spec.namespace)
        self.transport = self._make_transport(mailboxes)
        self._cancelled: set[int] = set()
        self._abandoned: list[list] = []  # failed receives: a late message may still land in them
        self._write_lock = threading.Lock()
        self._sent: queue.Queue = queue.Queue()
        self._link_timeout = timedelta(seconds=spec.link_timeout_s)
        # Staging buffers are reused: a fresh one per message costs page faults on the hot path.
        self._pool = BufferPool(cache_data.dtype, cache_data.device)
        self._to_post: queue.Queue = queue.Queue()
        # Waits on transfers and the unpacks run on side streams: `work.wait()` makes the
        # *current* stream wait for the message, and a thread's current stream is by default
        # the one the model computes on, so a receive posted ahead of its sender would hold
        # every later step of the rank until prefill sends.
        self._recv_stream = _side_stream(cache_data.device)
        self._send_stream = _side_stream(cache_data.device)
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

    def _pack(self, route: KVRoute, group: range, blocks: torch.Tensor) -> torch.Tensor:
        """One copy: the (layers, heads) view's blocks gathered straight into a pooled buffer."""
        layers, heads = self._slice(route, group)
        buf = self._pool.take(self._shape(route, group, len(blocks)))
        return torch.index_select(self.cache[layers][:, :, :, :, heads], 2, blocks, out=buf)

    def _unpack(self, route: KVRoute, group: range, blocks: torch.Tensor, buf: torch.Tensor) -> None:
        layers, heads = self._slice(route, group)
        self.cache[layers][:, :, :, :, heads].index_copy_(2, blocks, buf)

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
        blocks = {cmd.transfer_id: torch.tensor(cmd.block_ids, device=self.cache.device) for cmd in sends}
        counts = {cmd.transfer_id: sum(1 for items in due.values() for c, _, _ in items if c is cmd) for cmd in sends}

        def hook(layer: int) -> None:
            for cmd, route, group in due.get(layer, ()):
                self._send(cmd, route, group, blocks[cmd.transfer_id], counts[cmd.transfer_id])
        return hook

    def _send(self, cmd: SendCommand, route: KVRoute, group: range, blocks: torch.Tensor, count: int) -> None:
        faults = self.spec.faults
        if faults.delay_transfer == cmd.transfer_id:
            time.sleep(faults.delay_s)
        buf = self._pack(route, group, blocks)
        work = self.transport.send(buf, peer_name("decode", route.dst_rank, self._namespace(cmd)), message_tag(cmd.transfer_id, group))
        self._sent.put((cmd.transfer_id, count, buf, work))
        if faults.kill_prefill_rank == self.rank and faults.kill_on_transfer == cmd.transfer_id:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die mid-transfer

    def _send_waiter(self) -> None:
        with _on_stream(self._send_stream):
            self._wait_sends()

    def _wait_sends(self) -> None:
        pending: dict[int, list] = {}
        while (item := self._sent.get()) is not None:
            transfer_id, count, buf, work = item
            state = pending.setdefault(transfer_id, [count, 0, time.monotonic(), None])
            try:
                work.wait(self._link_timeout)
                _sync(self._send_stream)  # sent, not just queued: the buffer may be reused
                state[1] += buf.numel() * buf.element_size()
                self._pool.give(buf)
            except Exception as err:  # noqa: BLE001 - reported, the driver decides
                state[3] = str(err)  # the buffer is not reused: the transport may still read it
            state[0] -= 1
            if state[0] == 0:
                del pending[transfer_id]
                self.report(TransferEvent(transfer_id, "send", self.rank, state[3] is None, state[3],
                                          state[1], time.monotonic() - state[2]))

    # ---- receiving (decode ranks, on the receiver thread) --------------------------------

    def post_recv(self, cmds: list[RecvCommand]) -> None:
        """Queue the receives of one prefill step's transfers for the posting thread, which
        posts them in the senders' order (NCCL matches messages by order, not tag) and then
        waits for and writes each transfer on a thread of its own. Posting is off the caller's
        thread because a NCCL receive can block the thread that posts it until the sender's
        matching send starts: the decode rank's step loop must never wait for prefill."""
        self._to_post.put(cmds)

    def _poster(self) -> None:
        if self.cache.is_cuda:  # the current device is per thread; NCCL and the pool use it
            torch.cuda.set_device(self.cache.device)
        while (cmds := self._to_post.get()) is not None:
            self._post_and_receive(cmds)

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
        with self._write_lock:  # after this, no write of that transfer is running or will run
            self._cancelled.add(transfer_id)

    def _receive(self, cmd: RecvCommand, messages: list) -> None:
        with _on_stream(self._recv_stream):
            self._receive_on_stream(cmd, messages)

    def _receive_on_stream(self, cmd: RecvCommand, messages: list) -> None:
        """Write each message into the cache as it lands (under the lock, unless cancelled),
        so the writes overlap the messages still on the wire."""
        start = time.monotonic()
        blocks = torch.tensor(cmd.block_ids, device=self.cache.device)
        size = 0
        try:
            for route, group, buf, work in messages:
                work.wait(self._link_timeout)
                if not self._write(cmd.transfer_id, route, group, blocks, buf):
                    self._drain(cmd.transfer_id, messages)
                    return  # cancelled: the driver no longer waits for a report
                size += buf.numel() * buf.element_size()
        except Exception as err:  # noqa: BLE001 - reported, the driver decides
            self._abandoned.append(messages)
            self.report(TransferEvent(cmd.transfer_id, "recv", self.rank, False, f"{type(err).__name__}: {err}"))
            return
        _sync(self._recv_stream)  # written, not just queued (and the buffers free to reuse)
        for _, _, buf, _ in messages:
            self._pool.give(buf)
        if self.spec.faults.drop_ack_of_transfer == cmd.transfer_id:
            return  # fault injection: the acknowledgement is lost
        self.report(TransferEvent(cmd.transfer_id, "recv", self.rank, True, None, size, time.monotonic() - start))

    def _drain(self, transfer_id: int, messages: list) -> None:
        """A cancelled transfer: let its remaining messages land (the sender keeps sending),
        so the buffers can be dropped and the pair carries nothing stale."""
        for _, _, _, work in messages:
            try:
                work.wait(self._link_timeout)
            except Exception:  # noqa: BLE001 - nothing to report for a cancelled transfer
                self._abandoned.append(messages)
                break
        with self._write_lock:
            self._cancelled.discard(transfer_id)

    def _write(self, transfer_id: int, route: KVRoute, group: range, blocks: torch.Tensor, buf: torch.Tensor) -> bool:
        with self._write_lock:
            if transfer_id in self._cancelled:
                return False  # the blocks may belong to another request by now
            self._unpack(route, group, blocks, buf)
            return True

    def _post(self, cmds: list[RecvCommand]) -> list:
        posted = []
        for cmd, route, group in message_order(cmds, lambda r: r.dst_rank == self.rank):
            buf = self._pool.take(self._shape(route, group, len(cmd.block_ids)))
            work = self.transport.recv(buf, peer_name("prefill", route.src_rank, self._namespace(cmd)), message_tag(cmd.transfer_id, group))
            posted.append((cmd, route, group, buf, work))
        return posted


def _side_stream(device: torch.device):
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _on_stream(stream):
    """Make ``stream`` (and its device) current on this thread; nothing on CPU."""
    if stream is None:
        return contextlib.nullcontext()
    torch.cuda.set_device(stream.device)
    return torch.cuda.stream(stream)


def _sync(stream) -> None:
    if stream is not None:
        stream.synchronize()
