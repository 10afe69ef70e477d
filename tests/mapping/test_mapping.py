"""Mapping: the docstring's worked examples, invariants over several layouts, and bad input."""

import dataclasses

import pytest

from splitserve.mapping import Mapping

LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (1, 3), (2, 2), (2, 4), (3, 1)]


def all_ranks(tp: int, pp: int) -> list[Mapping]:
    return [Mapping(tp * pp, r, tp_size=tp, pp_size=pp) for r in range(tp * pp)]


# --- the worked examples in Mapping's docstring --------------------------------------------------


def test_example_tp2_pp2():
    m = Mapping(4, 0, tp_size=2, pp_size=2)
    assert m.all_tp_peers() == [[0, 1], [2, 3]]
    assert m.all_pp_peers() == [[0, 2], [1, 3]]


def test_example_tp2_pp4():
    m = Mapping(8, 5, tp_size=2, pp_size=4)
    assert m.all_tp_peers() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert m.all_pp_peers() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert (m.tp_rank, m.pp_rank, m.prev_pp_rank, m.next_pp_rank) == (1, 2, 3, 7)
    assert (m.tp_peers, m.pp_peers) == ([4, 5], [1, 3, 5, 7])
    stages = [m.for_rank(r).pp_layers(30) for r in (0, 2, 4, 6)]
    assert stages == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]


def test_example_smollm2_tp3():
    for m in all_ranks(3, 1):
        r = m.rank
        assert m.heads(9) == range(3 * r, 3 * r + 3)
        assert m.kv_heads(3) == range(r, r + 1)
        assert m.kv_head_replicas(3) == 1 and m.is_kv_replica_leader(3)


def test_example_two_kv_heads_tp4():
    ranks = all_ranks(4, 1)
    assert [list(m.kv_heads(2)) for m in ranks] == [[0], [0], [1], [1]]
    assert [m.rank for m in ranks if m.is_kv_replica_leader(2)] == [0, 2]
    assert ranks[0].kv_head_replicas(2) == 2


# --- invariants over several layouts -------------------------------------------------------------


@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_groups_cover_each_rank_once(tp, pp):
    ranks = all_ranks(tp, pp)
    m = ranks[0]
    for groups in (m.all_tp_peers(), m.all_pp_peers()):
        assert sorted(r for g in groups for r in g) == list(range(tp * pp))
    for m in ranks:
        assert m.tp_peers[m.tp_rank] == m.rank and m.pp_peers[m.pp_rank] == m.rank
        assert m.rank == m.pp_rank * tp + m.tp_rank
        assert all(m.for_rank(r).pp_rank == m.pp_rank for r in m.tp_peers)
        assert all(m.for_rank(r).tp_rank == m.tp_rank for r in m.pp_peers)


@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_pipeline_neighbours(tp, pp):
    for m in all_ranks(tp, pp):
        assert m.is_first_pp_rank == (m.prev_pp_rank is None) == (m.pp_peers[0] == m.rank)
        assert m.is_last_pp_rank == (m.next_pp_rank is None) == (m.pp_peers[-1] == m.rank)
        if m.next_pp_rank is not None:
            assert m.for_rank(m.next_pp_rank).prev_pp_rank == m.rank


@pytest.mark.parametrize("tp, pp", LAYOUTS)
@pytest.mark.parametrize("num_layers", [4, 7, 30])  # >= every pp here; fewer is an error
def test_pp_layers_cover_every_layer_once_in_order(tp, pp, num_layers):
    stages = [all_ranks(tp, pp)[p * tp].pp_layers(num_layers) for p in range(pp)]
    assert [layer for s in stages for layer in s] == list(range(num_layers))
    sizes = [len(s) for s in stages]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1
    # Ranks of one stage agree on its layers.
    for m in all_ranks(tp, pp):
        assert m.pp_layers(num_layers) == stages[m.pp_rank]


