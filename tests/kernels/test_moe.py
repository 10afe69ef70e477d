"""The MoE torch reference (`route`, `fused_moe_ref`) against a naive per-token loop and
transformers' routing; slices of the experts (tp) and subsets of them (expert parallel) sum
to the whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import dispatch
from splitserve.kernels.moe import ExpertWeights, fused_moe_ref, route

T, H, I, E, K = 7, 16, 8, 6, 2


def _weights(seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) * 0.3).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) * 0.3).to(dtype)
    logits = torch.randn(T, E, generator=gen)
    return x, w13, w2, logits


def _naive(x, w13, w2, weights, ids, expert_offset=0):
    """One token and one choice at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - expert_offset
            if not 0 <= e < w13.shape[0]:
                continue
            xt, g, u, d = x[t].double(), w13[e, :I].double(), w13[e, I:].double(), w2[e].double()
            out[t] += float(weights[t, j]) * (d @ (F.silu(g @ xt) * (u @ xt)))
    return out


@pytest.mark.parametrize("renormalize", [False, True])
def test_route_is_softmax_top_k_in_float32(renormalize):
    logits = torch.randn(5, E, dtype=torch.bfloat16)
    weights, ids = route(logits, 3, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and weights.shape == ids.shape == (5, 3)
    probs = torch.softmax(logits.float(), dim=-1)
    expected, expected_ids = probs.topk(3, dim=-1)
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    assert torch.equal(ids, expected_ids.int()) and torch.equal(weights, expected)
    assert (weights[:, :-1] >= weights[:, 1:]).all()  # highest first


def test_route_matches_transformers_routers():
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    x = torch.randn(9, H)
    for router, renorm in [
        (Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                           norm_topk_prob=False)), False),
        (Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                           norm_topk_prob=True)), True),
        (MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=K)), True),
    ]:
        torch.nn.init.normal_(router.weight)
        logits, hf_weights, hf_ids = router(x)
        weights, ids = route(logits, K, renorm)
        assert torch.equal(ids, hf_ids.int()) and torch.equal(weights, hf_weights.float())


def test_fused_moe_ref_matches_a_per_token_loop():
    x, w13, w2, logits = _weights()
    weights, ids = route(logits, K, True)
    out = fused_moe_ref(x, ExpertWeights(w13, w2), weights, ids)
    assert out.dtype == x.dtype and out.shape == (T, H)
    torch.testing.assert_close(out.double(), _naive(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-6)


def test_expert_parallel_subsets_skip_other_experts_and_sum_to_the_whole():
    x, w13, w2, logits = _weights(1)
    weights, ids = route(logits, K, False)
    whole = fused_moe_ref(x, ExpertWeights(w13, w2), weights, ids)
    parts = []
    for start in (0, 2, 4):  # three ranks of two experts each
        part = fused_moe_ref(x, ExpertWeights(w13[start:start + 2], w2[start:start + 2]), weights, ids, expert_offset=start)
        torch.testing.assert_close(part.double(), _naive(x, w13[start:start + 2], w2[start:start + 2],
                                                         weights, ids, start), rtol=1e-5, atol=1e-6)
        parts.append(part)
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-6)
    # A rank none of whose experts were chosen adds exactly nothing.
    unused = fused_moe_ref(x, ExpertWeights(w13[:2], w2[:2]), weights, ids, expert_offset=E)
    assert torch.equal(unused, torch.zeros_like(x))


def test_tensor_parallel_slices_of_every_expert_sum_to_the_whole():
    x, w13, w2, logits = _weights(2)
    weights, ids = route(logits, K, True)
    whole = fused_moe_ref(x, ExpertWeights(w13, w2), weights, ids)
    half = I // 2
    parts = [fused_moe_ref(x, ExpertWeights(torch.cat([w13[:, c:c + half], w13[:, I + c:I + c + half]], dim=1), w2[:, :, c:c + half]), weights, ids) for c in (0, half)]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-6)


def test_empty_batch_and_low_precision_dtype():
    x, w13, w2, logits = _weights(3, torch.bfloat16)
    weights, ids = route(logits, K, True)
    assert fused_moe_ref(x[:0], ExpertWeights(w13, w2), weights[:0], ids[:0]).shape == (0, H)
    out = fused_moe_ref(x, ExpertWeights(w13, w2), weights, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _naive(x, w13, w2, weights, ids), rtol=2e-2, atol=2e-2)


def test_dispatch_runs_the_reference_on_cpu():
    x, w13, w2, logits = _weights(4)
    weights, ids = route(logits, K, False)
    assert torch.equal(dispatch.fused_moe(x, ExpertWeights(w13[3:], w2[3:]), weights, ids, 3),
                       fused_moe_ref(x, ExpertWeights(w13[3:], w2[3:]), weights, ids, 3))
