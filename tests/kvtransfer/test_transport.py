"""The transports' waiting: `wait_until`'s deadline and promptness, NCCL sends (`CudaWork`) and
receives (`WatchedCudaWork`) on a fake torch work (the logic of the NCCL path, run on CPU), and
the `Watcher` that ends receives for their waiters, each pair's in issue order.

Then the CUDA IPC path's messages (`IpcTensor`): the round trip of every field torch's
reduction of a CUDA tensor has, malformed and hostile bytes refused (a pickle planted in the
store is never unpickled), the rendezvous store bound to its host only; on a GPU, the real
reduction and two processes moving tensors through `CudaIpcTransport`."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import random
import struct
import threading
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from kv_fakes import FakeTorchWork

from splitserve.kvtransfer.transport import (IPC_DTYPES, POLL_MAX_S, CudaIpcTransport, CudaWork, IpcTensor,
                                             MalformedIpcMessage, Watcher, wait_until)

SHORT = timedelta(seconds=0.2)


def _later(seconds: float, fn) -> threading.Thread:
    def run():
        time.sleep(seconds)
        fn()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_wait_until_sees_done_within_the_polling_cap():
    flag = threading.Event()
    _later(0.05, flag.set)
    start = time.monotonic()
    wait_until(flag.is_set, timedelta(seconds=5), "flag")
    late = time.monotonic() - start - 0.05
    assert late < POLL_MAX_S + 0.01  # a loaded CI machine may add scheduling delay


def test_wait_until_spins_first_when_asked():
    flag = threading.Event()
    _later(0.002, flag.set)
    start = time.monotonic()
    wait_until(flag.is_set, timedelta(seconds=5), "flag", spin_s=1.0)
    assert time.monotonic() - start < 0.002 + 0.005


def test_wait_until_raises_at_its_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="flag"):
        wait_until(lambda: False, SHORT, "flag")
    assert SHORT.total_seconds() <= time.monotonic() - start < SHORT.total_seconds() + 0.1


def test_a_send_completes_only_once_its_torch_work_has():
    torch_work = FakeTorchWork()
    work = CudaWork(torch_work)
    assert not work.is_completed() and torch_work.num_waits == 0  # asking never waits
    with pytest.raises(RuntimeError, match="timed out"):
        work.wait(SHORT)  # torch's own wait, with the deadline
    torch_work.finish()
    assert work.is_completed()
    work.wait(SHORT)


class _Landed:
    """Stands for the blocking-sync CUDA event recorded after a receive."""

    def __init__(self, torch_work: FakeTorchWork):
        self.torch_work = torch_work

    def synchronize(self) -> None:
        self.torch_work.done.wait()


class FakeWatcher(Watcher):
    """The watcher's threads and order, with the CUDA stream and event faked."""

    def __init__(self):
        super().__init__(device=None)

    def _new_stream(self):
        return None

    @staticmethod
    def _landed(stream, work):
        return _Landed(work)


@pytest.mark.parametrize("watched", [False, True])
def test_a_failed_nccl_message_raises_and_never_counts_as_completed(watched):
    torch_work = FakeTorchWork()
    work = FakeWatcher().watch("P0|D0", torch_work) if watched else CudaWork(torch_work)
    torch_work.finish(RuntimeError("NCCL error"))
    with pytest.raises(RuntimeError, match="NCCL error"):
        work.wait(SHORT)
    assert not work.is_completed()  # its buffer must not be lent again


def test_a_watched_receive_times_out_at_its_deadline():
    work = FakeWatcher().watch("P0|D0", FakeTorchWork())
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        work.wait(SHORT)
    assert time.monotonic() - start < SHORT.total_seconds() + 0.1


def test_watcher_wakes_a_waiter_as_soon_as_its_message_lands():
    torch_work = FakeTorchWork()
    work = FakeWatcher().watch("P0|D0", torch_work)
    _later(0.05, torch_work.finish)
    start = time.monotonic()
    work.wait(timedelta(seconds=5))
    assert time.monotonic() - start < 0.05 + 0.02
    assert torch_work.num_waits == 1  # torch's wait (stream order, error check) once, after the end


