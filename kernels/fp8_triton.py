"""The GPU paths of the FP8 linear (`dispatch.fp8_linear` picks one; kernels/fp8.py is the oracle).

- Small M (decode) is not here: `linear_triton.skinny_linear` reads the e4m3 weights there
  (weight-only up to 16 rows, W8A8 after `quantize_per_token` up to 64), faster on an H200 than
  the weight-only kernel this module had (18.6 against 11.4 us at Llama-3-8B's q|k|v, one row).
- `quantize_per_token` / `quantize_per_token_group`: the activations' dynamic quantization in
  one pass (`fp8.quantize_per_token*` compute the same values: amax, scale = amax / 448,
  x / scale rounded to nearest, with IEEE division so the roundings agree).
- `fp8_block_linear` (large M, block scales). A W8A8 GEMM: activations quantized per token and
  128-column group, e4m3 x e4m3 tensor-core dots
  per 128-deep K tile, each tile's float32 result scaled by its activation-group and weight-
  block scales before it joins the accumulator.
- `fp8_scaled_mm_linear` (large M, per-channel/per-tensor scales): activations quantized per
  token, then ``torch._scaled_mm`` with rowwise scales (cuBLASLt), bfloat16 out.

The block GEMM's launch parameters are starting points, not measured choices; everything here
also runs under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.fp8 import MIN_SCALE, BLOCK, FP8_DTYPE, FP8_MAX, Fp8Scheme, Fp8Weight

@triton.jit
def _quant_groups_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm,
                         GROUP: tl.constexpr, GROUPS: tl.constexpr, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """One row's GROUPS groups of GROUP columns: a scale each, e4m3 values."""
    row = tl.program_id(0)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / FMAX, MIN_SCALE)
    q = tl.math.div_rn(x, scale[:, None])
    q = tl.minimum(tl.maximum(q, -FMAX), FMAX)
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + g, scale, mask=g * GROUP < K)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                       BLOCK_K: tl.constexpr, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """One row: its amax over K (first pass), then its e4m3 values (second pass)."""
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / FMAX, MIN_SCALE)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FMAX), FMAX)
        tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    tl.store(s_ptr + row, scale)


#: Groups one program of `quantize_per_token_group` quantizes (8 x 128 columns).
QUANT_GROUPS = 8
QUANT_BLOCK_K = 1024


def quantize_per_token_group(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 [M, ceil(K/group)]): `fp8.quantize_per_token_group`."""
    m, k = x.shape
    n_groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, n_groups, dtype=torch.float32, device=x.device)
    if m:
        _quant_groups_kernel[(m, triton.cdiv(n_groups, QUANT_GROUPS))](
            x, q, scale, k, x.stride(0), q.stride(0), scale.stride(0),
            GROUP=group, GROUPS=QUANT_GROUPS, FMAX=FP8_MAX, MIN_SCALE=MIN_SCALE)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 [M, 1]): `fp8.quantize_per_token`."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _quant_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0),
                                 BLOCK_K=QUANT_BLOCK_K, FMAX=FP8_MAX, MIN_SCALE=MIN_SCALE)
    return q, scale


@triton.jit(do_not_specialize=["M"])  # the step's tokens: one variant for every count
def _fp8_block_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_cm, stride_cn,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        a_s = tl.load(as_ptr + offs_m * stride_asm + (k0 // GROUP_K) * stride_ask, mask=mask_m, other=0.0)
        b_s = tl.load(bs_ptr + (offs_n // GROUP_N) * stride_bsn + (k0 // GROUP_K) * stride_bsk,
                      mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_block_linear(x: torch.Tensor, weight: Fp8Weight, block_m: int = 64, block_n: int = 128) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype: activations quantized per token and 128-column group,
    times a 128x128 block-scaled e4m3 weight (W8A8)."""
    if weight.scheme is not Fp8Scheme.BLOCK:
        raise ValueError(f"the block W8A8 kernel needs block scales, not {weight.scheme}")
    group_n, group_k = weight.block
    if group_k != BLOCK:
        raise ValueError(f"block scales over {group_k} columns: the kernel's K tile is {BLOCK}")
    m, k = x.shape
    n = weight.data.shape[0]
    xq, xs = quantize_per_token_group(x, group_k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_gemm_kernel[grid](
        xq, xs, weight.data, weight.scale, out, m, n, k,
        xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1), weight.data.stride(0), weight.data.stride(1),
        weight.scale.stride(0), weight.scale.stride(1), out.stride(0), out.stride(1),
        GROUP_N=group_n, GROUP_K=group_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK,
        num_warps=4 if block_m <= 64 else 8, num_stages=3,
    )
    return out


#: torch._scaled_mm's first operand: rows padded to a multiple of this (cuBLASLt's fp8 layouts).
SCALED_MM_ROW_MULTIPLE = 16


def fp8_scaled_mm_linear(x: torch.Tensor, weight: Fp8Weight,
                         per_token: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype via ``torch._scaled_mm``: x quantized per token (rowwise
    scales [M, 1]; ``per_token``: that quantization, made already), weight scales per channel as
    [1, N] (a per-tensor one broadcast), bf16 out (what rowwise scaling supports), rows padded to
    a multiple of 16 and cut off again."""
    if weight.scheme is Fp8Scheme.BLOCK:
        raise ValueError("torch._scaled_mm takes per-tensor or per-channel weight scales; block scales "
                         "go through fp8_block_linear")
    m = x.shape[0]
    n = weight.data.shape[0]
    xq, xs = per_token or quantize_per_token(x)
    pad = -m % SCALED_MM_ROW_MULTIPLE
    if pad:
        xq = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(xq.dtype)
        xs = torch.nn.functional.pad(xs, (0, 0, 0, pad), value=1.0)
    ws = weight.scale.reshape(1, -1).float().expand(1, n).contiguous()
    # weight.data [N, K] row-major: its transpose is the column-major [K, N] cuBLASLt wants.
    out = torch._scaled_mm(xq, weight.data.t(), scale_a=xs.contiguous(), scale_b=ws, out_dtype=torch.bfloat16)
    return out[:m].to(x.dtype)
