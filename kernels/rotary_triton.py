"""Rotary position embedding in Triton: the CUDA path beside `rotary.py`.

Same call as `apply_rotary_ref`: q [T, Hq, D] and k [T, Hk, D] rotated by per-token cos/sin
[T, D] (rows of the float32 tables `rope_cos_sin` builds, default or Llama 3 scaling alike:
the kernel only reads the tables), "rotate half" convention, new output tensors. One program
per token rotates all its q and k heads. The arithmetic rounds where the reference does
(cos/sin cast to the input dtype, each product and the sum rounded to it), so bf16 output
matches it except where the GPU fuses a multiply-add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_xt, stride_xh, stride_ot, stride_oh, token, c1, c2, s1, s2,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HALF)
    x_row = x_ptr + token * stride_xt + heads[:, None] * stride_xh + dims[None, :]
    o_row = o_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    # out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), rounded as in torch.
    a1 = (x1.to(tl.float32) * c1[None, :]).to(dtype).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s1[None, :]).to(dtype).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2[None, :]).to(dtype).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2[None, :]).to(dtype).to(tl.float32)
    tl.store(o_row, (a1 + b1).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF, (a2 + b2).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_oqt, stride_oqh, stride_okt, stride_okh,
    stride_cos, stride_sin,
    NUM_Q: tl.constexpr, NUM_K: tl.constexpr, Q_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    ok = dims < HALF
    dtype = q_out_ptr.dtype.element_ty
    # The reference casts the float32 tables to the input dtype first.
    c1 = tl.load(cos_ptr + token * stride_cos + dims, mask=ok, other=0.0).to(dtype).to(tl.float32)
    c2 = tl.load(cos_ptr + token * stride_cos + HALF + dims, mask=ok, other=0.0).to(dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + token * stride_sin + dims, mask=ok, other=0.0).to(dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + token * stride_sin + HALF + dims, mask=ok, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_oqt, stride_oqh, token, c1, c2, s1, s2,
                  NUM_Q, Q_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr, k_out_ptr, stride_kt, stride_kh, stride_okt, stride_okh, token, c1, c2, s1, s2,
                  NUM_K, K_PAD, HALF, HALF_PAD)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by per-token cos/sin [T, D], as `apply_rotary_ref`."""
    tokens, num_q, head_dim = q.shape
    num_k = k.shape[1]
    if head_dim % 2 or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise ValueError(f"q {q.dtype} {tuple(q.shape)} and k {k.dtype} {tuple(k.shape)}: need one even head_dim and dtype")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)
    if tokens:
        half = head_dim // 2
        _rotary_kernel[(tokens,)](
            q, k, q_out, k_out, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos.stride(0), sin.stride(0),
            NUM_Q=num_q, NUM_K=num_k, Q_PAD=triton.next_power_of_2(num_q), K_PAD=triton.next_power_of_2(num_k),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), num_warps=4,
        )
    return q_out, k_out
