"""benchmarks/router_bench.py on CPU: the launch shapes it sweeps are valid and include the
default's (the timing itself needs a GPU)."""

from __future__ import annotations

import pytest

from bench_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton")
    return load_benchmark("router_bench")


def test_variants_hold_the_default_and_both_finishes(bench):
    from splitserve.kernels.moe_route_triton import Finish, router_config

    one = bench.variants(bench.EXPERTS, bench.HIDDEN, 1, 132)
    assert one["default"] == router_config(bench.EXPERTS, bench.HIDDEN, 1, 132)
    assert {cfg.finish for cfg in one.values()} == {Finish.LAST_PROGRAM, Finish.PER_BLOCK}
    assert len(one) > 10 and len(set(one.values())) == len(one)  # the one-row sweep, no repeats
    assert all(bench.HIDDEN // cfg.split_k >= cfg.block_k for cfg in one.values())
    assert len(bench.variants(bench.EXPERTS, bench.HIDDEN, 64, 132)) == 2  # default and the other finish
