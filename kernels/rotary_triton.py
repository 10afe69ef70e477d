"""Rotary position embedding in Triton: the CUDA path beside `rotary.py`.

Same call as `apply_rotary_ref`: q [T, Hq, D] and k [T, Hk, D] rotated by per-token cos/sin
[T, D] (rows of the float32 tables `rope_cos_sin` builds, default or Llama 3 scaling alike:
the kernel only reads the tables), "rotate half" convention, new output tensors. One program
per token rotates all its q and k heads; `apply_rotary_and_write_kv` also stores the rotated k
and v at the token's cache slot (the decode step's K/V write, in the same launch). The arithmetic rounds where the reference does
(cos/sin cast to the input dtype, each product and the sum rounded to it), so bf16 output
matches it except where the GPU fuses a multiply-add. An FP8 cache (``QUANT``) gets what
`write_kv_ref` stores: the rotated k (rounded to the input dtype first) and v, divided by their
KV head's float32 scale, clamped to +-448 and cast to e4m3 (round to nearest even).

Qwen3's per-head q/k RMSNorm (`norm.QKNorm`, ``NORM``) rides in the same launch: the program
normalises each head it has loaded before rotating it, rounding where `rms_norm_ref` (and the
separate norm kernel) rounds: mean of squares in float32, x times its rsqrt rounded to the
input dtype, times the weight rounded again. Only the order of the float32 sum of squares
differs from the reference (and from the separate kernel), so a bf16 value can land one unit
in the last place away. That folds two norm launches per layer (four when q and k are strided
views of the q|k|v output, which the norm's reshape copies) into the rotary one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.norm import QKNorm


@triton.jit
def _rms_norm_heads(x1, x2, w_ptr, eps, dims, HALF: tl.constexpr):
    """Each head (a row of the two halves x1, x2 [HEADS_PAD, HALF_PAD]; padding lanes are 0)
    normalised as `rms_norm_ref` does, in x's dtype: float32 mean of squares over the whole
    head, x * rsqrt rounded to the dtype, times the weight [2 * HALF], rounded."""
    dtype = x1.dtype
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    variance = (tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF)
    inv = tl.math.rsqrt(variance + eps)[:, None]
    w1 = tl.load(w_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    n1 = (w1 * (f1 * inv).to(dtype).to(tl.float32)).to(dtype)
    n2 = (w2 * (f2 * inv).to(dtype).to(tl.float32)).to(dtype)
    return n1, n2


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_xt, stride_xh, stride_ot, stride_oh, token, c1, c2, s1, s2,
                  cache_ptr, slot, stride_cs, stride_ch, scale_ptr, norm_ptr, eps,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  TO_CACHE: tl.constexpr, QUANT: tl.constexpr, NORM: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HALF)
    x_row = x_ptr + token * stride_xt + heads[:, None] * stride_xh + dims[None, :]
    o_row = o_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    if NORM:  # Qwen3's per-head RMSNorm first: rotary reads the rounded normalised head
        x1, x2 = _rms_norm_heads(x1, x2, norm_ptr, eps, dims, HALF)
    # out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), rounded as in torch.
    a1 = (x1.to(tl.float32) * c1[None, :]).to(dtype).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s1[None, :]).to(dtype).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2[None, :]).to(dtype).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2[None, :]).to(dtype).to(tl.float32)
    lo, hi = (a1 + b1).to(o_ptr.dtype.element_ty), (a2 + b2).to(o_ptr.dtype.element_ty)
    tl.store(o_row, lo, mask=mask)
    tl.store(o_row + HALF, hi, mask=mask)
    if TO_CACHE:
        c_row = cache_ptr + slot * stride_cs + heads[:, None] * stride_ch + dims[None, :]
        if QUANT:
            scale = tl.load(scale_ptr + heads, mask=heads < NUM_HEADS, other=1.0)[:, None]
            tl.store(c_row, _to_fp8(lo, scale, cache_ptr.dtype.element_ty), mask=mask)
            tl.store(c_row + HALF, _to_fp8(hi, scale, cache_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(c_row, lo, mask=mask)
            tl.store(c_row + HALF, hi, mask=mask)


@triton.jit
def _to_fp8(x, scale, fp8_dtype: tl.constexpr):
    """x / scale, saturated to the e4m3 range (+-448), cast: as `attention.quantize_fp8`."""
    y = x.to(tl.float32) / scale
    return tl.minimum(tl.maximum(y, -448.0), 448.0).to(fp8_dtype)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_oqt, stride_oqh, stride_okt, stride_okh,
    stride_cos, stride_sin,
    v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_vt, stride_vh, stride_cs, stride_ch,
    k_scale_ptr, v_scale_ptr, q_norm_ptr, k_norm_ptr, eps,
    NUM_Q: tl.constexpr, NUM_K: tl.constexpr, Q_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, TO_CACHE: tl.constexpr, QUANT: tl.constexpr, NORM: tl.constexpr,
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
    slot = token
    if TO_CACHE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_oqt, stride_oqh, token, c1, c2, s1, s2,
                  q_out_ptr, slot, 0, 0, k_scale_ptr, q_norm_ptr, eps, NUM_Q, Q_PAD, HALF, HALF_PAD, False, False,
                  NORM)
    _rotate_heads(k_ptr, k_out_ptr, stride_kt, stride_kh, stride_okt, stride_okh, token, c1, c2, s1, s2,
                  k_cache_ptr, slot, stride_cs, stride_ch, k_scale_ptr, k_norm_ptr, eps, NUM_K, K_PAD, HALF, HALF_PAD,
                  TO_CACHE, QUANT, NORM)
    if TO_CACHE:  # V is stored as it is (or quantized), both halves at once
        heads = tl.arange(0, K_PAD)
        cols = tl.arange(0, 2 * HALF_PAD)
        mask = (heads[:, None] < NUM_K) & (cols[None, :] < 2 * HALF)
        v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + cols[None, :], mask=mask)
        if QUANT:
            v_scale = tl.load(v_scale_ptr + heads, mask=heads < NUM_K, other=1.0)[:, None]
            v = _to_fp8(v, v_scale, v_cache_ptr.dtype.element_ty)
        tl.store(v_cache_ptr + slot * stride_cs + heads[:, None] * stride_ch + cols[None, :], v, mask=mask)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by per-token cos/sin [T, D], as `apply_rotary_ref`."""
    return _launch(q, k, cos, sin, None)


