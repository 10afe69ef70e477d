"""kvtransfer/sender.py on its own, over a transport whose messages the test completes by hand:
each layer chunk goes out right after its last layer, to the right peer with its tag; a staging
buffer is packed into again only once its send is through; a transfer is reported once all its
messages are; a send that never goes through fails at the link timeout."""

from __future__ import annotations

import queue
from datetime import timedelta

import pytest
import torch
from kv_fakes import LAYERS, ROUTES, ManualTransport, make_cache, run_forward

from splitserve.kvtransfer.messages import Direction, SendCommand
from splitserve.kvtransfer.plan import make_routes
from splitserve.kvtransfer.sender import KVSender
from splitserve.kvtransfer.wire import RankKV, message_tag
from splitserve.mapping import Mapping


def _sender(link_timeout_s: float = 300.0, rank: int = 0, cache: torch.Tensor | None = None):
    events = queue.Queue()
    cache = make_cache(0) if cache is None else cache
    sender = KVSender(rank, "m/", RankKV(cache, 0, 0), ManualTransport(), events.put,
                      timedelta(seconds=link_timeout_s), None)
    return sender, cache, events


def _ptrs(works) -> set[int]:
    return {w.tensor.data_ptr() for w in works}


def test_each_layer_chunk_goes_out_right_after_its_last_layer_packed_from_its_blocks():
    sender, src, events = _sender()
    sends = sender.transport.sends
    hook = sender.layer_hook([SendCommand(5, [7, 2], ROUTES, 3)])
    hook(0)
    hook(1)
    assert not sends  # layers 0-2 are one chunk: nothing before layer 2 is computed
    hook(2)
    assert len(sends) == 1 and torch.equal(sends[0].sent, src[0:3].index_select(2, torch.tensor([7, 2])))
    hook(3)
    assert len(sends) == 2 and torch.equal(sends[1].sent, src[3:4].index_select(2, torch.tensor([7, 2])))
    assert [(w.peer, w.tag) for w in sends] == [("m/D0", message_tag(5, range(0, 3))), ("m/D0", message_tag(5, range(3, 4)))]


def test_a_transfer_is_reported_once_all_its_messages_are_through():
    sender, src, events = _sender()
    run_forward(sender, 1, [7, 2, 9])
    first, second = sender.transport.sends
    first.deliver()
    with pytest.raises(queue.Empty):
        events.get(timeout=0.2)  # one message of two is through: no report yet
    second.deliver()
    event = events.get(timeout=10)
    assert (event.side, event.transfer_id, event.rank, event.ok) == (Direction.SEND, 1, 0, True)
    assert event.num_bytes == sum(w.tensor.numel() * 4 for w in (first, second))


def test_a_failed_message_fails_its_transfer():
    sender, src, events = _sender()
    run_forward(sender, 1, [7])
    first, second = sender.transport.sends
    first.deliver(error=RuntimeError("peer gone"))
    second.deliver()
    event = events.get(timeout=10)
    assert not event.ok and event.error == "peer gone"
    assert sender._pool.num_free == 1  # the failed message's buffer is not lent again


def test_a_rank_without_routes_of_its_own_sends_nothing():
    # prefill tp 2 -> decode tp 1 with 1 KV head: only the replica leader, rank 0, sends
    routes = make_routes(Mapping(2, 1, tp_size=2), Mapping(1, 0), LAYERS, 1)
    sender, src, events = _sender(rank=1)
    assert sender.layer_hook([SendCommand(1, [0], routes, 2)]) is None
    assert not sender.transport.sends


def test_a_staging_buffer_is_packed_into_again_only_once_its_send_is_through():
    sender, src, events = _sender()
    sends = sender.transport.sends
    run_forward(sender, 1, [7, 2, 9])  # two messages: layers 0-2 and 3
    first = list(sends)
    run_forward(sender, 2, [1, 4, 5])  # the same shapes, while 1's sends are still in flight
    assert _ptrs(sends[2:]).isdisjoint(_ptrs(first))
    assert all(torch.equal(w.tensor, w.sent) for w in first)  # nothing overwrote a buffer in flight
    for w in first:
        w.deliver()
    event = events.get(timeout=10)
    assert (event.side, event.transfer_id, event.ok) == ("send", 1, True)
    run_forward(sender, 3, [3, 6, 8])  # 2 is still in flight: 3 gets 1's buffers back
    assert _ptrs(sends[4:]) == _ptrs(first)
    for w in sends[2:]:
        w.deliver()
    assert {events.get(timeout=10).transfer_id for _ in range(2)} == {2, 3}


def test_a_send_that_never_goes_through_fails_at_the_link_timeout_and_its_buffer_is_not_reused():
    sender, src, events = _sender(link_timeout_s=0.2)
    run_forward(sender, 1, [7])
    event = events.get(timeout=10)
    assert not event.ok and "no message" in event.error
    assert sender._pool.num_free == 0  # forgotten: the transport may still read it
    stuck = _ptrs(sender.transport.sends)
    run_forward(sender, 2, [7])
    assert _ptrs(sender.transport.sends[2:]).isdisjoint(stuck)
