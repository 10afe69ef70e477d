"""The MoE router in Triton (kernels/moe_route_triton.py) against `moe.route`, on CPU in Triton's
interpreter: the same experts in the same order, the same weights to float32 rounding,
renormalised or not. `route_triton` (softmax, top-k) for Qwen3-MoE's and Mixtral's shapes and a
ragged expert count; `router_triton` (the logits too, one launch) against `moe.route` of
``F.linear`` logits under both ways of finishing, and against the two-launch path it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import dispatch
from splitserve.kernels.moe import route

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (5, 128, 8), (3, 60, 4), (0, 8, 2)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_the_reference(num_tokens, num_experts, top_k, renormalize):
    from splitserve.kernels.moe_route_triton import route_triton

    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(num_experts + top_k))
    weights, ids = route_triton(logits, top_k, renormalize)
    want_w, want_ids = route(logits, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == (num_tokens, top_k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)
    if renormalize and num_tokens:
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens))


def test_bf16_logits_and_a_strided_view_are_routed_like_the_reference():
    from splitserve.kernels.moe_route_triton import route_triton

    full = torch.randn(4, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    logits = full[:, :32]  # rows of a wider buffer: a row stride that is not the row length
    weights, ids = route_triton(logits, 8, True)
    want_w, want_ids = route(logits, 8, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)


def test_a_tie_goes_to_the_lower_expert_and_a_bad_top_k_is_refused():
    from splitserve.kernels.moe_route_triton import route_triton

    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0]])
    weights, ids = route_triton(logits, 3, False)
    assert ids.tolist() == [[1, 3, 2]] and weights[0, 0] == weights[0, 1]
    with pytest.raises(ValueError, match="top_k"):
        route_triton(logits, 5, False)


def test_dispatch_takes_the_triton_router_when_asked(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    try:
        logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
        weights, ids = dispatch.route(logits, 2, True)
    finally:
        dispatch.kernel_mode.cache_clear()
    want_w, want_ids = route(logits, 2, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)


# ---- the whole router in one launch (router_triton) ----------------------------------------------


def _router_inputs(rows, experts, hidden, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, hidden, generator=g).to(dtype), (torch.randn(experts, hidden, generator=g) * 0.1).to(dtype)


def _config(split_k, finish="last_program", block_k=32):
    from splitserve.kernels.moe_route_triton import Finish, RouterConfig

    return RouterConfig(block_e=16, block_k=block_k, split_k=split_k, finish=Finish(finish))


@pytest.mark.parametrize("rows,experts,hidden,top_k", [(1, 8, 64, 2), (5, 128, 96, 8), (3, 60, 80, 4), (17, 40, 64, 3)])
@pytest.mark.parametrize("split_k,finish", [(1, "last_program"), (3, "last_program"), (3, "per_block")])
@pytest.mark.parametrize("renormalize", [True, False])
def test_one_launch_router_matches_the_reference_on_float32_logits(rows, experts, hidden, top_k, split_k, finish,
                                                                   renormalize):
    """Ragged expert counts (60, 40: a partial block of 16), H not a whole number of shares
    (80 over 3 shares of 32), more rows than a finisher's tile holds at 128 experts (17)."""
    from splitserve.kernels.moe_route_triton import router_triton

    x, w = _router_inputs(rows, experts, hidden, seed=rows + experts)
    weights, ids = router_triton(x, w, top_k, renormalize, _config(split_k, finish))
    want_w, want_ids = route(F.linear(x, w), top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == (rows, top_k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("finish", ["last_program", "per_block"])
def test_one_launch_router_rounds_bf16_logits_like_a_bf16_gemm(finish):
    from splitserve.kernels.moe_route_triton import router_triton

    x, w = _router_inputs(4, 48, 128, torch.bfloat16, seed=7)
    weights, ids = router_triton(x, w, 4, True, _config(4, finish))
    # A bf16 GEMM: float32 sums rounded once to bf16, then routed in float32. Rounded logits
    # tie now and then (row 3 here: experts 12 and 31); the kernel's lower id goes first.
    logits = F.linear(x.float(), w.float()).to(torch.bfloat16)
    want_w, _ = route(logits, 4, True)
    assert torch.equal(ids, _ids_lowest_first(logits, 4))
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)


def _ids_lowest_first(logits, top_k):
    """`moe.route`'s choice with ties broken as the kernels break them: the lower expert id."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k].to(torch.int32)


def test_both_finishes_give_the_same_bits_and_a_row_routes_alike_in_any_batch():
    """The finish moves the sums between programs, not their order; and a row's logits do not
    depend on the other rows, so neither does its routing."""
    from splitserve.kernels.moe_route_triton import router_triton

    x, w = _router_inputs(16, 64, 128, torch.bfloat16, seed=9)
    last = router_triton(x, w, 8, True, _config(4, "last_program"))
    spread = router_triton(x, w, 8, True, _config(4, "per_block"))
    assert torch.equal(last[0], spread[0]) and torch.equal(last[1], spread[1])
    for row in (0, 11):
        alone = router_triton(x[row:row + 1], w, 8, True, _config(4, "last_program"))
        assert torch.equal(alone[1][0], last[1][row]) and torch.equal(alone[0][0], last[0][row])


@pytest.mark.parametrize("finish", ["last_program", "per_block"])
def test_the_finisher_leaves_the_counts_at_zero_for_the_next_launch(monkeypatch, finish):
    """On CUDA the counts are one buffer per device, reused by every launch: a call must leave
    it as it found it, or the next launch's programs would miscount their arrival."""
    from splitserve.kernels import moe_route_triton

    counts = torch.zeros(moe_route_triton.COUNTERS, dtype=torch.int32)
    monkeypatch.setattr(moe_route_triton, "_counters", lambda device: counts)
    x, w = _router_inputs(3, 40, 64, seed=4)
    want = route(F.linear(x, w), 2, True)
    for _ in range(2):
        weights, ids = moe_route_triton.router_triton(x, w, 2, True, _config(2, finish))
        assert not counts.any()
        assert torch.equal(ids, want[1])
        torch.testing.assert_close(weights, want[0], rtol=1e-5, atol=1e-6)


def test_one_launch_router_matches_the_two_launch_path():
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_partials
    from splitserve.kernels.moe_route_triton import route_triton, router_triton

    x, w = _router_inputs(6, 32, 256, torch.bfloat16, seed=13)
    got = router_triton(x, w, 4, True, _config(4, block_k=64))
    two = route_triton(skinny_partials(x, w, SkinnyConfig(block_n=16, block_k=64, split_k=4)), 4, True,
                       logits_dtype=torch.bfloat16)
    assert torch.equal(got[1], two[1])
    torch.testing.assert_close(got[0], two[0], rtol=1e-6, atol=1e-7)


def test_the_default_launch_shape_reads_w_with_many_programs_whatever_the_rows():
    from splitserve.kernels.moe_route_triton import Finish, router_config

    one, sixteen, many = (router_config(128, 2048, rows, 132) for rows in (1, 16, 64))
    # Qwen3-30B-A3B on an H200: 8 expert blocks x 8 shares of 256 columns = 64 programs.
    assert (one.block_e, one.split_k) == (16, 8) and one.finish is Finish.LAST_PROGRAM
    assert (sixteen.split_k, many.split_k) == (8, 8)  # the same sums at any batch size
    assert sixteen.finish is Finish.PER_BLOCK and many.finish is Finish.PER_BLOCK
    assert router_config(8, 4096, 1, 132).split_k == 16  # Mixtral: 1 block, 16 shares of 256 columns
    assert router_config(128, 256, 64, 132).finish is Finish.LAST_PROGRAM  # one share: nothing to spread


def test_one_launch_router_refuses_what_it_cannot_do():
    from splitserve.kernels.moe_route_triton import MAX_ROWS, RouterConfig, router_triton

    x, w = _router_inputs(2, 8, 32)
    with pytest.raises(ValueError, match="at most"):
        router_triton(torch.zeros(MAX_ROWS + 1, 32), w, 2, True)
    with pytest.raises(ValueError, match="disagree"):
        router_triton(x.to(torch.bfloat16), w, 2, True)
    with pytest.raises(ValueError, match="top_k"):
        router_triton(x, w, 9, True)
    with pytest.raises(ValueError, match="block_e"):
        RouterConfig(block_e=8)
    weights, ids = router_triton(x[:0], w, 2, True)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize("path", ["fused", "skinny_then_route"])
def test_dispatch_takes_the_chosen_router_path_for_few_rows_and_cublas_above(monkeypatch, path):
    from splitserve.kernels import linear_triton, moe_route_triton

    calls = []
    for module, name in ((moe_route_triton, "router_triton"), (linear_triton, "skinny_partials")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real, **kw: calls.append((_n, a[0].shape[0]))
                            or _f(*a, **kw))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    try:
        x, w = _router_inputs(17, 16, 64, seed=2)
        got = [dispatch.router(x[:rows], w, 2, False, dispatch.RouterPath(path)) for rows in (2, 17)]
    finally:
        dispatch.kernel_mode.cache_clear()
    assert calls == [("router_triton" if path == "fused" else "skinny_partials", 2)]
    for rows, (weights, ids) in zip((2, 17), got):
        want_w, want_ids = route(F.linear(x[:rows], w), 2, False)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-6)