def test_watcher_ends_a_pair_in_issue_order_and_pairs_independently():
    watcher = FakeWatcher()
    first, second, other = FakeTorchWork(), FakeTorchWork(), FakeTorchWork()
    works = [watcher.watch("P0|D0", w) for w in (first, second)]
    on_other_pair = watcher.watch("P1|D0", other)
    second.finish()  # out of order: seen once the first has ended too, never before
    other.finish()  # another pair is not held by this one's open message
    on_other_pair.wait(timedelta(seconds=5))
    time.sleep(0.01)
    assert not works[1].ended.is_set()
    first.finish()
    for work in works:
        work.wait(timedelta(seconds=5))
    assert all(w.ended.is_set() for w in works)


# --- CUDA IPC messages: a fixed binary format, never a pickle --------------------------------------
# The store is a network service: whatever reads a message from it must not run what is in it.
# `IpcTensor` carries exactly what torch's `reduce_tensor` gives `rebuild_cuda_tensor` for a CUDA
# tensor; here it is built from such a reduction with made-up handles (no GPU on CI).

def _reduction(size=(4, 8), stride=(8, 1), offset=16, dtype=torch.bfloat16, storage_bytes=4096,
               handle=b"\x00" + bytes(range(64)), counter=b"/torch_4242_1234567_3", event=bytes(range(64)),
               requires_grad=False, event_sync=True):
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor, (torch.Tensor, torch.Size(size), stride, offset, torch.storage.TypedStorage, dtype, 0,
                                 handle, storage_bytes, 512, requires_grad, counter, 96, event, event_sync)


def _message(**changes) -> IpcTensor:
    return IpcTensor.from_reduction(_reduction(**changes))


@pytest.mark.parametrize("changes", [
    {},
    {"size": (), "stride": (), "offset": 7, "dtype": torch.float32, "requires_grad": True, "event_sync": False},
    {"size": (2, 0, 3), "stride": (0, 3, 1), "dtype": torch.uint8},
    {"size": (1 << 20,), "stride": (1,), "offset": 0, "storage_bytes": 1 << 21, "handle": b"\x01" + bytes(5000)},
    {"size": (0,), "stride": (1,), "offset": 0, "storage_bytes": 0, "handle": None, "counter": None,
     "event": None, "event_sync": None},  # a storage without memory: torch sends no handles
], ids=["bf16-2d", "scalar", "empty-view", "big-handle", "no-storage"])
def test_an_ipc_message_round_trips_field_for_field(changes):
    message = _message(**changes)
    data = message.encode()
    assert isinstance(data, bytes) and data[:4] == IpcTensor.MAGIC
    assert IpcTensor.decode(data) == message
    assert IpcTensor.decode(bytearray(data)) == message
    _, args = _reduction(**changes)
    rebuilt = (torch.Tensor, torch.Size(message.size), message.stride, message.offset, torch.storage.TypedStorage,
               message.dtype, message.device, message.storage_handle, message.storage_size_bytes,
               message.storage_offset_bytes, message.requires_grad, message.ref_counter_handle,
               message.ref_counter_offset, message.event_handle, message.event_sync_required)
    expected = list(args)
    expected[2], expected[14] = tuple(expected[2]), bool(expected[14])  # None: no event (no storage)
    assert list(rebuilt) == expected


def test_every_dtype_of_the_table_travels():
    for name in IPC_DTYPES:
        dtype = getattr(torch, name, None)
        if dtype is not None:
            assert IpcTensor.decode(_message(dtype=dtype, storage_bytes=4096).encode()).dtype == dtype


