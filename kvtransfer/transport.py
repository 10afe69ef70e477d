"""Transports: how a packed KV buffer gets from one rank to another, behind a small registry.

- ``gloo``: a pairwise gloo process group per (prefill rank, decode rank) over a TCPStore
  (CPU tensors; what CI uses).
- ``nccl``: the same with NCCL, for GPU tensors on different devices.
- ``cuda_ipc``: two processes on one GPU (NCCL refuses two ranks on one device): the sender
  publishes a CUDA IPC handle of its packed buffer in the TCPStore, the receiver maps it and
  copies device to device, then acknowledges so the sender may reuse the buffer.
- ``inprocess``: both sides in one process (two local engines): a mailbox, one copy.

Pairs are named by both ends ("P0|D1") and connected once, at start-up, by every rank in
the same global order (sorted pair names), so connecting never deadlocks; afterwards a send
is a tagged message on an existing group: no handshake on the hot path. A work's ``wait``
always takes a deadline.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist


class Work(Protocol):
    def wait(self, timeout: timedelta) -> None: ...


class Transport(Protocol):
    def connect(self, peers: list[str]) -> None: ...

    def send(self, tensor: torch.Tensor, peer: str, tag: int) -> Work: ...

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> Work: ...


#: Size of the message that sets up a NCCL pair's channels (see `PairwiseTransport._warm_up`).
NCCL_WARMUP_BYTES = 64 * 1024 * 1024


def pair_name(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


class PairwiseTransport:
    """gloo or NCCL process groups of two ranks each, built on a shared TCPStore."""

    def __init__(self, me: str, backend: str, store_host: str, store_port: int, timeout_s: float,
                 device: torch.device | None = None):
        self.me = me
        self.backend = backend
        #: The device this rank's KV lives on (NCCL binds a pair's communicator to it).
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(store_host, store_port, None, False, self.timeout)
        self.groups: dict[str, tuple[dist.ProcessGroup, int]] = {}

    def connect(self, peers: list[str]) -> None:
        for pair in sorted(pair_name(self.me, p) for p in peers):
            if pair in self.groups:
                continue
            a, b = pair.split("|")
            rank = 0 if self.me == a else 1
            store = dist.PrefixStore(f"kv/{pair}", self.store)
            if self.backend == "nccl":
                # Channels at communicator set-up, not at a message's first use (NCCL >= 2.22).
                os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
                group = dist.ProcessGroupNCCL(store, rank, 2, dist.ProcessGroupNCCL.Options())
                self._warm_up(group, rank)
            else:
                group = dist.ProcessGroupGloo(store, rank, 2, self.timeout)
            self.groups[pair] = (group, rank)

    def _warm_up(self, group: dist.ProcessGroup, rank: int) -> None:
        """Connect the pair's NCCL channels now, while both ends are connecting. NCCL makes the
        communicator at the first send/recv and, since 2.22, its channels at the first message
        that needs them; either blocks the posting thread until the peer makes the same call,
        so a receive posted ahead of its sender (as decode posts them) would stall the decode
        rank's step loop until prefill sends. One message of `NCCL_WARMUP_BYTES` (as large as
        a KV message, so it takes every channel and protocol a real one takes) settles both.
        Pairs connect in one global order on every rank: these exchanges never wait in a cycle."""
        device = self.device if self.device is not None else torch.device("cuda", torch.cuda.current_device())
        buf = torch.empty(NCCL_WARMUP_BYTES, dtype=torch.uint8, device=device)
        work = group.send([buf], 1, 0) if rank == 0 else group.recv([buf], 0, 0)
        work.wait(self.timeout)
        torch.cuda.synchronize(device)

    def _group(self, peer: str) -> tuple[dist.ProcessGroup, int]:
        group, rank = self.groups[pair_name(self.me, peer)]
        return group, 1 - rank

    def send(self, tensor: torch.Tensor, peer: str, tag: int) -> Work:
        group, other = self._group(peer)
        return group.send([tensor], other, tag)

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> Work:
        group, other = self._group(peer)
        return group.recv([tensor], other, tag)


class _Done:
    def wait(self, timeout: timedelta) -> None:
        return None


class _MailboxRecv:
    def __init__(self, mailboxes: "Mailboxes", key: tuple[str, str, int], tensor: torch.Tensor):
        self.mailboxes, self.key, self.tensor = mailboxes, key, tensor

    def wait(self, timeout: timedelta) -> None:
        self.tensor.copy_(self.mailboxes.take(self.key, timeout.total_seconds()))


class Mailboxes:
    """Shared by the in-process transports of one process: (src, dst, tag) -> queue."""

    def __init__(self):
        self._boxes: dict[tuple[str, str, int], queue.Queue] = {}
        self._lock = threading.Lock()

    def box(self, key: tuple[str, str, int]) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault(key, queue.Queue())

    def take(self, key: tuple[str, str, int], timeout_s: float) -> torch.Tensor:
        """The message under ``key``; its box goes once empty (one box per message otherwise)."""
        try:
            message = self.box(key).get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout_s:.1f} s") from None
        with self._lock:
            if self._boxes.get(key) is not None and self._boxes[key].empty():
                del self._boxes[key]
        return message


class InProcessTransport:
    def __init__(self, me: str, mailboxes: Mailboxes):
        self.me, self.mailboxes = me, mailboxes

    def connect(self, peers: list[str]) -> None:
        pass

    def send(self, tensor: torch.Tensor, peer: str, tag: int) -> Work:
        self.mailboxes.box((self.me, peer, tag)).put(tensor.clone())
        return _Done()

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> Work:
        return _MailboxRecv(self.mailboxes, (peer, self.me, tag), tensor)


class _StoreWork:
    """Completes when ``key`` appears in the store, then runs ``then`` (on the waiting thread,
    with that thread's store client)."""

    def __init__(self, store, key: str, then):
        self.store, self.key, self.then = store, key, then

    def wait(self, timeout: timedelta) -> None:
        # Polls instead of store.wait, and on the waiting thread's own client: blocking waits
        # of several threads hung transfers on the H100 machine (torch 2.11); a poll never
        # holds a socket another thread needs.
        store, deadline = self.store(), time.monotonic() + timeout.total_seconds()
        delay = 0.0002
        while not store.check([self.key]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {self.key!r} within {timeout.total_seconds():.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
        self.then(store.get(self.key))
        store.delete_key(self.key)


class CudaIpcTransport:
    """Two processes on one GPU: buffers shared by CUDA IPC handles passed through the store."""

    def __init__(self, me: str, store_host: str, store_port: int, timeout_s: float):
        self.me = me
        self._address = (store_host, store_port, timedelta(seconds=timeout_s))
        self._local = threading.local()

    @property
    def store(self) -> dist.Store:
        # One client per thread: a blocking wait holds its client's socket, and the step's
        # thread, the send waiter and each receive thread wait on each other's keys.
        if not hasattr(self._local, "store"):
            host, port, timeout = self._address
            self._local.store = dist.TCPStore(host, port, None, False, timeout)
        return self._local.store

    def connect(self, peers: list[str]) -> None:
        pass  # nothing to set up: every message carries its own handle

    def send(self, tensor: torch.Tensor, peer: str, tag: int) -> Work:
        import pickle

        from torch.multiprocessing.reductions import reduce_tensor

        torch.cuda.current_stream(tensor.device).synchronize()  # the bytes are there before the handle
        self.store.set(f"ipc/{self.me}/{peer}/{tag}", pickle.dumps(reduce_tensor(tensor)))
        # Done when the receiver has copied out of our buffer: then it may be reused.
        return _StoreWork(lambda: self.store, f"ipc-ack/{self.me}/{peer}/{tag}", lambda _: None)

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> Work:
        import pickle

        def copy_out(payload: bytes) -> None:
            rebuild, args = pickle.loads(payload)
            tensor.copy_(rebuild(*args))
            torch.cuda.current_stream(tensor.device).synchronize()
            self.store.set(f"ipc-ack/{peer}/{self.me}/{tag}", b"1")

        return _StoreWork(lambda: self.store, f"ipc/{peer}/{self.me}/{tag}", copy_out)


TRANSPORTS = ("gloo", "nccl", "cuda_ipc", "inprocess")