@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_heads_and_kv_heads_cover_every_head(tp, pp):
    ranks = all_ranks(tp, pp)[:tp]  # one stage; the others repeat it
    for num_kv in [n for n in range(1, 2 * tp + 1) if n % tp == 0 or tp % n == 0]:
        held = [m.kv_heads(num_kv) for m in ranks]
        assert sorted({h for r in held for h in r}) == list(range(num_kv))
        replicas = ranks[0].kv_head_replicas(num_kv)
        assert all(held.count(r) == replicas for r in held)
        leaders = [m for m in ranks if m.is_kv_replica_leader(num_kv)]
        # Each head is sent exactly once, by the first rank that holds it.
        assert [h for m in leaders for h in m.kv_heads(num_kv)] == list(range(num_kv))
        assert all(held.index(held[m.tp_rank]) == m.tp_rank for m in leaders)
    heads = [m.heads(4 * tp) for m in ranks]
    assert [h for r in heads for h in r] == list(range(4 * tp))
    assert [m.shard_range(6 * tp) for m in ranks] == [range(6 * t, 6 * t + 6) for t in range(tp)]


def test_local_and_node_rank():
    m = Mapping(16, 11, tp_size=4, pp_size=4, gpus_per_node=8)
    assert (m.local_rank, m.node_rank) == (3, 1)
    m = Mapping(4, 3, tp_size=4)
    assert (m.local_rank, m.node_rank) == (3, 0)


# --- invalid input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=4, rank=0, tp_size=2, pp_size=1), r"world_size \(4\).*2 \* 1 = 2"),
        (dict(world_size=4, rank=4, tp_size=4), r"rank must be in \[0, 4\), got 4"),
        (dict(world_size=4, rank=-1, tp_size=4), r"got -1"),
        (dict(world_size=0, rank=0), r"world_size must be >= 1, got 0"),
        (dict(world_size=1, rank=0, tp_size=0), r"tp_size must be >= 1, got 0"),
        (dict(world_size=1, rank=0, pp_size=0), r"pp_size must be >= 1, got 0"),
        (dict(world_size=1, rank=0, gpus_per_node=0), r"gpus_per_node must be >= 1, got 0"),
    ],
)
def test_invalid_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mapping(**kwargs)


def test_non_int_sizes():
    with pytest.raises(TypeError, match="tp_size"):
        Mapping(2, 0, tp_size="2", pp_size=1)


def test_invalid_counts():
    m = Mapping(8, 0, tp_size=4, pp_size=2)
    with pytest.raises(ValueError, match=r"num_heads \(6\).*tp_size \(4\)"):
        m.heads(6)
    with pytest.raises(ValueError, match=r"num_kv_heads \(6\).*tp_size \(4\)"):
        m.kv_heads(6)  # more KV heads than ranks, not divisible
    with pytest.raises(ValueError, match=r"tp_size \(4\).*num_kv_heads \(3\)"):
        m.kv_heads(3)  # fewer KV heads than ranks, not a divisor
    with pytest.raises(ValueError, match=r"tp_size \(4\).*num_kv_heads \(3\)"):
        m.is_kv_replica_leader(3)
    with pytest.raises(ValueError, match=r"num_kv_heads must be >= 1, got 0"):
        m.kv_head_replicas(0)
    with pytest.raises(ValueError, match=r"size \(10\).*tp_size \(4\)"):
        m.shard_range(10)
    with pytest.raises(ValueError, match=r"num_layers \(1\).*pp_size \(2\)"):
        m.pp_layers(1)


# --- serialisation and immutability --------------------------------------------------------------


@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_dict_round_trip(tp, pp):
    for m in all_ranks(tp, pp):
        assert Mapping.from_dict(m.to_dict()) == m


def test_from_dict_rejects_unknown_and_missing_keys():
    d = Mapping(2, 1, tp_size=2).to_dict()
    with pytest.raises(ValueError, match=r"unknown Mapping keys: \['tp'\]"):
        Mapping.from_dict({**d, "tp": 2})
    del d["rank"]
    with pytest.raises(ValueError, match=r"missing Mapping keys: \['rank'\]"):
        Mapping.from_dict(d)


def test_immutable():
    m = Mapping(4, 1, tp_size=2, pp_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.rank = 2
    assert m.for_rank(2).rank == 2 and m.rank == 1
    assert hash(m) == hash(Mapping(4, 1, tp_size=2, pp_size=2))
