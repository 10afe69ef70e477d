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

The weights travel as one `ExpertWeights`: float (the model's dtype), or e4m3 with float32
scales (FP8 checkpoints, or ``quantization="fp8"``). Here (the CPU path and the decode-size
oracle) FP8 experts are weight-only: activations stay in the model's dtype and the reference
dequantizes the routed experts to float32. The GPU kernel is weight-only at decode sizes and
W8A8 at prefill sizes (`moe_triton.W8A8_MIN_PAIRS`), whose oracle is ``quantize_activations``. Scale layouts, by
`Fp8Scheme` (a per-tensor checkpoint scale is loaded as CHANNEL, one per row):

- CHANNEL: ``w13_scale`` [E, 2I] (gate rows, then up rows), ``w2_scale`` [E, H].
- BLOCK (bn, bk): ``w13_scale`` [E, 2 ceil(I / bn), ceil(H / bk)]: gate's block rows, then
  up's (each part's blocks start at its own row 0, so an I that is not a multiple of bn leaves
  a partial block at the end of each part, never one shared by both); ``w2_scale``
  [E, ceil(H / bn), ceil(I / bk)].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.kernels.fp8 import (
    BLOCK, FP8_DTYPE, Fp8Scheme, Fp8Weight, dequantize, dequantize_per_token_group, quantize, quantize_per_token,
    quantize_per_token_group,
)


@dataclass(frozen=True)
class ExpertWeights:
    """A rank's experts: ``w13`` [E_local, 2I, H] (gate | up), ``w2`` [E_local, H, I], float or
    e4m3 with scales (module docstring)."""

    w13: torch.Tensor
    w2: torch.Tensor
    #: None: float weights. Otherwise CHANNEL or BLOCK (shapes in the module docstring).
    scheme: Fp8Scheme | None = None
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    #: (rows, cols) of one BLOCK scale.
    block: tuple[int, int] = (BLOCK, BLOCK)

    def __post_init__(self) -> None:
        e, two_inter, hidden = self.w13.shape
        inter = two_inter // 2
        if two_inter % 2 or tuple(self.w2.shape) != (e, hidden, inter):
            raise ValueError(f"experts: w13 {tuple(self.w13.shape)} and w2 {tuple(self.w2.shape)} disagree")
        if self.scheme is None:
            if self.w13_scale is not None or self.w2_scale is not None or FP8_DTYPE in (self.w13.dtype, self.w2.dtype):
                raise ValueError("experts: scales (or e4m3 weights) without an FP8 scheme")
            if self.w13.dtype != self.w2.dtype:
                raise ValueError(f"experts: w13 {self.w13.dtype} and w2 {self.w2.dtype} differ")
            return
        if self.scheme is Fp8Scheme.TENSOR:
            raise ValueError("experts hold per-tensor scales as CHANNEL (one per row)")
        if self.w13.dtype != FP8_DTYPE or self.w2.dtype != FP8_DTYPE:
            raise ValueError(f"FP8 experts must be e4m3, got {self.w13.dtype} / {self.w2.dtype}")
        want13, want2 = scale_shapes(self.scheme, self.block, e, inter, hidden)
        for name, scale, want in (("w13_scale", self.w13_scale, want13), ("w2_scale", self.w2_scale, want2)):
            if scale is None or tuple(scale.shape) != want or scale.dtype != torch.float32:
                got = None if scale is None else (tuple(scale.shape), scale.dtype)
                raise ValueError(f"FP8 experts ({self.scheme.value}): {name} must be float32 {want}, got {got}")

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    @property
    def num_local(self) -> int:
        return self.w13.shape[0]

    @property
    def intermediate(self) -> int:
        return self.w2.shape[2]

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Local expert ``e``'s (w13 [2I, H], w2 [H, I]) as ``dtype``, dequantized if FP8."""
        if self.scheme is None:
            return self.w13[e].to(dtype), self.w2[e].to(dtype)
        inter = self.intermediate
        s13, s2 = self.w13_scale[e], self.w2_scale[e]
        if self.scheme is Fp8Scheme.CHANNEL:  # [2I] / [H] -> an Fp8Weight's [N, 1]
            s13, s2 = s13.unsqueeze(1), s2.unsqueeze(1)
        half = s13.shape[0] // 2  # gate's rows of scales (or block rows), then up's
        gate, up, down = (dequantize(Fp8Weight(w, s, self.scheme, self.block), dtype) for w, s in (
            (self.w13[e, :inter], s13[:half]), (self.w13[e, inter:], s13[half:]), (self.w2[e], s2)))
        return torch.cat([gate, up]), down