def apply_rotary_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, qk_norm: QKNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary`, and the rotated k and v [T, Hk, D] stored at their cache slots
    (as `write_kv_ref`) by the same launch: one kernel per layer instead of three. With
    ``k_scale``/``v_scale`` (float32 [Hk]) the caches are FP8 and the stores quantize. With
    ``qk_norm`` each q and k head is RMS-normalised first (`qk_norm_ref`), in the same launch."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_flat, v_flat = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    quant = k_scale is not None
    stored = k.dtype if not quant else k_cache.dtype
    if v.shape != k.shape or v.dtype != k.dtype or k_cache.dtype != stored or v_cache.dtype != stored \
            or k_flat.stride() != v_flat.stride():
        raise ValueError(f"k {k.dtype} {tuple(k.shape)}, v {v.dtype} {tuple(v.shape)} and the caches "
                         f"{k_cache.dtype} {tuple(k_cache.shape)} do not match")
    if quant and (v_scale is None or k_scale.numel() != num_kv_heads or v_scale.numel() != num_kv_heads
                  or k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32):
        raise ValueError(f"an FP8 cache needs float32 k_scale and v_scale of {num_kv_heads} KV heads")
    if v.stride(-1) != 1:
        v = v.contiguous()
    return _launch(q, k, cos, sin, (v, k_flat, v_flat, slot_mapping), (k_scale, v_scale) if quant else None,
                   qk_norm)


def _check_norm(norm: QKNorm, head_dim: int, dtype: torch.dtype) -> None:
    # The reference's ``weight * normed`` promotes to the weight's dtype; the kernel writes q's,
    # so only weights of q's dtype give the reference's result.
    for name, w in (("q_weight", norm.q_weight), ("k_weight", norm.k_weight)):
        if w.shape != (head_dim,) or w.dtype != dtype or w.stride(0) != 1:
            raise ValueError(f"QKNorm.{name} {w.dtype} {tuple(w.shape)}: need a contiguous [{head_dim}] of {dtype}")


def _launch(q, k, cos, sin, cache, scales=None, qk_norm: QKNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, num_q, head_dim = q.shape
    num_k = k.shape[1]
    if head_dim % 2 or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise ValueError(f"q {q.dtype} {tuple(q.shape)} and k {k.dtype} {tuple(k.shape)}: need one even head_dim and dtype")
    if qk_norm is not None:
        _check_norm(qk_norm, head_dim, q.dtype)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)
    # Without a cache the cache arguments are unused placeholders (TO_CACHE is off).
    v, k_flat, v_flat, slots = cache if cache is not None else (k_out, k_out, k_out, cos)
    k_scale, v_scale = scales if scales is not None else (cos, cos)
    q_norm, k_norm = (qk_norm.q_weight, qk_norm.k_weight) if qk_norm is not None else (cos, cos)
    if tokens:
        half = head_dim // 2
        _rotary_kernel[(tokens,)](
            q, k, q_out, k_out, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos.stride(0), sin.stride(0),
            v, k_flat, v_flat, slots, v.stride(0), v.stride(1), k_flat.stride(0), k_flat.stride(1),
            k_scale, v_scale, q_norm, k_norm, qk_norm.eps if qk_norm is not None else 0.0,
            NUM_Q=num_q, NUM_K=num_k, Q_PAD=triton.next_power_of_2(num_q), K_PAD=triton.next_power_of_2(num_k),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), TO_CACHE=cache is not None,
            QUANT=scales is not None, NORM=qk_norm is not None, num_warps=4,
        )
    return q_out, k_out
