"""Transports: how a packed KV buffer gets from one rank to another; `open_transport` picks one
by its `TransportKind`.

- ``gloo``: a pairwise gloo process group per (prefill rank, decode rank) over a TCPStore
  (CPU tensors; what CI uses).
- ``nccl``: the same with NCCL, for GPU tensors on different devices.
- ``cuda_ipc``: two processes on one GPU (NCCL refuses two ranks on one device): the sender
  publishes a CUDA IPC handle of its packed buffer in the TCPStore, the receiver maps it and
  copies device to device, then acknowledges so the sender may reuse the buffer. The handle
  travels in a fixed binary format (`IpcTensor`), never as a pickle: the store is a network
  service, and unpickling what it holds would run whatever code a writer put there.
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

import contextlib
import os
import queue
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from splitserve.kvtransfer.messages import TransportKind


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


def on_stream(stream: "torch.cuda.Stream | None"):
    """Make ``stream`` (and its device) current on this thread; nothing on CPU."""
    if stream is None:
        return contextlib.nullcontext()
    torch.cuda.set_device(stream.device)
    return torch.cuda.stream(stream)


def order_after(stream: "torch.cuda.Stream | None", device: torch.device) -> None:
    """The calling thread's current stream waits (on the device, not the host) for the work
    queued so far on ``stream``; nothing on CPU."""
    if stream is not None:
        queued = torch.cuda.Event()
        queued.record(stream)
        torch.cuda.current_stream(device).wait_event(queued)


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
        # Idempotent, as torch's Work.wait is: a cancelled transfer's receiver waits out every
        # message again, those it already has included (a second take would block until the
        # link's timeout for a message that never comes again).
        if self._done:
            return
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
        # holds a socket another thread needs. Idempotent, as torch's Work.wait is: the key is
        # gone once read, so a second wait (a cancelled transfer's) would poll until the timeout.
        if self._done:
            return
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


class MalformedIpcMessage(ValueError):
    """A CUDA IPC message read from the store that `IpcTensor.encode` did not write (wrong magic
    or version, lengths that do not add up, values out of range): refused before anything is
    opened or mapped."""


#: The dtypes a message may carry, by their code in it (append only: a code never changes).
IPC_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
              "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16",
              "uint32", "uint64", "complex64", "complex128")
_DTYPE_CODE = {getattr(torch, name): code for code, name in enumerate(IPC_DTYPES, 1) if hasattr(torch, name)}
_CODE_DTYPE = {code: dtype for dtype, code in _DTYPE_CODE.items()}


@dataclass(frozen=True)
class IpcTensor:
    """A CUDA tensor shared with another process, as it travels through the store.

    The fields are exactly the arguments `torch.multiprocessing.reductions.reduce_tensor` gives
    ``rebuild_cuda_tensor`` for a CUDA tensor, less its two classes (here always a plain
    ``torch.Tensor`` on a ``TypedStorage``): `of` takes them from a tensor, `rebuild` maps the
    tensor in the receiving process. ``storage_handle`` (the allocation's IPC handle, as
    ``UntypedStorage._share_cuda_`` gives it), ``ref_counter_handle`` (the name of the shared
    memory file counting the storage's users) and ``event_handle`` are None together, for a
    storage without memory.

    `encode` writes a fixed binary format, all integers little-endian::

        header  magic b"SSKV", version u8, flags u8 (1: storage handles present,
                2: requires_grad, 4: event_sync_required), dtype code u8 (`IPC_DTYPES`),
                ndim u8, device u16, tensor offset i64, storage size i64 (bytes),
                storage offset i64 (bytes), ref counter offset i64,
                then the byte lengths of the three handles, u32 each
        body    ndim sizes (i64), ndim strides (i64), the storage handle, the ref counter's
                name, the event handle

    `decode` accepts exactly that: any other bytes (a pickle included) raise
    `MalformedIpcMessage`, and nothing in a message is ever executed or imported.
    """

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # of the tensor in its storage, in elements
    dtype: torch.dtype
    device: int
    storage_handle: bytes | None
    storage_size_bytes: int
    storage_offset_bytes: int  # of the storage in the CUDA allocation
    requires_grad: bool
    ref_counter_handle: bytes | None
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    MAGIC = b"SSKV"
    VERSION = 1
    HEADER = struct.Struct("<4sBBBBHqqqqIII")
    MAX_NDIM = 16
    MAX_STORAGE_HANDLE = 1 << 20  # bytes: a cudaIpcMemHandle, or an expandable segment's handles
    EVENT_HANDLE = 64  # bytes: cudaIpcEventHandle_t
    #: A shared memory file's name as torch makes them (/torch_<pid>_<random>_<n>): one
    #: component, nothing a path could climb out of.
    REF_COUNTER_NAME = re.compile(rb"/(?!\.\.?\Z)[A-Za-z0-9_.\-]{1,250}")
    _HAS_STORAGE, _REQUIRES_GRAD, _EVENT_SYNC = 1, 2, 4
    _INT64 = 1 << 63

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "IpcTensor":
        """The message for a CUDA tensor of this process (which must keep it alive until the
        receiver has copied it)."""
        from torch.multiprocessing.reductions import reduce_tensor

        return cls.from_reduction(reduce_tensor(tensor))

    @classmethod
    def from_reduction(cls, reduction: tuple) -> "IpcTensor":
        """The message for what ``reduce_tensor`` returned; anything but a plain CUDA tensor's
        reduction raises ValueError."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        rebuild, args = reduction
        if rebuild is not rebuild_cuda_tensor or len(args) != 15:
            raise ValueError(f"not the IPC reduction of a CUDA tensor: {getattr(rebuild, '__name__', rebuild)}")
        (tensor_cls, size, stride, offset, storage_cls, dtype, device, storage_handle, storage_size_bytes,
         storage_offset_bytes, requires_grad, ref_counter_handle, ref_counter_offset, event_handle,
         event_sync_required) = args
        if tensor_cls is not torch.Tensor or storage_cls is not torch.storage.TypedStorage:
            raise ValueError(f"only a plain tensor on a TypedStorage travels, not {tensor_cls} on {storage_cls}")
        message = cls(tuple(size), tuple(stride), offset, dtype, device, storage_handle, storage_size_bytes,
                      storage_offset_bytes, bool(requires_grad), ref_counter_handle, ref_counter_offset or 0,
                      event_handle, bool(event_sync_required))
        try:
            message.check()
        except MalformedIpcMessage as err:
            raise ValueError(f"this tensor's reduction cannot be encoded: {err}") from None
        return message

    def check(self) -> None:
        """Raise `MalformedIpcMessage` unless every field is in range and consistent."""
        def bad(what: str) -> MalformedIpcMessage:
            return MalformedIpcMessage(f"CUDA IPC message refused: {what}")

        def int64(name: str, value: object) -> int:
            if type(value) is not int or not 0 <= value < self._INT64:
                raise bad(f"{name} must be an integer in [0, 2**63)")
            return value

        if not isinstance(self.size, tuple) or not isinstance(self.stride, tuple) \
                or len(self.size) != len(self.stride) or len(self.size) > self.MAX_NDIM:
            raise bad(f"size and stride must be tuples of one length <= {self.MAX_NDIM}")
        for n in self.size + self.stride:
            int64("a size or stride", n)
        int64("the tensor offset", self.offset)
        int64("the storage size", self.storage_size_bytes)
        int64("the storage offset", self.storage_offset_bytes)
        int64("the ref counter offset", self.ref_counter_offset)
        if self.dtype not in _DTYPE_CODE:
            raise bad(f"dtype {self.dtype} is not one of {IPC_DTYPES}")
        if type(self.device) is not int or not 0 <= self.device < 1 << 16:
            raise bad("the device must be an index in [0, 65536)")
        handles = (self.storage_handle, self.ref_counter_handle, self.event_handle)
        if all(h is None for h in handles):
            if self.event_sync_required:
                raise bad("an event to wait for, without its handle")
        elif any(type(h) is not bytes for h in handles):
            raise bad("the storage, ref counter and event handles are bytes, all three or none")
        else:
            if not 0 < len(self.storage_handle) <= self.MAX_STORAGE_HANDLE:
                raise bad(f"a storage handle of {len(self.storage_handle)} bytes")
            if len(self.event_handle) != self.EVENT_HANDLE:
                raise bad(f"an event handle of {len(self.event_handle)} bytes, not {self.EVENT_HANDLE}")
            if not self.REF_COUNTER_NAME.fullmatch(self.ref_counter_handle):
                raise bad(f"ref counter name {self.ref_counter_handle[:64]!r} is not a shared memory file's")
        numel, last = 1, self.offset
        for n, st in zip(self.size, self.stride):
            numel *= n
            last += (n - 1) * st
        if numel:
            needed = (last + 1) * self.dtype.itemsize
            if self.storage_handle is None or needed > self.storage_size_bytes:
                raise bad(f"a view of {needed} bytes into a storage of {self.storage_size_bytes}")

    def encode(self) -> bytes:
        self.check()
        has = self.storage_handle is not None
        flags = (self._HAS_STORAGE * has) | (self._REQUIRES_GRAD * self.requires_grad) \
            | (self._EVENT_SYNC * self.event_sync_required)
        handles = (self.storage_handle, self.ref_counter_handle, self.event_handle) if has else (b"", b"", b"")
        header = self.HEADER.pack(self.MAGIC, self.VERSION, flags, _DTYPE_CODE[self.dtype], len(self.size),
                                  self.device, self.offset, self.storage_size_bytes, self.storage_offset_bytes,
                                  self.ref_counter_offset, *map(len, handles))
        dims = struct.pack(f"<{2 * len(self.size)}q", *self.size, *self.stride)
        return b"".join((header, dims, *handles))

    @classmethod
    def decode(cls, data: bytes) -> "IpcTensor":
        """The message in ``data``, checked; anything else raises `MalformedIpcMessage`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedIpcMessage(f"CUDA IPC message refused: {type(data).__name__}, not bytes")
        data = bytes(data)
        if len(data) < cls.HEADER.size or data[:4] != cls.MAGIC:
            hint = " (a pickle: refused, never unpickled)" if data[:1] == b"\x80" else ""
            raise MalformedIpcMessage(f"CUDA IPC message refused: not a {cls.MAGIC!r} message{hint}, "
                                      f"{len(data)} bytes")
        (_, version, flags, code, ndim, device, offset, storage_size, storage_offset, counter_offset,
         handle_len, counter_len, event_len) = cls.HEADER.unpack_from(data)
        if version != cls.VERSION:
            raise MalformedIpcMessage(f"CUDA IPC message refused: version {version}, this build reads {cls.VERSION}")
        if flags & ~(cls._HAS_STORAGE | cls._REQUIRES_GRAD | cls._EVENT_SYNC):
            raise MalformedIpcMessage(f"CUDA IPC message refused: unknown flags {flags:#x}")
        if code not in _CODE_DTYPE:
            raise MalformedIpcMessage(f"CUDA IPC message refused: unknown dtype code {code}")
        if ndim > cls.MAX_NDIM:
            raise MalformedIpcMessage(f"CUDA IPC message refused: {ndim} dimensions, at most {cls.MAX_NDIM}")
        has = bool(flags & cls._HAS_STORAGE)
        if not has and handle_len + counter_len + event_len:
            raise MalformedIpcMessage("CUDA IPC message refused: handles without the flag that says so")
        expected = cls.HEADER.size + 16 * ndim + handle_len + counter_len + event_len
        if len(data) != expected:
            raise MalformedIpcMessage(f"CUDA IPC message refused: {len(data)} bytes where its lengths say {expected}")
        dims = struct.unpack_from(f"<{2 * ndim}q", data, cls.HEADER.size)
        at = cls.HEADER.size + 16 * ndim
        handle, counter, event = (data[at:at + handle_len], data[at + handle_len:at + handle_len + counter_len],
                                  data[at + handle_len + counter_len:])
        message = cls(dims[:ndim], dims[ndim:], offset, _CODE_DTYPE[code], device,
                      handle if has else None, storage_size, storage_offset, bool(flags & cls._REQUIRES_GRAD),
                      counter if has else None, counter_offset, event if has else None,
                      bool(flags & cls._EVENT_SYNC))
        message.check()
        return message

    def rebuild(self) -> torch.Tensor:
        """The peer's tensor, mapped into this process (needs CUDA)."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        return rebuild_cuda_tensor(torch.Tensor, torch.Size(self.size), self.stride, self.offset,
                                   torch.storage.TypedStorage, self.dtype, self.device, self.storage_handle,
                                   self.storage_size_bytes, self.storage_offset_bytes, self.requires_grad,
                                   self.ref_counter_handle, self.ref_counter_offset, self.event_handle,
                                   self.event_sync_required)


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
        torch.cuda.current_stream(tensor.device).synchronize()  # the bytes are there before the handle
        self.store.set(f"ipc/{self.me}/{peer}/{tag}", IpcTensor.of(tensor).encode())
        # Done when the receiver has copied out of our buffer: then it may be reused.
        return _StoreWork(lambda: self.store, f"ipc-ack/{self.me}/{peer}/{tag}", lambda _: None)

    def recv(self, tensor: torch.Tensor, peer: str, tag: int) -> Work:
        def copy_out(payload: bytes) -> None:
            message = IpcTensor.decode(payload)  # checked bytes, never a pickle
            if message.dtype != tensor.dtype or message.size != tuple(tensor.shape):
                raise MalformedIpcMessage(f"CUDA IPC message refused: {peer} sent {message.dtype} "
                                          f"{list(message.size)} for a {tensor.dtype} {list(tensor.shape)} buffer")
            tensor.copy_(message.rebuild())
            torch.cuda.current_stream(tensor.device).synchronize()
            self.store.set(f"ipc-ack/{peer}/{self.me}/{tag}", b"1")

        return _StoreWork(lambda: self.store, f"ipc/{peer}/{self.me}/{tag}", copy_out)


def open_transport(kind: TransportKind, me: str, store_host: str, store_port: int, timeout_s: float,
                   device: torch.device, mailboxes: Mailboxes) -> Transport:
    """The transport of ``kind`` for the rank named ``me`` (not yet connected); ``mailboxes``
    serve the in-process one only, ``device`` (where the rank's KV lives) the pairwise ones."""
    if kind == TransportKind.INPROCESS:
        return InProcessTransport(me, mailboxes)
    if kind == TransportKind.CUDA_IPC:
        return CudaIpcTransport(me, store_host, store_port, timeout_s)
    return PairwiseTransport(me, kind, store_host, store_port, timeout_s, device=device)
