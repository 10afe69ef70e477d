"""RMSNorm, plain torch: the CPU path and the oracle for the Triton kernels (issue 8).

The arithmetic follows the Llama reference exactly (normalise in float32, scale in the
input dtype) so that float32 runs are bit-comparable with Hugging Face transformers.

Qwen3 also normalises each attention head of q and k before RoPE (`QKNorm`: one head_dim
weight per side, shared by the heads). Its lifecycle is one call per layer and step, inside
`dispatch.apply_rotary_and_write_kv`: `qk_norm_ref` here on CPU, folded into the rotary and
KV-write launch on CUDA (kernels/rotary_triton.py), so it costs no launch of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(variance + eps)
    return weight * xf.to(dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


@dataclass(frozen=True)
class QKNorm:
    """Per-head RMSNorm of q and k (Qwen3's ``q_norm``/``k_norm``): weights [head_dim] in the
    model's dtype, applied to every head before RoPE."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float


def qk_norm_ref(q: torch.Tensor, k: torch.Tensor, norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] and k [T, Hk, D], each head normalised over its D by `rms_norm_ref`."""
    return rms_norm_ref(q, norm.q_weight, norm.eps), rms_norm_ref(k, norm.k_weight, norm.eps)
