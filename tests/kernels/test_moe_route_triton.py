"""The MoE router in one Triton launch (kernels/moe_route_triton.py) against `moe.route`, on CPU
in Triton's interpreter: the same experts in the same order, the same weights to float32
rounding, renormalised or not, for Qwen3-MoE's and Mixtral's shapes and a ragged expert count."""

from __future__ import annotations

import pytest
import torch

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
