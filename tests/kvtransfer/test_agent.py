"""KVTransferAgent over the in-process transport: layer-wise packing and unpacking moves exactly
the routed (layers, heads, blocks), cancelled transfers never write, faults behave as set. Over
a transport whose messages the test completes by hand: a staging buffer is reused only once its
message is through, a message is written only once it has landed, every wait has its deadline.
And the BufferPool itself."""

from __future__ import annotations

import queue
import time

import pytest
import torch
from kv_fakes import FakeTorchWork, ManualTransport

from splitserve.kvtransfer.agent import BufferPool, KVAgentSpec, KVTransferAgent, layer_groups, message_tag
from splitserve.kvtransfer.messages import FaultConfig, RecvCommand, SendCommand
from splitserve.kvtransfer.plan import make_routes
from splitserve.kvtransfer.transport import Mailboxes
from splitserve.mapping import Mapping

LAYERS, HEADS, DIM, BLOCKS, BS = 4, 2, 8, 12, 4


def _cache(seed: int | None) -> torch.Tensor:
    shape = (LAYERS, 2, BLOCKS, BS, HEADS, DIM)
    if seed is None:
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pair(faults: FaultConfig = FaultConfig()):
    boxes, events = Mailboxes(), queue.Queue()
    src, dst = _cache(0), _cache(None)
    sender = KVTransferAgent(KVAgentSpec("prefill", "inprocess", "t/", faults=faults), 0, src, 0, 0, events.put, boxes)
    receiver = KVTransferAgent(KVAgentSpec("decode", "inprocess", "t/", faults=faults), 0, dst, 0, 0, events.put, boxes)
    return sender, receiver, src, dst, events


ROUTES = make_routes(Mapping(1, 0), Mapping(1, 0), LAYERS, HEADS)


def _send(sender, transfer_id, blocks, per_message=3):
    hook = sender.layer_hook([SendCommand(transfer_id, blocks, ROUTES, per_message)])
    for layer in range(LAYERS):
        hook(layer)


def _events(events, n):
    got = [events.get(timeout=10) for _ in range(n)]
    return {(e.side, e.transfer_id): e for e in got}


def test_blocks_arrive_where_the_decode_side_asked():
    sender, receiver, src, dst, events = _pair()
    src_blocks, dst_blocks = [7, 2, 9], [0, 5, 11]
    posted = receiver.post_recv([RecvCommand(1, dst_blocks, ROUTES, 3)])
    assert posted.wait(10), "the posting thread never posted the receives"
    _send(sender, 1, src_blocks)
    got = _events(events, 2)
    assert got[("recv", 1)].ok and got[("send", 1)].ok
    assert got[("recv", 1)].num_bytes == LAYERS * 2 * 3 * BS * HEADS * DIM * 4  # float32
    assert torch.equal(dst[:, :, dst_blocks], src[:, :, src_blocks])
    untouched = [b for b in range(BLOCKS) if b not in dst_blocks]
    assert not dst[:, :, untouched].any()


def test_only_the_routed_heads_and_layers_are_written():
    # decode rank 1 of tp 2 holds KV head 1 only: it gets head 1 of every layer from rank 0
    routes = make_routes(Mapping(1, 0), Mapping(2, 1, tp_size=2), LAYERS, HEADS)
    boxes, events = Mailboxes(), queue.Queue()
    src = _cache(1)
    dst = torch.zeros(LAYERS, 2, BLOCKS, BS, 1, DIM)
    sender = KVTransferAgent(KVAgentSpec("prefill", "inprocess", "h/"), 0, src, 0, 0, events.put, boxes)
    receiver = KVTransferAgent(KVAgentSpec("decode", "inprocess", "h/"), 1, dst, 0, 1, events.put, boxes)
    receiver.post_recv([RecvCommand(3, [4], routes, 2)])
    hook = sender.layer_hook([SendCommand(3, [6], routes, 2)])
    for layer in range(LAYERS):
        hook(layer)
    got = {e.side: e for e in (events.get(timeout=10) for _ in range(2)) if e.rank == 1 or e.side == "send"}
    assert got["recv"].ok
    assert torch.equal(dst[:, :, 4, :, 0], src[:, :, 6, :, 1])


def test_cancelled_transfer_never_writes():
    sender, receiver, src, dst, events = _pair()
    receiver.cancel(5)
    receiver.post_recv([RecvCommand(5, [1, 2], ROUTES, 3)])
    _send(sender, 5, [3, 4])
    assert _events(events, 1)[("send", 5)].ok
    with pytest.raises(queue.Empty):
        events.get(timeout=0.5)  # the cancelled receive reports nothing
    assert not dst.any()


def test_dropped_ack_writes_but_does_not_report():
    sender, receiver, src, dst, events = _pair(FaultConfig(drop_ack_of_transfer=2))
    receiver.post_recv([RecvCommand(2, [1], ROUTES, 3)])
    _send(sender, 2, [1])
    assert set(_events(events, 1)) == {("send", 2)}
    with pytest.raises(queue.Empty):
        events.get(timeout=0.5)


def test_layer_groups_and_tags():
    assert layer_groups(range(2, 9), 3) == [range(2, 5), range(5, 8), range(8, 9)]
    assert message_tag(1, range(4, 8)) == 4096 + 4
    assert message_tag(1 << 19, range(0, 1)) == 0 and message_tag((1 << 20) + 3, range(7, 8)) < 2**31


