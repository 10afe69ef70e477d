"""kvtransfer/wire.py: what both ends derive alone — the links a rank connects, a transfer's
messages (a route's layer chunks) and their order, and where a message's bytes are in a rank's
cache. (Chunks, tags and the shared order: also in test_agent.py, end to end.)"""

from __future__ import annotations

import torch
from kv_fakes import LAYERS, ROUTES, make_cache

from splitserve.kvtransfer.messages import RecvCommand, SendCommand, Side
from splitserve.kvtransfer.plan import make_routes
from splitserve.kvtransfer.wire import RankKV, link_peers, message_order, message_tag, peer_name
from splitserve.mapping import Mapping


def test_peer_names_and_the_links_each_side_connects():
    # prefill pp 2 -> decode tp 2: each prefill rank sends to both decode ranks
    routes = make_routes(Mapping(2, 0, pp_size=2), Mapping(2, 0, tp_size=2), LAYERS, 2)
    assert peer_name(Side.PREFILL, 1, "a/") == "a/P1" and peer_name("decode", 0) == "D0"
    assert link_peers(Side.PREFILL, 1, routes, ["a/", "b/"]) == ["a/D0", "a/D1", "b/D0", "b/D1"]
    assert link_peers(Side.DECODE, 0, routes, [""]) == ["P0", "P1"]
    assert link_peers(Side.DECODE, 5, routes, [""]) == []


def test_a_message_knows_its_transfer_tag_and_the_layer_it_is_sent_after():
    cmd = SendCommand(9, [0], ROUTES, 3)
    first, last = message_order([cmd], lambda r: True)
    assert first.command is cmd and first.chunk == range(0, 3) and last.chunk == range(3, 4)
    assert (first.transfer_id, first.tag, first.last_layer) == (9, message_tag(9, range(0, 3)), 2)


def test_the_order_keeps_only_the_routes_asked_for():
    routes = make_routes(Mapping(1, 0), Mapping(2, 0, tp_size=2), LAYERS, 2)  # 0 -> 0 head 0, 0 -> 1 head 1
    messages = message_order([RecvCommand(1, [0], routes, 4)], lambda r: r.dst_rank == 1)
    assert [(m.route.dst_rank, m.chunk) for m in messages] == [(1, range(0, 4))]


def test_a_rank_addresses_its_cache_by_global_layers_and_heads():
    # decode rank 1 of pp 2 x tp 2 holds layers 2-3 and KV head 1 of 4 layers x 2 heads
    data = make_cache(3)[2:, :, :, :, 1:]
    kv = RankKV(data, layer_start=2, head_start=1)
    routes = make_routes(Mapping(1, 0), Mapping(4, 3, tp_size=2, pp_size=2), LAYERS, 2)
    (message,) = message_order([RecvCommand(1, [0, 1], routes, 1)], lambda r: r.dst_rank == 3)[1:]
    assert message.chunk == range(3, 4) and message.route.heads == range(1, 2)
    assert torch.equal(kv.view(message), data[1:2])
    assert kv.message_shape(message, 2) == (1, 2, 2, data.shape[3], 1, data.shape[5])
