"""The rank side of the cache-transmission service: packs, sends, receives and unpacks KV.

One `KVTransferAgent` per rank of a prefill or decode group, beside the rank's KV cache.

Prefill rank (sender): a `StepBatch` carries `SendCommand`s for the requests whose prompt
completes in that step. During the forward, `layer_hook` is called after every layer; when a
route's layer group is complete, its slice (layers x 2 x blocks x block_size x heads x dim)
is packed into one contiguous buffer and sent at once, while the next layers compute (the
layer-wise streaming). A waiter thread holds the sends to their deadline and reports.

Decode rank (receiver): `post_recv(RecvCommand)` hands the transfer to a receiver thread,
which posts every message's receive into a staging buffer, waits for all of them within the
transfer's deadline, and only then writes them into the cache blocks and reports. A late or
cancelled transfer therefore never touches the cache (the blocks may belong to someone else
by then), and buffers of abandoned receives are kept alive until the process ends.
"""

from __future__ import annotations

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
from splitserve.kvtransfer.transport import InProcessTransport, Mailboxes, PairwiseTransport, Transport

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
    timeout_s: float = 30.0
    faults: FaultConfig = FaultConfig()


def peer_name(role: str, rank: int, namespace: str = "") -> str:
    return f"{namespace}{'P' if role == 'prefill' else 'D'}{rank}"


def layer_groups(layers: range, per_message: int) -> list[range]:
    return [range(s, min(s + per_message, layers.stop)) for s in range(layers.start, layers.stop, per_message)]


def message_tag(transfer_id: int, group: range) -> int:
    # One route per (src, dst) pair, so the transfer and the group's first layer are unique.
    return transfer_id * 4096 + group.start


class KVTransferAgent:
    def __init__(self, spec: KVAgentSpec, rank: int, cache_data: torch.Tensor, layer_start: int,
                 head_start: int, report: Callable[[TransferEvent], None], mailboxes: Mailboxes | None = None):
        self.spec, self.rank, self.report = spec, rank, report
        self.cache = cache_data  # [layers, 2, blocks, block_size, kv_heads, head_dim] of this rank
        self.layer_start, self.head_start = layer_start, head_start
        self.me = self._peer(spec.role, rank)
        self.transport = self._make_transport(mailboxes)
        self._cancelled: set[int] = set()
        self._abandoned: list[object] = []
        self._inbox: queue.Queue = queue.Queue()
        self._sent: queue.Queue = queue.Queue()
        worker = self._recv_loop if spec.role == "decode" else self._send_waiter
        self._thread = threading.Thread(target=worker, name=f"kv-{self.me}", daemon=True)
        self._thread.start()

    def _peer(self, role: str, rank: int) -> str:
        return peer_name(role, rank, self.spec.namespace)

    def _make_transport(self, mailboxes: Mailboxes | None) -> Transport:
        if self.spec.transport == "inprocess":
            return InProcessTransport(self.me, mailboxes or MAILBOXES)
        return PairwiseTransport(self.me, self.spec.transport, self.spec.store_host, self.spec.store_port,
                                 self.spec.timeout_s)

    def connect(self, routes: list[KVRoute]) -> None:
        """Build the pairwise groups this rank will use (once; every rank in the same order)."""
        if self.spec.role == "prefill":
            peers = {self._peer("decode", r.dst_rank) for r in routes if r.src_rank == self.rank}
        else:
            peers = {self._peer("prefill", r.src_rank) for r in routes if r.dst_rank == self.rank}
        self.transport.connect(sorted(peers))

    def close(self) -> None:
        (self._inbox if self.spec.role == "decode" else self._sent).put(None)

    # ---- slices of the cache ---------------------------------------------------------------

    def _slice(self, route: KVRoute, group: range) -> tuple[slice, slice]:
        layers = slice(group.start - self.layer_start, group.stop - self.layer_start)
        heads = slice(route.heads.start - self.head_start, route.heads.stop - self.head_start)
        return layers, heads

    def _pack(self, route: KVRoute, group: range, blocks: torch.Tensor) -> torch.Tensor:
        layers, heads = self._slice(route, group)
        return self.cache[layers].index_select(2, blocks)[:, :, :, :, heads].contiguous()

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
        for cmd in sends:
            for route in (r for r in cmd.routes if r.src_rank == self.rank):
                for group in layer_groups(route.layers, cmd.layers_per_message):
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
        work = self.transport.send(buf, self._peer("decode", route.dst_rank), message_tag(cmd.transfer_id, group))
        self._sent.put((cmd.transfer_id, count, buf, work, time.monotonic() + self.spec.timeout_s))
        if faults.kill_prefill_rank == self.rank and faults.kill_on_transfer == cmd.transfer_id:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die mid-transfer

    def _send_waiter(self) -> None:
        pending: dict[int, list] = {}
        while (item := self._sent.get()) is not None:
            transfer_id, count, buf, work, deadline = item
            state = pending.setdefault(transfer_id, [count, 0, time.monotonic(), None])
            try:
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
                state[1] += buf.numel() * buf.element_size()
            except Exception as err:  # noqa: BLE001 - reported, the driver decides
                state[3] = str(err)
            state[0] -= 1
            if state[0] == 0:
                del pending[transfer_id]
                self.report(TransferEvent(transfer_id, "send", self.rank, state[3] is None, state[3],
                                          state[1], time.monotonic() - state[2]))

    # ---- receiving (decode ranks, on the receiver thread) --------------------------------

    def post_recv(self, cmd: RecvCommand) -> None:
        self._inbox.put(cmd)

    def cancel(self, transfer_id: int) -> None:
        self._cancelled.add(transfer_id)

    def _recv_loop(self) -> None:
        while (cmd := self._inbox.get()) is not None:
            self._receive(cmd)

    def _receive(self, cmd: RecvCommand) -> None:
        start = time.monotonic()
        deadline = start + cmd.timeout_s
        blocks = torch.tensor(cmd.block_ids, device=self.cache.device)
        messages = []
        for route in (r for r in cmd.routes if r.dst_rank == self.rank):
            for group in layer_groups(route.layers, cmd.layers_per_message):
                buf = torch.empty(self._shape(route, group, len(cmd.block_ids)), dtype=self.cache.dtype,
                                  device=self.cache.device)
                peer = self._peer("prefill", route.src_rank)
                messages.append((route, group, buf, self.transport.recv(buf, peer, message_tag(cmd.transfer_id, group))))
        try:
            for _, _, _, work in messages:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"transfer {cmd.transfer_id} missed its {cmd.timeout_s:.1f} s deadline")
                work.wait(timedelta(seconds=remaining))
        except Exception as err:  # noqa: BLE001 - reported, the driver decides
            self._abandoned.append(messages)  # late data may still land in these buffers
            self.report(TransferEvent(cmd.transfer_id, "recv", self.rank, False, f"{type(err).__name__}: {err}"))
            return
        self._finish(cmd, blocks, messages, start)

    def _finish(self, cmd: RecvCommand, blocks: torch.Tensor, messages: list, start: float) -> None:
        if cmd.transfer_id in self._cancelled:
            return  # the driver gave up on it: the blocks are no longer ours to write
        for route, group, buf, _ in messages:
            self._unpack(route, group, blocks, buf)
        if self.spec.faults.drop_ack_of_transfer == cmd.transfer_id:
            return  # fault injection: the acknowledgement is lost
        size = sum(buf.numel() * buf.element_size() for _, _, buf, _ in messages)
        self.report(TransferEvent(cmd.transfer_id, "recv", self.rank, True, None, size, time.monotonic() - start))
