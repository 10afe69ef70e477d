"""kvtransfer/receiver.py on its own, over a transport whose messages the test completes by hand:
receives are posted in the senders' order with their tags, a message is written only once it
has landed, a cancelled transfer writes nothing more and frees every buffer, every wait has its
deadline, a transfer that cannot be posted is reported failed."""

from __future__ import annotations

import queue
import time
from datetime import timedelta

import pytest
import torch
from kv_fakes import ROUTES, ManualTransport, make_cache, until

from splitserve.kvtransfer.messages import Direction, RecvCommand
from splitserve.kvtransfer.receiver import KVReceiver
from splitserve.kvtransfer.wire import RankKV, message_tag

#: Transfer 1 of the hand-delivered receive tests: its three blocks, sent and received.
SRC_BLOCKS, DST_BLOCKS = [7, 2, 9], [0, 5, 11]


def _receiver(link_timeout_s: float = 300.0, transport=None):
    events, cache = queue.Queue(), make_cache(None)
    receiver = KVReceiver(0, "m/", RankKV(cache, 0, 0), transport or ManualTransport(), events.put,
                          timedelta(seconds=link_timeout_s), None)
    return receiver, cache, events


def _message(src, blocks, chunk):
    return src[chunk.start:chunk.stop].index_select(2, torch.tensor(blocks))


def _posted_by_hand():
    """A receiver with transfer 1's receives posted: its two messages (layers 0-2, 3), which
    the test delivers."""
    receiver, dst, events = _receiver()
    receiver.post_recv([RecvCommand(1, DST_BLOCKS, ROUTES, 3)])
    until(lambda: len(receiver.transport.recvs) == 2)
    return receiver, dst, events, receiver.transport.recvs


def test_receives_are_posted_in_the_senders_order_from_the_right_peer_with_their_tags():
    receiver, dst, events = _receiver()
    posted = receiver.post_recv([RecvCommand(7, [1], ROUTES, 1), RecvCommand(8, [2], ROUTES, 1, "other/")])
    assert posted.wait(10)
    got = [(w.peer, w.tag) for w in receiver.transport.recvs]
    assert got == [(peer, message_tag(t, range(layer, layer + 1)))
                   for layer in range(4) for t, peer in ((7, "m/P0"), (8, "other/P0"))]


def test_each_message_is_written_only_once_its_receive_has_completed():
    receiver, dst, events, (first, second) = _posted_by_hand()
    src = make_cache(0)
    first.tensor.copy_(_message(src, SRC_BLOCKS, range(0, 3)))  # the bytes are there, the work not done
    time.sleep(0.1)
    assert not dst.any()
    first.deliver()
    until(lambda: dst[:3].any())
    assert torch.equal(dst[:3, :, DST_BLOCKS], src[:3, :, SRC_BLOCKS]) and not dst[3].any()
    second.deliver(_message(src, SRC_BLOCKS, range(3, 4)))
    event = events.get(timeout=10)
    assert event.ok and torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])
    assert (event.side, event.transfer_id) == (Direction.RECV, 1)
    assert receiver._pool.num_free == 2  # both staging buffers back, to be reused


def test_a_transfer_cancelled_midway_writes_nothing_more_and_frees_every_buffer():
    receiver, dst, events, (first, second) = _posted_by_hand()
    src = make_cache(0)
    first.deliver(_message(src, SRC_BLOCKS, range(0, 3)))
    until(lambda: dst[:3].any())
    receiver.cancel(1)
    second.deliver(_message(src, SRC_BLOCKS, range(3, 4)))  # the sender keeps sending: drained
    until(lambda: receiver._pool.num_free == 2)
    assert not dst[3].any() and not receiver._cancelled
    with pytest.raises(queue.Empty):
        events.get(timeout=0.3)


def test_a_receive_that_never_lands_fails_at_the_link_timeout():
    receiver, dst, events = _receiver(link_timeout_s=0.2)
    receiver.post_recv([RecvCommand(1, [0], ROUTES, 3)])
    event = events.get(timeout=10)
    assert not event.ok and "TimeoutError" in event.error
    assert receiver._pool.num_free == 0 and not dst.any()  # abandoned: a late message may still land


def test_a_message_that_fails_fails_its_transfer_and_the_rest_are_reported():
    receiver, dst, events = _receiver()
    receiver.post_recv([RecvCommand(1, [0], ROUTES, 3), RecvCommand(2, [1], ROUTES, 3)])
    until(lambda: len(receiver.transport.recvs) == 4)  # 1's and 2's layers 0-2, then their layer 3
    recvs = receiver.transport.recvs
    recvs[0].deliver(error=RuntimeError("peer gone"))
    for w in recvs[1:]:
        w.deliver()
    got = {e.transfer_id: e for e in (events.get(timeout=10) for _ in range(2))}
    assert not got[1].ok and got[1].error == "RuntimeError: peer gone"
    assert got[2].ok


class _RefusingTransport(ManualTransport):
    def recv(self, tensor, peer, tag):
        raise ConnectionError("no link")


def test_receives_that_cannot_be_posted_fail_every_transfer_of_the_step():
    receiver, dst, events = _receiver(transport=_RefusingTransport())
    posted = receiver.post_recv([RecvCommand(1, [0], ROUTES, 3), RecvCommand(2, [1], ROUTES, 3)])
    assert posted.wait(10)  # set, though posting failed: a benchmark waiting on it goes on
    got = {e.transfer_id: e for e in (events.get(timeout=10) for _ in range(2))}
    assert set(got) == {1, 2} and all(e.error == "ConnectionError: no link" for e in got.values())
