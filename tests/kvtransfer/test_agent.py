"""KVTransferAgent over the in-process transport: layer-wise packing and unpacking moves exactly
the routed (layers, heads, blocks), cancelled transfers never write, faults behave as set, and
each role gets its own part. (Each part over a hand-delivered transport: test_sender.py,
test_receiver.py; the staging pool: test_buffer_pool.py.)"""

from __future__ import annotations

import queue

import pytest
import torch
from kv_fakes import BLOCKS, BS, DIM, HEADS, LAYERS, ROUTES, make_cache, run_forward

from splitserve.kvtransfer.agent import KVAgentSpec, KVTransferAgent
from splitserve.kvtransfer.faults import FaultyReceiver, FaultySender
from splitserve.kvtransfer.messages import Direction, FaultConfig, RecvCommand, SendCommand, Side, TransportKind
from splitserve.kvtransfer.plan import make_routes
from splitserve.kvtransfer.receiver import KVReceiver
from splitserve.kvtransfer.sender import KVSender
from splitserve.kvtransfer.transport import Mailboxes
from splitserve.kvtransfer.wire import layer_chunks, message_tag
from splitserve.mapping import Mapping

_cache = make_cache


def _pair(faults: FaultConfig = FaultConfig()):
    boxes, events = Mailboxes(), queue.Queue()
    src, dst = _cache(0), _cache(None)
    sender = KVTransferAgent(KVAgentSpec("prefill", "inprocess", "t/", faults=faults), 0, src, 0, 0, events.put, boxes)
    receiver = KVTransferAgent(KVAgentSpec("decode", "inprocess", "t/", faults=faults), 0, dst, 0, 0, events.put, boxes)
    return sender, receiver, src, dst, events


_send = run_forward


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


def test_layer_chunks_and_tags():
    assert layer_chunks(range(2, 9), 3) == [range(2, 5), range(5, 8), range(8, 9)]
    assert message_tag(1, range(4, 8)) == 4096 + 4
    assert message_tag(1 << 19, range(0, 1)) == 0 and message_tag((1 << 20) + 3, range(7, 8)) < 2**31


def test_two_transfers_of_one_step_interleave_in_the_same_order_on_both_sides():
    from splitserve.kvtransfer.wire import message_order

    sender, receiver, src, dst, events = _pair()
    sends = [SendCommand(7, [1, 2], ROUTES, 1), SendCommand(8, [3], ROUTES, 1)]
    recvs = [RecvCommand(7, [4, 5], ROUTES, 1), RecvCommand(8, [6], ROUTES, 1)]
    out = [(m.transfer_id, m.chunk.start) for m in message_order(sends, lambda r: True)]
    back = [(m.transfer_id, m.chunk.start) for m in message_order(recvs, lambda r: True)]
    assert out == back == [(7, 0), (8, 0), (7, 1), (8, 1), (7, 2), (8, 2), (7, 3), (8, 3)]
    receiver.post_recv(recvs)
    hook = sender.layer_hook(sends)
    for layer in range(LAYERS):
        hook(layer)
    got = _events(events, 4)
    assert all(got[(side, t)].ok for side in ("send", "recv") for t in (7, 8))
    assert torch.equal(dst[:, :, [4, 5, 6]], src[:, :, [1, 2, 3]])


# ---- the agent composes its role's part ---------------------------------------------------------


def test_each_role_gets_its_own_part_and_refuses_the_other_roles_calls():
    sender, receiver, *_ = _pair()
    assert type(sender.sender) is KVSender and sender.receiver is None
    assert type(receiver.receiver) is KVReceiver and receiver.sender is None
    with pytest.raises(RuntimeError, match="receives no KV"):
        sender.post_recv([RecvCommand(1, [0], ROUTES, 3)])
    with pytest.raises(RuntimeError, match="sends no KV"):
        receiver.layer_hook([SendCommand(1, [0], ROUTES, 3)])


def test_the_fault_injecting_parts_are_built_only_when_asked():
    sender, receiver, *_ = _pair(FaultConfig(drop_ack_of_transfer=2))
    assert type(sender.sender) is KVSender and type(receiver.receiver) is FaultyReceiver
    sender, receiver, *_ = _pair(FaultConfig(delay_transfer=1, delay_s=0.0))
    assert type(sender.sender) is FaultySender and type(receiver.receiver) is KVReceiver


def test_the_spec_takes_the_plain_strings_of_configs_and_refuses_unknown_names():
    spec = KVAgentSpec("decode", "cuda_ipc")
    assert spec.role is Side.DECODE and spec.transport is TransportKind.CUDA_IPC
    assert spec.role == "decode" and spec.transport == "cuda_ipc"  # still the strings logs and YAML show
    with pytest.raises(ValueError):
        KVAgentSpec("prefill", "ncl")
    with pytest.raises(ValueError):
        KVAgentSpec("worker", "gloo")


def test_events_name_their_direction():
    sender, receiver, src, dst, events = _pair()
    receiver.post_recv([RecvCommand(4, [1], ROUTES, 3)])
    _send(sender, 4, [2])
    assert {e.side for e in (events.get(timeout=10) for _ in range(2))} == {Direction.SEND, Direction.RECV}
