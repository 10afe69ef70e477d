"""kvtransfer/buffer_pool.py: a staging buffer is lent again only once its work has completed,
the oldest fitting one first, within a bounded memory budget; a failed one never again."""

from __future__ import annotations

import torch
from kv_fakes import FakeTorchWork

from splitserve.kvtransfer.buffer_pool import BufferPool, _capacity


def _pool(**kwargs) -> BufferPool:
    return BufferPool(torch.float32, torch.device("cpu"), **kwargs)


def test_pool_lends_a_buffer_again_only_once_its_work_completed():
    pool, work = _pool(), FakeTorchWork()
    a = pool.take((2, 3))
    pool.give(a, work)
    b = pool.take((2, 3))
    assert b.data_ptr() != a.data_ptr()
    work.finish()
    c = pool.take((3, 2))
    assert c.data_ptr() == a.data_ptr() and c.shape == (3, 2)


def test_pool_lends_the_oldest_free_buffer_that_holds_the_request_at_most_twice():
    pool = _pool()
    bufs = [pool.take((n,)) for n in (128, 64, 96)]
    for buf in bufs:
        pool.give(buf)
    assert pool.take((50,)).data_ptr() == bufs[1].data_ptr()  # 128 holds more than twice 50
    assert pool.take((50,)).data_ptr() == bufs[2].data_ptr()
    assert pool.take((50,)).data_ptr() not in {b.data_ptr() for b in bufs}


def test_pool_asks_only_the_oldest_fitting_buffer_whether_its_work_completed():
    pool, works = _pool(), [FakeTorchWork(), FakeTorchWork()]
    bufs = [pool.take((8,)) for _ in works]
    for buf, work in zip(bufs, works):
        pool.give(buf, work)
    works[1].finish()  # the newer one is through, the oldest not: a fresh buffer (one question)
    assert pool.take((8,)).data_ptr() not in {b.data_ptr() for b in bufs}
    assert pool.take((8,)).data_ptr() == bufs[1].data_ptr()  # the one in flight went to the back
    works[0].finish()
    assert pool.take((8,)).data_ptr() == bufs[0].data_ptr()


def test_pool_frees_completed_buffers_past_keep_bytes_never_one_in_flight():
    pool = _pool(keep_bytes=2 * 128 * 4)
    works = [FakeTorchWork() for _ in range(3)]
    for work in works:
        pool.give(pool.take((128,)), work)
    assert pool.num_free == 3  # over the budget, but all still in flight
    for work in works:
        work.finish()
    pool.give(pool.take((8,)))
    assert pool.num_free == 2  # the two oldest went: 128 + 8 floats left


def test_pool_forgets_a_buffer_for_good():
    pool, work = _pool(), FakeTorchWork()
    a = pool.take((4,))
    pool.give(a, work)
    pool.forget(a)
    work.finish()
    assert pool.take((4,)).data_ptr() != a.data_ptr()


def test_capacity_rounds_up_by_at_most_an_eighth():
    assert all(n <= _capacity(n) <= n * 1.125 for n in range(1, 5000))