def test_two_transfers_of_one_step_interleave_in_the_same_order_on_both_sides():
    from splitserve.kvtransfer.agent import message_order

    sender, receiver, src, dst, events = _pair()
    sends = [SendCommand(7, [1, 2], ROUTES, 1), SendCommand(8, [3], ROUTES, 1)]
    recvs = [RecvCommand(7, [4, 5], ROUTES, 1), RecvCommand(8, [6], ROUTES, 1)]
    out = [(c.transfer_id, g.start) for c, _, g in message_order(sends, lambda r: True)]
    back = [(c.transfer_id, g.start) for c, _, g in message_order(recvs, lambda r: True)]
    assert out == back == [(7, 0), (8, 0), (7, 1), (8, 1), (7, 2), (8, 2), (7, 3), (8, 3)]
    receiver.post_recv(recvs)
    hook = sender.layer_hook(sends)
    for layer in range(LAYERS):
        hook(layer)
    got = _events(events, 4)
    assert all(got[(side, t)].ok for side in ("send", "recv") for t in (7, 8))
    assert torch.equal(dst[:, :, [4, 5, 6]], src[:, :, [1, 2, 3]])


# ---- staging buffers: reuse only after the message is through (the CUDA path's logic) ---------


def _manual(role: str, link_timeout_s: float = 300.0):
    """An agent whose messages the test delivers by hand (`ManualTransport`)."""
    events, cache = queue.Queue(), _cache(0 if role == "prefill" else None)
    agent = KVTransferAgent(KVAgentSpec(role, "inprocess", "m/", link_timeout_s=link_timeout_s), 0, cache, 0, 0,
                            events.put, Mailboxes())
    agent.transport = ManualTransport()
    return agent, cache, events


def _message(src, blocks, group):
    return src[group.start:group.stop].index_select(2, torch.tensor(blocks))


def _until(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _ptrs(works) -> set[int]:
    return {w.tensor.data_ptr() for w in works}


def test_a_staging_buffer_is_packed_into_again_only_once_its_send_is_through():
    sender, src, events = _manual("prefill")
    sends = sender.transport.sends
    _send(sender, 1, [7, 2, 9])  # two messages: layers 0-2 and 3
    first = list(sends)
    _send(sender, 2, [1, 4, 5])  # the same shapes, while 1's sends are still in flight
    assert _ptrs(sends[2:]).isdisjoint(_ptrs(first))
    assert all(torch.equal(w.tensor, w.sent) for w in first)  # nothing overwrote a buffer in flight
    for w in first:
        w.deliver()
    event = events.get(timeout=10)
    assert (event.side, event.transfer_id, event.ok) == ("send", 1, True)
    _send(sender, 3, [3, 6, 8])  # 2 is still in flight: 3 gets 1's buffers back
    assert _ptrs(sends[4:]) == _ptrs(first)
    for w in sends[2:]:
        w.deliver()
    assert {events.get(timeout=10).transfer_id for _ in range(2)} == {2, 3}


def test_a_send_that_never_goes_through_fails_at_the_link_timeout_and_its_buffer_is_not_reused():
    sender, src, events = _manual("prefill", link_timeout_s=0.2)
    _send(sender, 1, [7])
    event = events.get(timeout=10)
    assert not event.ok and "no message" in event.error
    assert sender._pool.num_free == 0  # forgotten: the transport may still read it
    stuck = _ptrs(sender.transport.sends)
    _send(sender, 2, [7])
    assert _ptrs(sender.transport.sends[2:]).isdisjoint(stuck)


#: Transfer 1 of the hand-delivered receive tests: its three blocks, sent and received.
SRC_BLOCKS, DST_BLOCKS = [7, 2, 9], [0, 5, 11]


def _posted_by_hand():
    """A decode agent with transfer 1's receives posted: its two messages (layers 0-2, 3), which
    the test delivers."""
    receiver, dst, events = _manual("decode")
    receiver.post_recv([RecvCommand(1, DST_BLOCKS, ROUTES, 3)])
    _until(lambda: len(receiver.transport.recvs) == 2)
    return receiver, dst, events, receiver.transport.recvs


def test_each_message_is_written_only_once_its_receive_has_completed():
    receiver, dst, events, (first, second) = _posted_by_hand()
    src = _cache(0)
    first.tensor.copy_(_message(src, SRC_BLOCKS, range(0, 3)))  # the bytes are there, the work not done
    time.sleep(0.1)
    assert not dst.any()
    first.deliver()
    _until(lambda: dst[:3].any())
    assert torch.equal(dst[:3, :, DST_BLOCKS], src[:3, :, SRC_BLOCKS]) and not dst[3].any()
    second.deliver(_message(src, SRC_BLOCKS, range(3, 4)))
    event = events.get(timeout=10)
    assert event.ok and torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])
    assert receiver._pool.num_free == 2  # both staging buffers back, to be reused


def test_a_transfer_cancelled_midway_writes_nothing_more_and_frees_every_buffer():
    receiver, dst, events, (first, second) = _posted_by_hand()
    src = _cache(0)
    first.deliver(_message(src, SRC_BLOCKS, range(0, 3)))
    _until(lambda: dst[:3].any())
    receiver.cancel(1)
    second.deliver(_message(src, SRC_BLOCKS, range(3, 4)))  # the sender keeps sending: drained
    _until(lambda: receiver._pool.num_free == 2)
    assert not dst[3].any() and not receiver._cancelled
    with pytest.raises(queue.Empty):
        events.get(timeout=0.3)


def test_a_receive_that_never_lands_fails_at_the_link_timeout():
    receiver, dst, events = _manual("decode", link_timeout_s=0.2)
    receiver.post_recv([RecvCommand(1, [0], ROUTES, 3)])
    event = events.get(timeout=10)
    assert not event.ok and "TimeoutError" in event.error
    assert receiver._pool.num_free == 0 and not dst.any()  # abandoned: a late message may still land


# ---- BufferPool ---------------------------------------------------------------------------------


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
    from splitserve.kvtransfer.agent import _capacity

    assert all(n <= _capacity(n) <= n * 1.125 for n in range(1, 5000))
