"""Skinny linear layers in Triton: y = x W^T (+ b) for the few rows of a small decode batch.

At batch 1 a decode step's linear layers are matrix-vector products: the time is the weight's
bytes over the HBM bandwidth plus what a launch costs. The engine uses this kernel for the MoE
router only (`dispatch.router`): its 128 x 2048 matrix is so small that cuBLAS's 5.3 us is all
fixed cost, and here it is 4.4 us with the softmax kernel adding the partial sums. For the
attention and MLP projections cuBLAS is as fast (the sweep of 2026-12-02 on an H200,
benchmarks/decode_kernel_sweep.py: the best launch shape per matrix was 0.5 to 1.4 us faster
at one row and slower at 4 and 16 rows, no single rule won everywhere), so they stay on it.

`_skinny_kernel`: program (n, s) multiplies the (at most `MAX_ROWS`) rows of x, padded to
16 (the smallest ``tl.dot`` tile), with ``BLOCK_N`` rows of W over its ``s``-th share of K,
accumulating in float32. W is read once, in [BLOCK_K, BLOCK_N] tiles straight from its
[N, K] rows (K contiguous), pipelined ``num_stages`` deep. With one share (``split_k`` 1)
the program writes y (bias added, rounded once); with several, each writes its float32
partial sum to ``partials[s]`` and `_reduce_kernel` adds them in a fixed order (no atomics:
the same result every run). A caller that reduces itself takes the partials
(`skinny_partials`): the MoE router's softmax kernel sums them as it loads its logits, so the
router is two launches, not three.

`SkinnyConfig` is the launch shape; `skinny_config` picks it from the matrix's shape and the
SM count: enough programs for every SM, split K only when the rows of W alone do not give
that many. No host synchronisation anywhere: the calls record into CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

#: Rows of x a skinny call takes (more: an ordinary GEMM, whose tiles are no longer wasted).
MAX_ROWS = 16


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch shape of one skinny linear call."""

    #: Rows of W (outputs) per program.
    block_n: int = 32
    #: Columns of W (inputs) per loop step.
    block_k: int = 256
    #: Shares of K, each a program of its own; > 1 needs a reduction of the partial sums.
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"SkinnyConfig.{name} must be a power of two >= 16, got {value}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"SkinnyConfig: split_k, num_warps and num_stages must be >= 1: {self}")


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small grid
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def skinny_config(n: int, k: int, num_sms: int) -> SkinnyConfig:
    """Enough programs for every SM at least once: rows of W first (32 per program, 16 when
    that is too few), then shares of K no shorter than 256 columns, walked 128 at a time.
    (The router's 128 x 2048: 8 programs x 8 shares, 4.4 us on an H200 where cuBLAS took 5.3.)"""
    block_n = 32 if triton.cdiv(n, 32) >= num_sms else 16
    programs = triton.cdiv(n, block_n)
    split_k = 1
    while programs * split_k < num_sms and k // (2 * split_k) >= 256:
        split_k *= 2
    return SkinnyConfig(block_n=block_n, block_k=128, split_k=split_k, num_stages=3)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, k_share, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, M_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    share = tl.program_id(1)
    rows = tl.arange(0, M_PAD)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    k_lo = share * k_share
    k_hi = tl.minimum(k_lo + k_share, K)
    a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k_lo + ks)[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + (k_lo + ks)[:, None]
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = ks < k_hi - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        part = part_ptr + (share * M + rows[:, None]).to(tl.int64) * N + cols[None, :]
        tl.store(part, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_om, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + (s * M + row).to(tl.int64) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


REDUCE_BLOCK = 1024


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"skinny linear: {x.shape[0]} rows, at most {MAX_ROWS}")


def _shares(k: int, cfg: SkinnyConfig) -> tuple[int, int]:
    """(columns per share, shares): every share but the last a whole number of loop steps."""
    k_share = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return k_share, triton.cdiv(k, k_share)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
            partials: torch.Tensor | None, cfg: SkinnyConfig) -> None:
    m, k = x.shape
    n = weight.shape[0]
    k_share, splits = _shares(k, cfg)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    _skinny_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x, weight, bias if bias is not None else x, out if out is not None else x,
        partials if partials is not None else x, m, n, k, k_share, x.stride(0), weight.stride(0),
        out.stride(0) if out is not None else 0, HAS_BIAS=bias is not None, SPLIT=partials is not None,
        PRECISION=precision, M_PAD=16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [M <= MAX_ROWS, K], weight [N, K]: y [M, N] in x's dtype."""
    _check(x, weight)
    x, weight = _contiguous(x), _contiguous(weight)
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or skinny_config(n, k, _sms(x.device))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    _, splits = _shares(k, cfg)
    if splits == 1:
        _launch(x, weight, bias, out, None, cfg)
        return out
    partials = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _launch(x, weight, None, None, partials, cfg)
    _reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK))](
        partials, bias if bias is not None else partials, out, m, n, out.stride(0), SPLITS=splits,
        HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4)
    return out


def skinny_partials(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig | None = None) -> torch.Tensor:
    """x W^T as float32 partial sums [splits, M, N] over shares of K, for a caller that adds
    them itself (their sum is the product; one share is the product itself)."""
    _check(x, weight)
    x, weight = _contiguous(x), _contiguous(weight)
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or skinny_config(n, k, _sms(x.device))
    partials = torch.empty(_shares(k, cfg)[1], m, n, dtype=torch.float32, device=x.device)
    if m:
        _launch(x, weight, None, None, partials, cfg)
    return partials
