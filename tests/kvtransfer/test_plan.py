"""Transfer plan: the docstring's worked examples, exhaustive coverage over many (tp, pp) layout
pairs, the filters, and the connect-time compatibility check."""

from collections import Counter
from itertools import product

import pytest

from splitserve.kvtransfer.messages import KVRoute
from splitserve.kvtransfer.plan import check_compatible, make_routes, routes_from, routes_to
from splitserve.mapping import Mapping


def group(tp: int, pp: int, rank: int = 0) -> Mapping:
    return Mapping(tp * pp, rank, tp_size=tp, pp_size=pp)


def as_tuples(routes: list[KVRoute]) -> list[tuple]:
    return [(r.src_rank, r.dst_rank, r.layers, r.heads) for r in routes]


# --- the worked examples in plan.py's docstring --------------------------------------------------


def test_example_prefill_tp2_to_decode_tp1():
    routes = make_routes(group(2, 1), group(1, 1), num_layers=4, num_kv_heads=2)
    assert as_tuples(routes) == [
        (0, 0, range(0, 4), range(0, 1)),
        (1, 0, range(0, 4), range(1, 2)),
    ]


def test_example_prefill_pp2_to_decode_pp1():
    routes = make_routes(group(1, 2), group(1, 1), num_layers=4, num_kv_heads=2)
    assert as_tuples(routes) == [
        (0, 0, range(0, 2), range(0, 2)),
        (1, 0, range(2, 4), range(0, 2)),
    ]


def test_example_prefill_pp2_to_decode_tp2():
    routes = make_routes(group(1, 2), group(2, 1), num_layers=4, num_kv_heads=2)
    assert as_tuples(routes) == [
        (0, 0, range(0, 2), range(0, 1)),
        (0, 1, range(0, 2), range(1, 2)),
        (1, 0, range(2, 4), range(0, 1)),
        (1, 1, range(2, 4), range(1, 2)),
    ]


def test_example_prefill_replicas_send_once():
    # tp 4 with 2 KV heads: ranks 0, 1 hold head 0, ranks 2, 3 head 1; only 0 and 2 send.
    routes = make_routes(group(4, 1), group(1, 1), num_layers=4, num_kv_heads=2)
    assert as_tuples(routes) == [
        (0, 0, range(0, 4), range(0, 1)),
        (2, 0, range(0, 4), range(1, 2)),
    ]
    assert routes_from(routes, 1) == [] and routes_from(routes, 3) == []


def test_example_decode_replicas_each_get_a_copy():
    routes = make_routes(group(1, 1), group(2, 1), num_layers=4, num_kv_heads=1)
    assert as_tuples(routes) == [
        (0, 0, range(0, 4), range(0, 1)),
        (0, 1, range(0, 4), range(0, 1)),
    ]


def test_uneven_pp_split_on_both_sides():
    # 30 layers: prefill pp 4 -> 8, 8, 7, 7 (0-8, 8-16, 16-23, 23-30); decode pp 2 -> 0-15, 15-30.
    routes = make_routes(group(1, 4), group(1, 2), num_layers=30, num_kv_heads=3)
    assert as_tuples(routes) == [
        (0, 0, range(0, 8), range(0, 3)),
        (1, 0, range(8, 15), range(0, 3)),
        (1, 1, range(15, 16), range(0, 3)),
        (2, 1, range(16, 23), range(0, 3)),
        (3, 1, range(23, 30), range(0, 3)),
    ]


def test_any_rank_of_the_groups_gives_the_same_plan():
    expected = make_routes(group(2, 2, 0), group(4, 1, 0), num_layers=6, num_kv_heads=4)
    for s, d in product(range(4), range(4)):
        assert make_routes(group(2, 2, s), group(4, 1, d), 6, 4) == expected


# --- exhaustive coverage -------------------------------------------------------------------------


def fits(m: Mapping, num_layers: int, num_kv_heads: int) -> bool:
    """Whether Mapping accepts this model on this layout."""
    try:
        m.pp_layers(num_layers)
        m.kv_heads(num_kv_heads)
    except ValueError:
        return False
    return True


def check_plan(src: Mapping, dst: Mapping, num_layers: int, num_kv_heads: int) -> None:
    routes = make_routes(src, dst, num_layers, num_kv_heads)
    srcs = [src.for_rank(r) for r in range(src.world_size)]
    dsts = [dst.for_rank(r) for r in range(dst.world_size)]

    # What the decode side needs, computed from Mapping alone.
    required = {(d.rank, layer, head)
                for d in dsts for layer in d.pp_layers(num_layers) for head in d.kv_heads(num_kv_heads)}
    delivered = Counter((r.dst_rank, layer, head)
                        for r in routes for layer in r.layers for head in r.heads)
    assert set(delivered) == required
    dupes = [k for k, n in delivered.items() if n > 1]
    assert not dupes, f"delivered more than once: {dupes[:5]}"

    # Sorted, non-empty, maximal (one route per pair, equal to the intersection), leaders only.
    keys = [(r.src_rank, r.dst_rank) for r in routes]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for r in routes:
        s, d = srcs[r.src_rank], dsts[r.dst_rank]
        assert len(r.layers) > 0 and len(r.heads) > 0
        assert r.layers.step == 1 and r.heads.step == 1
        assert s.is_kv_replica_leader(num_kv_heads)
        s_layers, s_heads = set(s.pp_layers(num_layers)), set(s.kv_heads(num_kv_heads))
        d_layers, d_heads = set(d.pp_layers(num_layers)), set(d.kv_heads(num_kv_heads))
        assert set(r.layers) <= s_layers and set(r.heads) <= s_heads, "src does not hold the slice"
        assert set(r.layers) == s_layers & d_layers and set(r.heads) == s_heads & d_heads
    # Every pair that shares data has its route.
    for s, d in product(srcs, dsts):
        shares = (s.is_kv_replica_leader(num_kv_heads)
                  and set(s.pp_layers(num_layers)) & set(d.pp_layers(num_layers))
                  and set(s.kv_heads(num_kv_heads)) & set(d.kv_heads(num_kv_heads)))
        assert bool(shares) == ((s.rank, d.rank) in keys)
    # Every leader sends something; no non-leader sends anything.
    assert {r.src_rank for r in routes} == {s.rank for s in srcs if s.is_kv_replica_leader(num_kv_heads)}
    # The filters split the plan by rank without losing or reordering routes.
    assert [r for rank in range(src.world_size) for r in routes_from(routes, rank)] == routes
    for rank in range(dst.world_size):
        got = routes_to(routes, rank)
        assert got == [r for r in routes if r.dst_rank == rank]
        assert {(rank, l, h) for r in got for l in r.layers for h in r.heads} == \
            {k for k in required if k[0] == rank}


