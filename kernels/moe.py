"""Mixture-of-experts routing and expert computation, plain torch: the CPU path and the oracle
for the Triton kernel (`moe_triton`; `dispatch.fused_moe` picks).

Per MoE layer and step: the router's logits [T, E] go through `route` (softmax over every
expert in float32, top-k, optionally renormalised over the chosen k), then `fused_moe_ref`
runs each token through its k experts' gated MLPs and sums the outputs, weighted.

The arithmetic follows transformers' MoE blocks (Qwen3-MoE, Mixtral): each (token, choice)
pair's expert output is scaled by its weight, then the k of them are summed in choice order,
so float32 runs are bit-comparable with Hugging Face's. Expert weights are stored as
``w13`` [E_local, 2I, H] (gate rows [0, I), up rows [I, 2I)) and ``w2`` [E_local, H, I].
A rank may hold a slice of every expert (tensor parallel: I is its slice, the caller sums
the ranks' outputs) or whole experts ``expert_offset ..`` (expert parallel: choices of other
ranks' experts contribute nothing here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int32), highest first
    (ties in `torch.topk`'s order)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, expert_offset: int = 0) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j] -
    expert_offset, over the choices whose e is in [0, E_local); x [T, H] -> [T, H] in x's dtype,
    accumulated in float32. The matmuls run in x's dtype, one batch of tokens per expert."""
    num_tokens, hidden = x.shape
    num_local, inter = w13.shape[0], w2.shape[2]
    local = ids.long() - expert_offset
    # (token, choice) pairs that this rank computes, grouped by expert.
    tok, choice = ((local >= 0) & (local < num_local)).nonzero(as_tuple=True)
    expert = local[tok, choice]
    # One row per (token, choice): zero for the choices computed elsewhere, so the sum over the
    # choices below runs in the same order whatever this rank holds.
    contrib = torch.zeros(num_tokens, ids.shape[1], hidden, dtype=torch.float32, device=x.device)
    for e in expert.unique().tolist():
        rows = expert == e
        t, j = tok[rows], choice[rows]
        gate_up = F.linear(x[t], w13[e])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        contrib[t, j] = F.linear(act, w2[e]).float() * weights[t, j].unsqueeze(-1)
    return contrib.sum(dim=1).to(x.dtype)
