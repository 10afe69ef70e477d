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
is a tagged message on an existing group: no handshake on the hot path.

Every transport returns a `Work` per message. Its ``wait`` is the host's wait, always with a
deadline; ``is_completed`` never blocks and answers True only once the message is known to be
through without error, so a staging buffer handed back with its work is reused no earlier.
NCCL receives (`WatchedCudaWork`) are not waited for with torch's ``Work.wait(timeout)``,
which sleeps 1 ms between polls: the `Watcher` learns from the driver when each has landed
and wakes its waiters, and no shared stream is made to wait on a message still in flight.
Sends (`CudaWork`) keep torch's wait, off the GIL: nothing on the hot path waits for them.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist


class Work(Protocol):
    def wait(self, timeout: timedelta) -> None: ...

    def is_completed(self) -> bool: ...


class Transport(Protocol):
    def connect(self, peers: list[str]) -> None: ...

    def send(self, tensor: torch.Tensor, peer: str, tag: int) -> Work: ...

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> Work: ...


#: Size of the message that sets up a NCCL pair's channels (see `PairwiseTransport._warm_up`).
NCCL_WARMUP_BYTES = 64 * 1024 * 1024


def pair_name(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


#: Host polling (`wait_until`): sleep from `POLL_MIN_S`, doubling up to `POLL_MAX_S`, the
#: most a long wait is late by. No long spin of zero sleeps: a thread that gives the GIL back
#: and at once takes it again keeps the rank's own thread waiting up to the 5 ms switch interval.
POLL_MIN_S = 20e-6
POLL_MAX_S = 200e-6


def side_stream(device: torch.device) -> "torch.cuda.Stream | None":
    """A stream of the caller's own (None on CPU). High priority: the transfer's copies and
    waits are short and latency-bound, and torch lends high-priority streams from a pool of
    their own, apart from the one NCCL's streams come from, so nothing queues behind another
    pair's NCCL kernel on a shared stream."""
    return torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None


class Backoff:
    """The pause between two polls: doubling from the first up to the cap."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._delay = POLL_MIN_S / 2

    def pause(self) -> None:
        self._delay = min(2 * self._delay, POLL_MAX_S)
        time.sleep(self._delay)


def wait_until(done: Callable[[], bool], timeout: timedelta, what: str, spin_s: float = 0.0) -> None:
    """Return once ``done()`` is true; raise TimeoutError past ``timeout``. ``spin_s``: first
    poll that long with zero sleeps, for work due within microseconds (the shortest sleep
    lasts some 70 us); kept short, as it holds the GIL most of the time."""
    start = time.monotonic()
    deadline, backoff = start + timeout.total_seconds(), Backoff()
    while not done():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"{what}: not done within {timeout.total_seconds():.1f} s")
        if now - start < spin_s:
            time.sleep(0)
        else:
            backoff.pause()


class CudaWork:
    """A NCCL send. ``is_completed`` queries its end event without blocking (the staging pool
    asks it); ``wait`` is torch's own, with the deadline: it polls each 1 ms, in C++ without
    the GIL, which suits a send: only the report waits for it. Once it has ended, torch's
    ``wait()`` (no timeout: a stream wait on an event already passed) releases the tensors
    NCCL held and raises the message's error, if any."""

    def __init__(self, work: dist.Work):
        self.work = work
        self._outcome: bool | BaseException | None = None  # True: through; an error: failed
        self._lock = threading.Lock()  # the pool (step thread) and a waiter may both settle it

    def is_completed(self) -> bool:
        return self._settle() is True

    def wait(self, timeout: timedelta) -> None:
        self.work.wait(timeout)
        if self._settle() is not True:
            raise self._outcome

    def _settle(self) -> bool | BaseException | None:
        with self._lock:
            if self._outcome is None and self._ended():
                try:
                    self.work.wait()
                    self._outcome = True
                except Exception as err:  # noqa: BLE001 - kept, raised by `wait`
                    self._outcome = err
            return self._outcome

    def _ended(self) -> bool:
        return self.work.is_completed()


class WatchedCudaWork(CudaWork):
    """A NCCL receive: the decode rank waits for it to write it, so torch's 1 ms polls (each
    transfer came up to a millisecond late per wait) will not do, nor its first making the
    caller's stream wait on the message (a shared stream would then hold every later transfer
    behind one still in flight). ``landed`` is a CUDA event that passes with the message; a
    `Watcher` sets ``ended`` once it has; ``wait`` blocks on that, with the deadline."""

    def __init__(self, work: dist.Work, landed: torch.cuda.Event | None = None):
        super().__init__(work)
        self.landed = landed
        self.ended = threading.Event()

    def wait(self, timeout: timedelta) -> None:
        if not self.ended.wait(timeout.total_seconds()) and self._settle() is None:
            raise TimeoutError(f"NCCL message: not done within {timeout.total_seconds():.1f} s")
        if self._settle() is not True:
            raise self._outcome

    def _ended(self) -> bool:
        return self.ended.is_set() or self.work.is_completed()


class Watcher:
    """Finds out when NCCL receives land and wakes their waiters, without polling.

    Per pair, one stream of its own waits on each receive in the order they were posted (the
    order the pair's one NCCL stream runs them in: nothing waits longer than it would anyway)
    and records a blocking-sync event after each; one thread per pair sleeps in that event's
    ``synchronize`` (in the driver, without the GIL, woken as soon as the GPU passes it) and
    sets the message's ``ended``. Waiters block on ``ended`` with their own deadline; a pair
    whose peer never sends keeps only its own thread waiting.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._pairs: dict[str, tuple[torch.cuda.Stream, deque, threading.Condition]] = {}
        self._lock = threading.Lock()

    def watch(self, pair: str, work: dist.Work) -> WatchedCudaWork:
        stream, open_, cond = self._pair(pair)
        watched = WatchedCudaWork(work, self._landed(stream, work))
        with cond:
            open_.append(watched)
            cond.notify()
        return watched

    def _pair(self, pair: str) -> tuple[torch.cuda.Stream, deque, threading.Condition]:
        with self._lock:
            if pair not in self._pairs:
                self._pairs[pair] = (self._new_stream(), deque(), threading.Condition())
                threading.Thread(target=self._run, args=self._pairs[pair][1:], name=f"kv-watch-{pair}",
                                 daemon=True).start()
            return self._pairs[pair]

    def _new_stream(self) -> torch.cuda.Stream:
        return side_stream(self.device)  # the pair's own: see `side_stream`

    @staticmethod
    def _landed(stream: torch.cuda.Stream, work: dist.Work) -> torch.cuda.Event:
        with torch.cuda.stream(stream):
            work.wait()  # no timeout: only this stream waits for the message
            landed = torch.cuda.Event(blocking=True)
            landed.record(stream)
        return landed

    def _run(self, open_: deque, cond: threading.Condition) -> None:
        if self.device is not None:
            torch.cuda.set_device(self.device)
        while True:
            with cond:
                cond.wait_for(lambda: bool(open_))
                head = open_[0]
            head.landed.synchronize()
            head.ended.set()
            with cond:
                open_.popleft()


class HostWork:
    """A gloo message: its own ``wait`` blocks on a condition variable with the deadline; gloo
    says nothing of a send or receive before that, so it counts as completed once waited for."""

    def __init__(self, work: dist.Work):
        self.work, self._done = work, False

    def is_completed(self) -> bool:
        return self._done

    def wait(self, timeout: timedelta) -> None:
        self.work.wait(timeout)
        self._done = True


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
        self._watcher = Watcher(self.device) if backend == "nccl" else None

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
        work = group.send([tensor], other, tag)
        return CudaWork(work) if self.backend == "nccl" else HostWork(work)

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> Work:
        group, other = self._group(peer)
        work = group.recv([tensor], other, tag)
        if self.backend != "nccl":
            return HostWork(work)
        return self._watcher.watch(pair_name(self.me, peer), work)


class _Done:
    def wait(self, timeout: timedelta) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class _MailboxRecv:
    def __init__(self, mailboxes: "Mailboxes", key: tuple[str, str, int], tensor: torch.Tensor):
        self.mailboxes, self.key, self.tensor = mailboxes, key, tensor
        self._done = False

    def wait(self, timeout: timedelta) -> None:
        self.tensor.copy_(self.mailboxes.take(self.key, timeout.total_seconds()))
        self._done = True

    def is_completed(self) -> bool:
        return self._done


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
        self._done = False

    def is_completed(self) -> bool:
        return self._done  # the key is deleted once read: only the waiter can tell

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
        self._done = True


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
