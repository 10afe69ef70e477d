"""The transports' waiting: `wait_until`'s deadline and promptness, NCCL sends (`CudaWork`) and
receives (`WatchedCudaWork`) on a fake torch work (the logic of the NCCL path, run on CPU), and
the `Watcher` that ends receives for their waiters, each pair's in issue order."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from kv_fakes import FakeTorchWork

from splitserve.kvtransfer.transport import POLL_MAX_S, CudaWork, Watcher, wait_until

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
