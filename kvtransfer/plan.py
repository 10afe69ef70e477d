"""Transfer plan: which prefill rank sends which slice of the KV cache to which decode rank.

The prefill group and the decode group may use different (tp, pp) layouts. Each rank of either
side holds the KV cache of its `Mapping.pp_layers` (a contiguous block of layers) times its
`Mapping.kv_heads` (a contiguous block of KV heads). `make_routes` translates one layout into the
other: for every pair (prefill rank s, decode rank d) the slice that s sends to d is

    layers(s) ∩ layers(d)   x   heads(s) ∩ heads(d)

Both factors are intersections of contiguous ranges, hence contiguous, so one pair needs at most
one `KVRoute` (a maximal rectangle); pairs whose intersection is empty get none. Because the
prefill stages partition the layers and the prefill replica leaders partition the KV heads, every
(layer, head) a decode rank holds comes from exactly one prefill rank. Routes are sorted by
(src_rank, dst_rank). The plan depends only on the two groups' sizes and the model shape, so the
driver, every prefill rank and every decode rank compute the same plan without negotiating.

Worked examples (asserted in tests/kvtransfer/test_plan.py; L = layers, H = KV heads)::

    4 layers, 2 KV heads, prefill tp 2 -> decode tp 1
        prefill rank 0 holds L0-3 x H0, rank 1 holds L0-3 x H1; decode rank 0 holds L0-3 x H0-1
        routes  0 -> 0  L0-3 H0
                1 -> 0  L0-3 H1

    4 layers, 2 KV heads, prefill pp 2 -> decode tp 2
        prefill rank 0 holds L0-1 x H0-1, rank 1 holds L2-3 x H0-1
        decode rank 0 holds L0-3 x H0, rank 1 holds L0-3 x H1
        routes  0 -> 0  L0-1 H0
                0 -> 1  L0-1 H1
                1 -> 0  L2-3 H0
                1 -> 1  L2-3 H1

    4 layers, 2 KV heads, prefill tp 4 -> decode tp 1  (prefill replicates each KV head twice)
        prefill ranks 0, 1 hold H0 and ranks 2, 3 hold H1; the leaders are ranks 0 and 2
        routes  0 -> 0  L0-3 H0
                2 -> 0  L0-3 H1          (ranks 1 and 3 send nothing)

    4 layers, 1 KV head, prefill tp 1 -> decode tp 2  (decode replicates the KV head)
        both decode ranks hold L0-3 x H0 and each needs its own copy
        routes  0 -> 0  L0-3 H0
                0 -> 1  L0-3 H0

Why replicated heads are sent once: when a side has fewer KV heads than tp ranks, each KV head is
computed identically on `kv_head_replicas` consecutive tp ranks (same weights, same tokens), so
the copies are byte-for-byte the same. Sending every copy would multiply the traffic by the
replica count and make a decode rank receive the same slice several times (double writes into its
blocks, several acknowledgements to count). Only the replica leader (`is_kv_replica_leader`, the
first tp rank of the replicas) sends; the other replicas send nothing. Replication on the decode
side is the opposite case: each decode replica stores its own copy in its own memory, so each one
gets its own route (from the same prefill leader).

`check_compatible` is the connect-time check: both groups must use the same KV block size (blocks
are copied block for block) and serve the same model shape (num_layers, num_kv_heads, head_dim).
`check_layouts` does it on two `KVLayout`s and also compares the KV cache dtype and, for FP8
caches, the scales' fingerprint: bytes written with one dtype or scale and read with another
would be silently wrong, so such groups refuse to connect.
"""

from __future__ import annotations

from splitserve.kvtransfer.messages import KVLayout, KVRoute, Side
from splitserve.mapping import Mapping

__all__ = ["make_routes", "routes_from", "routes_to", "check_compatible", "check_layouts"]


def make_routes(src: Mapping, dst: Mapping, num_layers: int, num_kv_heads: int) -> list[KVRoute]:
    """Every slice each prefill rank sends to each decode rank, sorted by (src_rank, dst_rank).

    `src` and `dst` are any rank's `Mapping` of the prefill and decode group (only the sizes
    matter). Each decode rank receives each (layer, KV head) it holds exactly once, from the
    prefill rank that holds it and leads its replicas. Raises ValueError, naming the side, when
    either layout cannot hold the model (num_layers < pp_size, KV heads not divisible over tp).
    """
    src_slices = [(m.rank, layers, heads)
                  for m, layers, heads in _slices(src, num_layers, num_kv_heads, Side.PREFILL)
                  if m.is_kv_replica_leader(num_kv_heads)]
    dst_slices = [(m.rank, layers, heads)
                  for m, layers, heads in _slices(dst, num_layers, num_kv_heads, Side.DECODE)]
    routes = []
    for s_rank, s_layers, s_heads in src_slices:
        for d_rank, d_layers, d_heads in dst_slices:
            layers = _intersect(s_layers, d_layers)
            heads = _intersect(s_heads, d_heads)
            if layers and heads:
                routes.append(KVRoute(s_rank, d_rank, layers, heads))
    return routes