@pytest.mark.parametrize("tp_p, pp_p, tp_d, pp_d",
                         list(product([1, 2, 3, 4], [1, 2, 3], [1, 2, 4], [1, 2])))
def test_exhaustive_coverage(tp_p, pp_p, tp_d, pp_d):
    src, dst = group(tp_p, pp_p), group(tp_d, pp_d)
    checked = 0
    for num_layers, num_kv_heads in product([3, 6, 30], [1, 2, 3, 4, 8]):
        if not (fits(src, num_layers, num_kv_heads) and fits(dst, num_layers, num_kv_heads)):
            with pytest.raises(ValueError):
                make_routes(src, dst, num_layers, num_kv_heads)
            continue
        check_plan(src, dst, num_layers, num_kv_heads)
        checked += 1
    assert checked > 0  # every pair accepts some model here (1 KV head fits any tp)


def test_exhaustive_includes_replication_on_both_sides():
    # Guard against the skip rule hiding the interesting cases.
    assert fits(group(4, 1), 6, 2) and group(4, 1).kv_head_replicas(2) == 2
    assert fits(group(4, 2), 30, 1) and group(4, 2).kv_head_replicas(1) == 4
    check_plan(group(4, 1), group(4, 2), 30, 1)
    check_plan(group(2, 3), group(4, 2), 6, 2)


# --- bad layouts ---------------------------------------------------------------------------------


def test_layout_errors_name_the_side():
    with pytest.raises(ValueError, match=r"prefill group \(tp 3, pp 1\).*num_kv_heads \(2\)"):
        make_routes(group(3, 1), group(1, 1), num_layers=4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"decode group \(tp 1, pp 4\).*num_layers \(3\)"):
        make_routes(group(1, 1), group(1, 4), num_layers=3, num_kv_heads=2)


# --- filters -------------------------------------------------------------------------------------


def test_filters():
    routes = make_routes(group(1, 2), group(2, 1), num_layers=4, num_kv_heads=2)
    assert as_tuples(routes_from(routes, 1)) == [(1, 0, range(2, 4), range(0, 1)),
                                                 (1, 1, range(2, 4), range(1, 2))]
    assert as_tuples(routes_to(routes, 1)) == [(0, 1, range(0, 2), range(1, 2)),
                                               (1, 1, range(2, 4), range(1, 2))]
    assert routes_from(routes, 5) == [] and routes_to(routes, 5) == []


# --- connect-time check --------------------------------------------------------------------------


def test_check_compatible_accepts_equal():
    assert check_compatible(16, 16, (30, 3, 64), (30, 3, 64)) is None
    assert check_compatible(16, 16, [30, 3, 64], (30, 3, 64)) is None


def test_check_compatible_block_size():
    with pytest.raises(ValueError, match=r"^prefill block size 16 != decode block size 8: "):
        check_compatible(16, 8, (30, 3, 64), (30, 3, 64))


@pytest.mark.parametrize("dst_model, diff", [
    ((32, 3, 64), "num_layers 30 != 32"),
    ((30, 4, 64), "num_kv_heads 3 != 4"),
    ((30, 3, 128), "head_dim 64 != 128"),
])
def test_check_compatible_model_shape(dst_model, diff):
    with pytest.raises(ValueError) as e:
        check_compatible(16, 16, (30, 3, 64), dst_model)
    msg = str(e.value)
    assert msg.startswith("prefill model shape (num_layers=30, num_kv_heads=3, head_dim=64) != "
                          "decode model shape")
    assert diff in msg


def test_check_compatible_malformed_shape():
    with pytest.raises(ValueError, match="num_layers, num_kv_heads, head_dim"):
        check_compatible(16, 16, (30, 3), (30, 3, 64))


def test_check_layouts_refuses_other_kv_dtypes_and_scales():
    from splitserve.kvtransfer.messages import KVLayout
    from splitserve.kvtransfer.plan import check_layouts

    fp8 = KVLayout(16, 4, 2, 64, "float8_e4m3fn", "abc")
    check_layouts(fp8, fp8)
    with pytest.raises(ValueError, match="prefill KV cache dtype float8_e4m3fn != decode KV cache dtype bfloat16"):
        check_layouts(fp8, KVLayout(16, 4, 2, 64, "bfloat16"))
    with pytest.raises(ValueError, match="different scales.*abc != abd"):
        check_layouts(fp8, KVLayout(16, 4, 2, 64, "float8_e4m3fn", "abd"))
    with pytest.raises(ValueError, match="block size"):
        check_layouts(fp8, KVLayout(8, 4, 2, 64, "float8_e4m3fn", "abc"))