@dataclass(frozen=True)
class ExpertSlots:
    """A fused MoE call's output before its k slots of each token are summed: ``slots``
    [T * k, H] (pair ``t * k + j``: choice j of token t, already scaled by its routing weight),
    ``ids`` [T, k] int32, and the local experts ``[expert_offset, expert_offset + num_local)``
    (slots of other experts are never written, never read). The next residual add + RMSNorm
    sums them in its own launch (`dispatch.add_rms_norm`), saving the combine launch at decode;
    anything else takes `dispatch.combined` first."""

    slots: torch.Tensor
    ids: torch.Tensor
    expert_offset: int
    num_local: int

    @property
    def shape(self) -> torch.Size:
        """The summed output's shape [T, H]."""
        return torch.Size((self.ids.shape[0], self.slots.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.slots.dtype


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, scheme: Fp8Scheme,
                     block: tuple[int, int] = (BLOCK, BLOCK)) -> ExpertWeights:
    """Float experts as FP8 ones (amax scales, round to nearest; gate and up quantized as the
    two tensors they are in a checkpoint): for benchmarks and tests. The loader quantizes
    expert by expert (workers/models/quant.py), with the same `quantize`."""
    inter = w2.shape[2]
    q13, s13, q2, s2 = [], [], [], []
    for e in range(w13.shape[0]):
        gate, up = quantize(w13[e, :inter], scheme, block), quantize(w13[e, inter:], scheme, block)
        down = quantize(w2[e], scheme, block)
        q13.append(torch.cat([gate.data, up.data]))
        s13.append(torch.cat([gate.scale, up.scale]).reshape(-1) if scheme is Fp8Scheme.CHANNEL
                   else torch.cat([gate.scale, up.scale]))
        q2.append(down.data)
        s2.append(down.scale.reshape(-1) if scheme is Fp8Scheme.CHANNEL else down.scale)
    return ExpertWeights(torch.stack(q13), torch.stack(q2), scheme, torch.stack(s13), torch.stack(s2), block)


def scale_shapes(scheme: Fp8Scheme, block: tuple[int, int], experts: int, inter: int,
                 hidden: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(w13_scale, w2_scale) shapes of FP8 experts under ``scheme`` (CHANNEL or BLOCK)."""
    if scheme is Fp8Scheme.BLOCK:
        bn, bk = block
        return (experts, 2 * _cdiv(inter, bn), _cdiv(hidden, bk)), (experts, _cdiv(hidden, bn), _cdiv(inter, bk))
    return (experts, 2 * inter), (experts, hidden)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int32), highest first
    (ties in `torch.topk`'s order)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_moe_ref(x: torch.Tensor, experts: ExpertWeights, weights: torch.Tensor, ids: torch.Tensor,
                  expert_offset: int = 0, quantize_activations: bool = False) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j] -
    expert_offset, over the choices whose e is in [0, E_local); x [T, H] -> [T, H] in x's dtype,
    accumulated in float32. The matmuls run in x's dtype, one batch of tokens per expert; with
    FP8 experts in float32 on the dequantized weights, the activation rounded to x's dtype
    between them (where the kernel rounds it). ``quantize_activations`` (FP8 experts): the
    GPU's W8A8 path, both matmuls' inputs quantized and dequantized first, per token (per token
    and K group of the weights' block width for block scales)."""
    if quantize_activations and not experts.quantized:
        raise ValueError("fused_moe_ref: activations are quantized only with FP8 experts")
    fake_quant = _fake_quant(experts) if quantize_activations else (lambda a: a)
    num_tokens, hidden = x.shape
    num_local, inter = experts.num_local, experts.intermediate
    compute = torch.float32 if experts.quantized else x.dtype
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
        w13, w2 = experts.expert(e, compute)
        gate_up = F.linear(fake_quant(x[t].to(compute)), w13)
        act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x.dtype).to(compute)
        contrib[t, j] = F.linear(fake_quant(act), w2).float() * weights[t, j].unsqueeze(-1)
    return contrib.sum(dim=1).to(x.dtype)


def _fake_quant(experts: ExpertWeights):
    """a [M, K] float32 -> its e4m3 values times their scales, as the W8A8 kernels see it."""
    if experts.scheme is Fp8Scheme.BLOCK:
        group = experts.block[1]
        return lambda a: dequantize_per_token_group(*quantize_per_token_group(a, group), group)

    def per_token(a: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_per_token(a)
        return q.float() * scale

    return per_token