def routes_from(routes: list[KVRoute], rank: int) -> list[KVRoute]:
    """The routes that prefill rank `rank` sends, in plan order."""
    return [r for r in routes if r.src_rank == rank]


def routes_to(routes: list[KVRoute], rank: int) -> list[KVRoute]:
    """The routes that decode rank `rank` receives, in plan order."""
    return [r for r in routes if r.dst_rank == rank]


_MODEL_FIELDS = ("num_layers", "num_kv_heads", "head_dim")


def check_compatible(src_block_size: int, dst_block_size: int,
                     src_model: tuple, dst_model: tuple) -> None:
    """Connect-time check between a prefill and a decode group; raises ValueError on mismatch.

    `src_model` / `dst_model` are (num_layers, num_kv_heads, head_dim) of each side's model.
    """
    for side, model in ((Side.PREFILL, src_model), (Side.DECODE, dst_model)):
        if len(tuple(model)) != len(_MODEL_FIELDS):
            raise ValueError(f"{side} model shape must be (num_layers, num_kv_heads, head_dim), "
                             f"got {model!r}")
    if src_block_size != dst_block_size:
        raise ValueError(f"prefill block size {src_block_size} != decode block size "
                         f"{dst_block_size}: KV blocks are copied block for block, so both "
                         f"groups must use the same block size")
    src_model, dst_model = tuple(src_model), tuple(dst_model)
    if src_model != dst_model:
        diffs = ", ".join(f"{name} {a} != {b}"
                          for name, a, b in zip(_MODEL_FIELDS, src_model, dst_model) if a != b)
        raise ValueError(f"prefill model shape {_fmt(src_model)} != decode model shape "
                         f"{_fmt(dst_model)} ({diffs}): both groups must serve the same model")


def check_layouts(prefill: KVLayout, decode: KVLayout) -> None:
    """`check_compatible`, then the KV cache dtype and the FP8 scales; ValueError naming both
    sides' values on the first mismatch."""
    check_compatible(prefill.block_size, decode.block_size,
                     (prefill.num_layers, prefill.num_kv_heads, prefill.head_dim),
                     (decode.num_layers, decode.num_kv_heads, decode.head_dim))
    if prefill.kv_dtype != decode.kv_dtype:
        raise ValueError(f"prefill KV cache dtype {prefill.kv_dtype} != decode KV cache dtype {decode.kv_dtype}: "
                         "KV blocks are moved as bytes, so both groups must use the same kv_cache_dtype")
    if prefill.scales_fingerprint != decode.scales_fingerprint:
        raise ValueError(f"prefill and decode {prefill.kv_dtype} KV caches use different scales (fingerprints "
                         f"{prefill.scales_fingerprint} != {decode.scales_fingerprint}): FP8 blocks written with "
                         "one scale would be read with another; load both groups from the same checkpoint "
                         "(and the same tp/pp layout when the scales are calibrated)")


def _slices(mapping: Mapping, num_layers: int, num_kv_heads: int, side: Side):
    """(rank's Mapping, its layers, its KV heads) for every rank of the group."""
    out = []
    for rank in range(mapping.world_size):
        m = mapping.for_rank(rank)
        try:
            out.append((m, m.pp_layers(num_layers), m.kv_heads(num_kv_heads)))
        except ValueError as e:
            raise ValueError(f"{side} group (tp {m.tp_size}, pp {m.pp_size}) cannot hold "
                             f"{num_layers} layers x {num_kv_heads} KV heads: {e}") from e
    return out


def _intersect(a: range, b: range) -> range:
    """Intersection of two step-1 ranges (empty range when they do not overlap)."""
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return range(start, max(start, stop))


def _fmt(model: tuple) -> str:
    return "(" + ", ".join(f"{n}={v}" for n, v in zip(_MODEL_FIELDS, model)) + ")"