def test_only_a_plain_cuda_tensor_reduction_is_encoded():
    from torch.multiprocessing.reductions import reduce_tensor

    with pytest.raises(ValueError, match="not the IPC reduction of a CUDA tensor"):
        IpcTensor.from_reduction(reduce_tensor(torch.zeros(4)))  # a CPU tensor: shared memory, not IPC
    rebuild, args = _reduction()
    with pytest.raises(ValueError, match="plain tensor"):
        IpcTensor.from_reduction((rebuild, (torch.nn.Parameter, *args[1:])))
    with pytest.raises(ValueError, match="cannot be encoded"):
        IpcTensor.from_reduction(_reduction(size=(4096,), stride=(1,)))  # more than its storage holds


class _Gadget:
    """What a hostile writer of the store would put there: unpickling it makes a folder."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _patched(data: bytes, fmt: str, at: int, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _hostile_messages(tmp_path) -> dict[str, bytes]:
    good = _message().encode()
    h = IpcTensor.HEADER.size  # the header's fields start at 0 (magic), 4, 5, 6, 7, 8, 10, 18, 26, 34, 42, 46, 50
    bf16 = IPC_DTYPES.index("bfloat16") + 1

    def named(**changes) -> bytes:  # a message whose fields `check` would refuse, written anyway
        fields = {**_message().__dict__, **changes}
        message = object.__new__(IpcTensor)
        message.__dict__.update(fields)
        handles = (message.storage_handle, message.ref_counter_handle, message.event_handle)
        header = IpcTensor.HEADER.pack(IpcTensor.MAGIC, IpcTensor.VERSION, 5, bf16, len(message.size), 0,
                                       message.offset, message.storage_size_bytes, 512, 96, *map(len, handles))
        return header + struct.pack(f"<{2 * len(message.size)}q", *message.size, *message.stride) + b"".join(handles)

    return {
        "pickle gadget": pickle.dumps(_Gadget(tmp_path / "pwned")),
        "old format": pickle.dumps(_reduction()),
        "empty": b"",
        "header only": good[:h],
        "one byte short": good[:-1],
        "one byte more": good + b"\x00",
        "bad magic": b"XXXX" + good[4:],
        "next version": _patched(good, "<B", 4, IpcTensor.VERSION + 1),
        "unknown flag": _patched(good, "<B", 5, 0x80 | 5),
        "unknown dtype": _patched(good, "<B", 6, 250),
        "dtype code 0": _patched(good, "<B", 6, 0),
        "too many dims": _patched(good, "<B", 7, IpcTensor.MAX_NDIM + 1),
        "negative size": _patched(good, "<q", h, -4),
        "negative stride": _patched(good, "<q", h + 16, -8),
        "negative offset": _patched(good, "<q", 10, -1),
        "negative storage offset": _patched(good, "<q", 26, -512),
        "view past its storage": _patched(good, "<q", h, 1 << 40),
        "huge handle length": _patched(good, "<I", 42, 0xFFFFFFFF),
        "lengths past the end": _patched(_patched(good, "<I", 42, 60), "<I", 46, 30),
        "lengths shifted": _patched(_patched(good, "<I", 42, 60), "<I", 46, 26),  # same total
        "handles without flag": _patched(good, "<B", 5, 4),
        "no storage handle": named(storage_handle=b""),
        "short event handle": named(event_handle=b"\x00" * 8),
        "counter path escape": named(ref_counter_handle=b"/../../etc/passwd"),
        "counter dotdot": named(ref_counter_handle=b"/.."),
        "counter relative": named(ref_counter_handle=b"torch_1_2_3"),
        "counter with NUL": named(ref_counter_handle=b"/torch_1\x00_2"),
        "counter newline": named(ref_counter_handle=b"/torch_1_2_3\n"),
        "storage handle too big": named(storage_handle=b"\x00" * (IpcTensor.MAX_STORAGE_HANDLE + 1)),
    }


def test_malformed_or_hostile_ipc_messages_are_refused(tmp_path):
    for name, data in _hostile_messages(tmp_path).items():
        with pytest.raises(MalformedIpcMessage, match="CUDA IPC message refused"):
            IpcTensor.decode(data)
        assert not (tmp_path / "pwned").exists(), name
    with pytest.raises(MalformedIpcMessage, match="a pickle: refused, never unpickled"):
        IpcTensor.decode(pickle.dumps(_reduction()))
    with pytest.raises(MalformedIpcMessage, match="str, not bytes"):
        IpcTensor.decode("SSKV")


def test_every_truncation_and_random_corruption_is_refused_or_checked():
    """No byte string makes decode raise anything but MalformedIpcMessage; what it accepts
    passes every check again."""
    good = _message().encode()
    for cut in range(len(good)):
        with pytest.raises(MalformedIpcMessage):
            IpcTensor.decode(good[:cut])
    rng = random.Random(15)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            message = IpcTensor.decode(bytes(data))
        except MalformedIpcMessage:
            continue
        message.check()
        assert IpcTensor.decode(message.encode()) == message
    for _ in range(500):
        noise = IpcTensor.MAGIC + bytes([IpcTensor.VERSION]) + rng.randbytes(rng.randrange(200))
        with contextlib.suppress(MalformedIpcMessage):
            IpcTensor.decode(noise).check()


@pytest.fixture
def store():
    """A rendezvous store as the engine starts it, on loopback."""
    from splitserve.workers.disagg_engine import _start_store

    return _start_store("127.0.0.1")


def _listening_addresses(port: int) -> list[str]:
    """The local addresses of this machine's listening TCP sockets on ``port`` (Linux /proc)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                address, hexport = fields[1].rsplit(":", 1)
                if int(hexport, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    found.append(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
def test_the_rendezvous_store_listens_on_its_host_only(store):
    assert _listening_addresses(store.port) == ["0100007F"]  # 127.0.0.1, not 0.0.0.0 or ::
    client = dist.TCPStore("127.0.0.1", store.port, None, False, timedelta(seconds=10))
    client.set("k", b"v")
    assert store.get("k") == b"v"


def test_a_cuda_ipc_receive_never_unpickles_what_the_store_holds(store, tmp_path):
    """A writer of the store plants a pickle where a handle is expected: the receive refuses it
    (on the old code, unpickling it ran the gadget) and nothing is mapped or acknowledged."""
    transport = CudaIpcTransport("D0", "127.0.0.1", store.port, timeout_s=5)
    store.set("ipc/P0/D0/7", pickle.dumps(_Gadget(tmp_path / "pwned")))
    work = transport.recv(torch.zeros(4, 8, dtype=torch.bfloat16), "P0", 7)
    with pytest.raises(MalformedIpcMessage, match="pickle"):
        work.wait(timedelta(seconds=5))
    assert not (tmp_path / "pwned").exists()
    assert not work.is_completed() and not store.check(["ipc-ack/P0/D0/7"])


def test_a_cuda_ipc_message_for_another_buffer_is_refused(store):
    transport = CudaIpcTransport("D0", "127.0.0.1", store.port, timeout_s=5)
    store.set("ipc/P0/D0/8", _message().encode())  # bf16 [4, 8]
    with pytest.raises(MalformedIpcMessage, match=r"sent torch.bfloat16 \[4, 8\] for a torch.bfloat16 \[32\]"):
        transport.recv(torch.zeros(32, dtype=torch.bfloat16), "P0", 8).wait(timedelta(seconds=5))


# --- on a GPU (skipped without one) ----------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_a_cuda_tensor_message_carries_torch_reduction_exactly():
    from torch.multiprocessing.reductions import reduce_tensor

    base = torch.arange(4096, dtype=torch.float16, device="cuda")
    view = base[100:1124].view(32, 32)
    _, args = reduction = reduce_tensor(view)
    message = IpcTensor.from_reduction(reduction)
    assert IpcTensor.decode(message.encode()) == message
    assert (message.size, message.stride, message.offset, message.dtype, message.device) \
        == (tuple(args[1]), tuple(args[2]), args[3], args[5], args[6])
    assert (message.storage_handle, message.storage_size_bytes, message.storage_offset_bytes) == tuple(args[7:10])
    assert (message.requires_grad, message.ref_counter_handle, message.ref_counter_offset, message.event_handle,
            message.event_sync_required) == tuple(args[10:15])
    again = IpcTensor.of(view)  # each share takes a ref counter slot of its own; the rest is the same
    assert (again.size, again.stride, again.offset, again.storage_handle, again.storage_offset_bytes) \
        == (message.size, message.stride, message.offset, message.storage_handle, message.storage_offset_bytes)


IPC_SHAPE = (64, 1024)


def _ipc_expected(tag: int) -> torch.Tensor:
    return (torch.arange(IPC_SHAPE[0] * IPC_SHAPE[1]) % 251 + tag).reshape(IPC_SHAPE).to(torch.bfloat16)


def _ipc_side(role: str, port: int, out) -> None:
    try:
        torch.cuda.set_device(0)
        transport = CudaIpcTransport(role, "127.0.0.1", port, timeout_s=60)
        wait = timedelta(seconds=60)
        if role == "P0":  # two messages on one allocation, then one on another: handle and offsets
            base = torch.empty(3 * IPC_SHAPE[0] * IPC_SHAPE[1], dtype=torch.bfloat16, device="cuda")
            views = [base[i * base.numel() // 3:(i + 1) * base.numel() // 3].view(IPC_SHAPE) for i in (1, 2)]
            views.append(torch.empty(IPC_SHAPE, dtype=torch.bfloat16, device="cuda"))
            for tag, view in enumerate(views, 1):
                view.copy_(_ipc_expected(tag))
                transport.send(view, "D0", tag).wait(wait)  # done once D0 has copied it
        else:
            for tag in (1, 2, 3):
                got = torch.zeros(IPC_SHAPE, dtype=torch.bfloat16, device="cuda")
                transport.recv(got, "P0", tag).wait(wait)
                assert torch.equal(got.cpu(), _ipc_expected(tag)), f"message {tag}"
        out.put((role, "ok"))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put((role, traceback.format_exc()))
    finally:
        out.close()
        out.join_thread()
        os._exit(0)


@needs_cuda
def test_cuda_ipc_moves_tensors_between_two_processes_on_one_gpu(store):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ipc_side, args=(role, store.port, out)) for role in ("P0", "D0")]
    for proc in procs:
        proc.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert results == {"P0": "ok", "D0": "ok"}, results


# --- a second wait (a cancelled transfer's receiver waits out every message again) -------------


def test_an_in_process_receive_waited_twice_returns_at_once_the_second_time():
    from splitserve.kvtransfer.transport import InProcessTransport, Mailboxes

    boxes = Mailboxes()
    sender, receiver = InProcessTransport("P0", boxes), InProcessTransport("D0", boxes)
    sender.send(torch.arange(4.0), "D0", 3)
    out = torch.zeros(4)
    work = receiver.recv(out, "P0", 3)
    work.wait(SHORT)
    start = time.monotonic()
    work.wait(timedelta(seconds=2))  # before: blocked the whole timeout on an empty box
    assert time.monotonic() - start < 0.1 and work.is_completed() and out.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_store_work_waited_twice_reads_its_key_once_and_returns_at_once(store):
    from splitserve.kvtransfer.transport import _StoreWork

    seen = []
    store.set("ipc/P0/D0/9", b"payload")
    work = _StoreWork(lambda: store, "ipc/P0/D0/9", seen.append)
    work.wait(SHORT)
    start = time.monotonic()
    work.wait(timedelta(seconds=2))  # before: polled for the deleted key until the timeout
    assert time.monotonic() - start < 0.1 and seen == [b"payload"] and not store.check(["ipc/P0/D0/9"])
