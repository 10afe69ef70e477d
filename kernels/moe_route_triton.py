"""The MoE router's softmax, top-k and renormalisation in one Triton launch (`moe.route`'s GPU twin).

In torch the router is five or more kernels a layer (softmax, a sorting top-k, the sum and the
division of the renormalisation, the int32 cast): on an H200 they took ~9 µs of a Qwen3-30B-A3B
layer's batch-1 decode step, more than a third of what its experts' GEMMs take
(benchmarks/results/decode_profile_h200_2026-12-02-qwen3-30b-a3b.json). Here one program per
token loads its row of router logits, takes the softmax in float32, picks the k largest by
k rounds of max-and-mask (k is small: 2 to 8; the lowest expert id wins a tie), renormalises
over them if asked, and writes the weights (float32) and expert ids (int32), highest first,
as `moe.route` does. The logits may come as float32 partial sums over shares of the hidden
dimension (the router's skinny GEMM, `linear_triton.skinny_partials`): the program adds them
as it loads its row, which saves the reduction's launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_row, stride_split,
                  SPLITS: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                  RENORMALIZE: tl.constexpr, ROUND: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    x = tl.load(logits_ptr + row * stride_row + offs, mask=valid, other=-float("inf")).to(tl.float32)
    for s in tl.static_range(1, SPLITS):  # partial sums of the logits: added in a fixed order
        x += tl.load(logits_ptr + s * stride_split + row * stride_row + offs, mask=valid, other=0.0)
    # Summed float32 partials rounded to the model's dtype first (1 bf16, 2 float16), as a GEMM
    # in that dtype writes its logits: the same routing whichever path computed them.
    if ROUND == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(valid, e / tl.sum(e, axis=0), -2.0)  # padding lanes never win a round
    slots = tl.arange(0, K_PAD)
    weights = tl.zeros([K_PAD], dtype=tl.float32)
    ids = tl.zeros([K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, offs, BLOCK_E), axis=0)
        weights = tl.where(slots == j, best, weights)
        ids = tl.where(slots == j, idx, ids)
        p = tl.where(offs == idx, -2.0, p)
    if RENORMALIZE:
        weights = weights / tl.sum(tl.where(slots < TOP_K, weights, 0.0), axis=0)
    out = row * TOP_K + slots
    tl.store(weights_ptr + out, weights, mask=slots < TOP_K)
    tl.store(ids_ptr + out, ids, mask=slots < TOP_K)


_ROUND = {torch.bfloat16: 1, torch.float16: 2}


def route_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 logits_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, E], or float32 partial sums of them [S, T, E] (`linear_triton.skinny_partials`)
    -> (weights [T, k] float32, expert ids [T, k] int32), highest first. ``logits_dtype``: round
    the summed logits to it first (bf16 / float16; others: no rounding)."""
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    splits, num_tokens, num_experts = logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens:
        _route_kernel[(num_tokens,)](logits, weights, ids, num_experts, logits.stride(1), logits.stride(0),
                                     SPLITS=splits, ROUND=_ROUND.get(logits_dtype, 0), TOP_K=top_k,
                                     K_PAD=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(num_experts),
                                     RENORMALIZE=renormalize)
    return weights, ids
