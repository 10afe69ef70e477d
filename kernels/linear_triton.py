"""Skinny linear layers in Triton: y = x W^T (+ b) for the few rows of a decode batch.

At batch 1 a decode step's linear layers are matrix-vector products: the time is the weight's
bytes over the HBM bandwidth plus what a launch costs. Who uses this kernel, from H200 sweeps
(benchmarks/decode_kernel_sweep.py, 2026-12-02; results README, session 3):

- the MoE router in bf16 (`dispatch.router`): its 128 x 2048 matrix is so small that cuBLAS's
  5.3 us is all fixed cost; here 4.4 us, the softmax kernel adding the partial sums;
- bf16 projections at one row (`dispatch.linear`) where the GPU's tuned table measured the kernel
  faster than cuBLAS (`bf16_skinny_config`; on an H200 the matrices whose K cuBLAS splits into a
  second launch, 2 to 2.4 us a call); cuBLAS otherwise, and at 2 to 16 rows, where it is faster;
- FP8 (e4m3) weights (`dispatch.fp8_linear`): weight-only up to 16 rows, the e4m3 tiles widened
  to float16 in registers (`dot_f16`; activations saturate at float16's range); W8A8 up to 64
  rows (x quantized per token beforehand, e4m3 x e4m3 products). Both beat bf16 cuBLAS and
  ``torch._scaled_mm`` at Llama-3-8B's matrices.

`_skinny_kernel`: program (n, s) multiplies the (at most `MAX_ROWS`) rows of x, padded to
16 (the smallest ``tl.dot`` tile), with ``BLOCK_N`` rows of W over its ``s``-th share of K,
accumulating in float32. W is read once, straight from its [N, K] rows (K contiguous),
pipelined ``num_stages`` deep, either as the right operand (x W^T) or, with ``swap_ab``, as
the left one (W x^T: the widened e4m3 tile goes from registers to the tensor cores).

With one share (``split_k`` 1) the program writes y (bias added, rounded once). With several,
each writes its float32 partial sum to ``partials[s]``; then either the last program of its
column block to arrive (an atomic count per block, reset by that program) adds them in share
order and writes y (``reduce_in_kernel``, one launch), or `_reduce_kernel` does (two). Either
way the same sums in the same order: the same result every run. A caller that reduces itself
takes the partials (`skinny_partials`): the MoE router's softmax kernel sums them as it loads
its logits. ``gated``: W is gate | up and y is silu(gate) * up, rounded where the separate SiLU
kernel rounds. With programmatic dependent launch (`pdl.py`, ``SkinnyConfig.pdl``) the kernel
starts while the one before it finishes, loading weights until it must wait for x.

Launch shapes: `SkinnyConfig`. `skinny_config` (bf16) and `fp8_skinny_config` pick one from the
matrix's shape and the SM count, or from the GPU's tuned table (kernels/configs/
skinny_<gpu>.json, written by ``benchmarks/decode_kernel_sweep.py --families linear,fp8``; the
``SPLITSERVE_SKINNY_CONFIGS`` file instead). No host synchronisation anywhere: the calls record
into CUDA graphs.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from splitserve.kernels import pdl
from splitserve.kernels.pdl import gdc_launch_dependents, gdc_wait

#: Rows of x a skinny call takes (more: an ordinary GEMM, whose tiles are no longer wasted).
MAX_ROWS = 64


class ScaleKind(enum.IntEnum):
    """How a weight's values are scaled (a constexpr of the kernel)."""

    NONE = 0
    #: One per output row ([N, 1]), or one for the tensor ([1]: a row stride of 0).
    ROW = 1
    #: One per (SCALE_BN x SCALE_BK) block ([ceil(N / bn), ceil(K / bk)]).
    BLOCK = 2


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
    #: Load W's tiles as [BLOCK_N, BLOCK_K] (its rows as they lie) and transpose them for the
    #: product, instead of loading [BLOCK_K, BLOCK_N] views.
    w_nk: bool = False
    #: Multiply in float16 (x rounded to it; e4m3 weights widen to it in one instruction)
    #: rather than in x's dtype.
    dot_f16: bool = False
    #: W's tile as the MMA's left operand (W x^T): an e4m3 tile widened in registers goes to
    #: the tensor cores without a trip through shared memory, and BLOCK_N (not x's rows padded
    #: to 16) is the MMA's M side.
    swap_ab: bool = False
    #: With split K, the last program of a column block to finish sums the shares (one launch);
    #: otherwise `_reduce_kernel` does (two launches).
    reduce_in_kernel: bool = True
    #: Programmatic dependent launch (`pdl.py`; on GPUs that have it): 0 off; 1 launched early,
    #: waiting for the kernel before ahead of any load; 2 the same, W's first tile loaded before
    #: the wait.
    pdl: int = 0

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


def sms(device: torch.device) -> int:
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


class SkinnyMode(enum.Enum):
    """What a tuned launch shape was measured for (a key of the tuned tables)."""

    WEIGHT_ONLY = "weight_only"
    W8A8 = "w8a8"
    WEIGHT_ONLY_GATED = "weight_only_gated"
    W8A8_GATED = "w8a8_gated"
    #: bf16 weights and activations as they are (`bf16_skinny_config`: weighed against cuBLAS).
    BF16 = "bf16"

    @classmethod
    def of(cls, w8a8: bool, gated: bool) -> "SkinnyMode":
        return {(False, False): cls.WEIGHT_ONLY, (True, False): cls.W8A8,
                (False, True): cls.WEIGHT_ONLY_GATED, (True, True): cls.W8A8_GATED}[(w8a8, gated)]


#: A JSON file of tuned launch shapes to use instead of the shipped table for this GPU.
TUNED_ENV = "SPLITSERVE_SKINNY_CONFIGS"
#: The shipped tables: kernels/configs/skinny_<gpu name, lower case, "_" for spaces>.json,
#: written by ``benchmarks/decode_kernel_sweep.py --families fp8`` on that GPU.
TUNED_DIR = Path(__file__).parent / "configs"
#: Row counts the tables are measured at; a call takes the first at least its own (x pads to
#: 16 rows in the MMA, so 2 to 16 rows cost alike).
TUNED_ROWS = (1, 16, 64)


def tuned_key(mode: SkinnyMode, n: int, k: int, rows: int) -> str:
    bucket = next((r for r in TUNED_ROWS if rows <= r), TUNED_ROWS[-1])
    return f"{mode.value}:{n}x{k}:m{bucket}"


def tuned_file(device_name: str) -> Path:
    return TUNED_DIR / f"skinny_{device_name.lower().replace(' ', '_')}.json"


@dataclass(frozen=True)
class TunedEntry:
    """One measured choice: the launch shape, and for a gated mode whether the gated launch
    beat the plain one followed by `activation_triton.silu_and_mul` (``fused``)."""

    config: SkinnyConfig
    fused: bool = True
    #: Measured microseconds of what this entry runs (for a gated mode not ``fused``: the plain
    #: launch and the SiLU's), W8A8's including the activations' quantization; None if unknown.
    us: float | None = None
    #: cuBLAS's microseconds at the same shape and rows in the same run (bf16 entries).
    cublas_us: float | None = None


@cache
def tuned_configs(device_name: str) -> dict[str, TunedEntry]:
    """The tuned table for a GPU (``TUNED_ENV``'s file, else the shipped one; empty if none),
    read once per process."""
    path = Path(os.environ.get(TUNED_ENV) or tuned_file(device_name))
    if not path.is_file():
        return {}
    entries = {}
    for key, entry in json.loads(path.read_text())["configs"].items():
        fused = entry.get("fused", True)
        us = entry.get("us") if fused else entry.get("plain_then_silu_us")
        entries[key] = TunedEntry(SkinnyConfig(**entry["config"]), fused, us, entry.get("cublas_us"))
    return entries


def bf16_skinny_config(n: int, k: int, rows: int, device: str | None) -> SkinnyConfig | None:
    """The launch shape for a bf16 weight [n, k] at ``rows`` rows where ``device``'s tuned
    table measured the skinny kernel faster than cuBLAS at that shape and row count; None
    (cuBLAS) otherwise, and always past 16 rows. On an H200 (2026-12-03, one row) it wins at
    the matrices whose K is split (o: 7.3 against 9.5 us at Qwen3-30B-A3B's, 11.4 against
    13.9 at Llama-3-8B's; down 31.3 against 33.4) and at Llama-3-8B's q|k|v and gate|up, and
    loses at Qwen3-30B-A3B's q|k|v (8.6 against 8.1)."""
    if device is None or rows > 16:
        return None
    entry = tuned_configs(device).get(tuned_key(SkinnyMode.BF16, n, k, rows))
    if entry is None or entry.us is None or entry.cublas_us is None or entry.us >= entry.cublas_us:
        return None
    return entry.config


def weight_only_pays(n: int, k: int, rows: int, gated: bool, device: str | None) -> bool:
    """Whether, past 16 rows, the weight-only launch (activations as they are) beats W8A8
    (activations quantized per token first, one more launch): only where the tuned table
    measured both at this row count and weight-only was faster; otherwise W8A8, the choice
    before the tables measured weight-only past 16 rows."""
    if device is None or rows <= 16:
        return False
    table = tuned_configs(device)
    wo = table.get(tuned_key(SkinnyMode.of(False, gated), n, k, rows))
    w8 = table.get(tuned_key(SkinnyMode.of(True, gated), n, k, rows))
    if wo is None or w8 is None or wo.us is None or w8.us is None:
        return False
    return wo.us < w8.us


def gated_pays(n: int, k: int, rows: int, w8a8: bool, device: str | None) -> bool:
    """Whether gate | up with the SiLU in the epilogue beats the plain launch and the SiLU's:
    the tuned table's verdict, else the H200 sweep of 2026-12-03 (only as W8A8, at 64 rows:
    38.2 against 41.3 us at Llama-3-8B's gate | up; weight-only it lost by 0.7 to 2 us, its
    programs doing two products each)."""
    entry = tuned_configs(device).get(tuned_key(SkinnyMode.of(w8a8, True), n, k, rows)) if device else None
    return entry.fused if entry is not None else w8a8


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def fp8_skinny_config(n: int, k: int, num_sms: int, block: tuple[int, int] | None = None,
                      w8a8: bool = False, rows: int = 1, gated: bool = False,
                      device: str | None = None) -> SkinnyConfig:
    """e4m3 weights: ``device``'s tuned table when it has this (mode, shape, rows) and the
    shape fits ``block``'s scale blocks; otherwise a heuristic from the H200 sweep of 2026-12-02
    (benchmarks/decode_kernel_sweep.py --families fp8, at Llama-3-8B's q|k|v, o, gate|up and down):

    - weight-only (``w8a8`` False, up to 16 rows): 64 rows of W per program, 128 columns a step,
      products in float16 (e4m3 widens to it in one instruction, to bf16 in three: 4-10% faster),
      K split while the programs number under three per SM, at most 4 shares of >= 512 columns.
      Best or within 3% of it at 1 to 16 rows except gate|up (W8A8 there: 35.6 against 40.6 us).
    - W8A8 (17 to 64 rows): 32 rows, 256 columns (128 under block scales), K split the same way;
      at 64 rows it beat ``_scaled_mm`` at every shape (15.0 against 17.6 us at q|k|v)."""
    if device is not None:
        entry = tuned_configs(device).get(tuned_key(SkinnyMode.of(w8a8, gated), n, k, rows))
        tuned = entry.config if entry is not None and entry.fused else None
        if tuned is not None and (block is None or (block[0] % tuned.block_n == 0 and block[1] % tuned.block_k == 0)):
            return tuned
    if w8a8:
        block_n, block_k = 32, min(256, block[1]) if block else 256
    else:
        block_n, block_k = 64, 128
    programs = triton.cdiv(n, block_n)
    split_k = 1
    while split_k < 4 and programs * split_k < 3 * num_sms and k // (2 * split_k) >= 512:
        split_k *= 2
    return SkinnyConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_stages=3, dot_f16=not w8a8)


@triton.jit
def _load_w(w_ptrs, col_ok, k_ok, SWAP: tl.constexpr, W_NK: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile of W as the product takes it ([BLOCK_K, BLOCK_N] unless SWAP)."""
    if SWAP:
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    elif W_NK:
        w = tl.trans(tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0))
    else:
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    return w


@triton.jit
def _mma(a_ptrs, w, acc, row_ok, k_ok, s_ptr, col0, k0, stride_sn, stride_sk, SCALE: tl.constexpr,
         SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr, PRECISION: tl.constexpr, SWAP: tl.constexpr,
         DOT: tl.constexpr):
    """One loop step: x's tile loaded, both widened as DOT says, their product added to acc."""
    if SWAP:
        a = tl.load(a_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    # DOT 0: in x's dtype; 1: in float16 (e4m3 widens to it in one instruction);
    # 2: x arrives as e4m3 (per-row scales ``xs``), the product is e4m3 x e4m3.
    if DOT == 1:  # saturate, not overflow: activations past float16's range are rare but exist
        a = tl.clamp(a.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        w = w.to(tl.float16)
    elif DOT == 0:
        w = w.to(a.dtype)
    if SCALE == 2:  # one block's scale for the whole step (BLOCK_N | SCALE_BN, BLOCK_K | SCALE_BK)
        if SWAP:
            step = tl.dot(w, a, input_precision=PRECISION)
        else:
            step = tl.dot(a, w, input_precision=PRECISION)
        acc += step * tl.load(s_ptr + (col0 // SCALE_BN) * stride_sn + (k0 // SCALE_BK) * stride_sk)
    elif SWAP:  # accumulate inside the MMA
        acc = tl.dot(w, a, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _product(x_ptr, w_ptr, s_ptr, xs_ptr, M, k_lo, k_hi, col0, limit, stride_xm, stride_wn, stride_sn, stride_sk,
             SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr, PRECISION: tl.constexpr,
             M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_NK: tl.constexpr,
             SWAP: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
    """x[:, k_lo:k_hi] times W's rows col0.. (those below ``limit``), scales applied: float32
    [M_PAD, BLOCK_N]. ``SWAP``: W's tile is the left operand (W x^T, transposed at the end), so
    an e4m3 tile widened in registers feeds the tensor cores without a trip through shared
    memory and BLOCK_N, not the 16 padded rows of x, is the MMA's M side.

    ``PDL`` (programmatic dependent launch, `pdl.py`): 0, x is ready; 1, wait for the kernel
    before (which wrote x) first; 2, load the first tile of W (a constant) before that wait, so
    its memory latency overlaps the previous kernel's tail."""
    rows = tl.arange(0, M_PAD)
    cols = col0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < limit
    if SWAP:
        a_ptrs = x_ptr + rows[None, :].to(tl.int64) * stride_xm + (k_lo + ks)[:, None]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + (k_lo + ks)[None, :]
        acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
    else:
        a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k_lo + ks)[None, :]
        if W_NK:
            w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + (k_lo + ks)[None, :]
        else:
            w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + (k_lo + ks)[:, None]
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    first = k_lo
    if PDL == 2:  # the first step peeled: its W tile in flight before the wait
        k_ok = ks < k_hi - k_lo
        w = _load_w(w_ptrs, col_ok, k_ok, SWAP, W_NK)
        gdc_wait()
        acc = _mma(a_ptrs, w, acc, row_ok, k_ok, s_ptr, col0, k_lo, stride_sn, stride_sk, SCALE, SCALE_BN,
                   SCALE_BK, PRECISION, SWAP, DOT)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        first = k_lo + BLOCK_K
    elif PDL == 1:
        gdc_wait()
    for k0 in range(first, k_hi, BLOCK_K):
        k_ok = ks < k_hi - k0
        w = _load_w(w_ptrs, col_ok, k_ok, SWAP, W_NK)
        acc = _mma(a_ptrs, w, acc, row_ok, k_ok, s_ptr, col0, k0, stride_sn, stride_sk, SCALE, SCALE_BN,
                   SCALE_BK, PRECISION, SWAP, DOT)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    if SCALE == 1:
        acc *= tl.load(s_ptr + cols * stride_sn, mask=col_ok, other=0.0)[None, :]
    if DOT == 2:
        acc *= tl.load(xs_ptr + rows, mask=row_ok, other=0.0)[:, None]
    return acc


@triton.jit
def _write(out_ptrs, b_ptrs, g, u, mask, HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    """The output from float32 sums ``g`` (and ``u``): + bias, or silu(g) * u rounded where
    `activation_triton.silu_and_mul` rounds (g and u to the output dtype as a separate linear
    would store them, silu(g) to it, then the product)."""
    dtype = out_ptrs.dtype.element_ty
    if GATED:
        gate = g.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        y = act * u.to(dtype).to(tl.float32)
    else:
        y = g
        if HAS_BIAS:
            y += tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, y.to(dtype), mask=mask)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, k_share, stride_xm,
                   stride_wn, stride_om, stride_sn, stride_sk, SCALE: tl.constexpr, SCALE_BN: tl.constexpr,
                   SCALE_BK: tl.constexpr, HAS_BIAS: tl.constexpr, TO_PARTIALS: tl.constexpr, SPLITS: tl.constexpr,
                   REDUCE: tl.constexpr,
                   GATED: tl.constexpr, PRECISION: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, W_NK: tl.constexpr, SWAP: tl.constexpr, DOT: tl.constexpr,
                   PDL: tl.constexpr):
    """Program (n, s): outputs n*BLOCK_N.. over share s of K. N is the output's width (a
    GATED call reads 2N rows of W: gate rows 0..N, up rows N..2N). TO_PARTIALS: the float32
    sums go to ``part_ptr`` [SPLITS, M, N (2N gated)], and then REDUCE 0: they are left for
    `_reduce_kernel` or the caller; 1, the last program of a
    column block to arrive (an atomic count per block in ``lock_ptr``) sums them in share order
    and writes the output, then resets its count for the next call."""
    if PDL:  # the next kernel may start its own weight loads now (it waits for us before x)
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    share = tl.program_id(1)
    rows = tl.arange(0, M_PAD)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = share * k_share
    k_hi = tl.minimum(k_lo + k_share, K)
    g = _product(x_ptr, w_ptr, s_ptr, xs_ptr, M, k_lo, k_hi, pid_n * BLOCK_N, N, stride_xm, stride_wn,
                 stride_sn, stride_sk, SCALE, SCALE_BN, SCALE_BK, PRECISION, M_PAD, BLOCK_N, BLOCK_K, W_NK, SWAP, DOT,
                 PDL)
    u = g
    if GATED:  # (x is ready: the first product waited)
        u = _product(x_ptr, w_ptr, s_ptr, xs_ptr, M, k_lo, k_hi, N + pid_n * BLOCK_N, 2 * N, stride_xm,
                     stride_wn, stride_sn, stride_sk, SCALE, SCALE_BN, SCALE_BK, PRECISION, M_PAD, BLOCK_N,
                     BLOCK_K, W_NK, SWAP, DOT, 0)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    if TO_PARTIALS:
        width = 2 * N if GATED else N  # a partial row holds gate | up
        part = part_ptr + (share * M + rows[:, None]).to(tl.int64) * width + cols[None, :]
        tl.store(part, g, mask=mask)
        if GATED:
            tl.store(part + N, u, mask=mask)
        if REDUCE == 1:
            # Every thread's partial stored before the count says so (the release orders them).
            tl.debug_barrier()
            arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLITS - 1:
                g = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
                u = g
                for s in tl.static_range(SPLITS):  # share order: the same sums every run
                    src = part_ptr + (s * M + rows[:, None]).to(tl.int64) * width + cols[None, :]
                    g += tl.load(src, mask=mask, other=0.0, cache_modifier=".cg")  # L2: other SMs wrote them
                    if GATED:
                        u += tl.load(src + N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(lock_ptr + pid_n, 0)
                _write(out_ptrs, b_ptr + cols[None, :], g, u, mask, HAS_BIAS, GATED)
    else:
        _write(out_ptrs, b_ptr + cols[None, :], g, u, mask, HAS_BIAS, GATED)


@triton.jit
def _reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_om, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GATED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    width = 2 * N if GATED else N
    g = tl.zeros([BLOCK], dtype=tl.float32)
    u = g
    for s in tl.static_range(SPLITS):
        src = part_ptr + (s * M + row).to(tl.int64) * width + cols
        g += tl.load(src, mask=ok, other=0.0)
        if GATED:
            u += tl.load(src + N, mask=ok, other=0.0)
    _write(out_ptr + row.to(tl.int64) * stride_om + cols, b_ptr + cols, g, u, ok, HAS_BIAS, GATED)


REDUCE_BLOCK = 1024


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"skinny linear: {x.shape[0]} rows, at most {MAX_ROWS}")


def _shares(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(columns per share, shares): every share but the last a whole number of loop steps."""
    k_share = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_share, triton.cdiv(k, k_share)


@dataclass(frozen=True)
class _Scale:
    """A weight's scales as the kernels take them (see `ScaleKind`)."""

    kind: int
    tensor: torch.Tensor | None
    stride_n: int
    stride_k: int
    block: tuple[int, int]

    @classmethod
    def of(cls, scale: torch.Tensor | None, block: tuple[int, int] | None, block_n: int, block_k: int) -> "_Scale":
        if scale is None:
            return cls(int(ScaleKind.NONE), None, 0, 0, (1, 1))
        if block is None:  # per row, or one for the tensor
            return cls(int(ScaleKind.ROW), scale, 0 if scale.numel() == 1 else scale.stride(0), 0, (1, 1))
        if block[0] % block_n or block[1] % block_k:
            raise ValueError(f"a {block_n} x {block_k} tile must lie in one {block[0]} x {block[1]} scale block")
        return cls(int(ScaleKind.BLOCK), scale, scale.stride(0), scale.stride(1), block)


#: Arrival counts for in-kernel split-K reductions: one per column block, per device, zero
#: between calls (the last program to arrive resets its count). One buffer per device, not per
#: stream: a CUDA graph is captured on a stream of its own, after warm-up calls on another, and
#: must find the buffer those made. The engine runs a step's kernels on one stream, so two
#: calls never hold the counts at once.
LOCKS = 8192
_locks: dict[int, torch.Tensor] = {}


def _lock_buffer(device: torch.device, programs: int) -> torch.Tensor | None:
    """The counts for a launch of ``programs`` column blocks, or None when the two-launch
    reduction must serve: too many blocks, or the first call on this device is being captured
    into a CUDA graph (a buffer made inside a capture would belong to the graph's pool)."""
    if programs > LOCKS:
        return None
    return arrival_counts(_locks, device, LOCKS)


def arrival_counts(store: dict[int, torch.Tensor], device: torch.device, size: int) -> torch.Tensor | None:
    """``size`` zeroed int32 counts kept in ``store`` per device (made on the first eager call;
    None if that call is being captured into a CUDA graph, whose pool would own the buffer).
    On the CPU interpreter, fresh zeros per call."""
    if device.type != "cuda":
        return torch.zeros(size, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    counts = store.get(index)
    if counts is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        counts = store[index] = torch.zeros(size, dtype=torch.int32, device=device)
    return counts


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
            partials: torch.Tensor | None, cfg: SkinnyConfig, scale: "_Scale",
            x_scale: torch.Tensor | None = None, n: int | None = None, gated: bool = False,
            locks: torch.Tensor | None = None) -> None:
    """One `_skinny_kernel` launch for outputs of width ``n`` (W's rows; half of them when
    ``gated``); ``partials`` given: split-K, reduced in the kernel when ``locks`` is given."""
    m, k = x.shape
    n = weight.shape[0] if n is None else n
    k_share, splits = _shares(k, cfg.split_k, cfg.block_k)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    dot = 2 if x_scale is not None else (1 if cfg.dot_f16 and x.dtype != torch.float32 else 0)
    pdl_mode = cfg.pdl if pdl.enabled(x.device) else 0
    _skinny_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x, weight, scale.tensor if scale.tensor is not None else x, x_scale if x_scale is not None else x,
        bias if bias is not None else x,
        out if out is not None else x, partials if partials is not None else x,
        locks if locks is not None else x, m, n, k, k_share, x.stride(0),
        weight.stride(0), out.stride(0) if out is not None else 0, scale.stride_n, scale.stride_k,
        SCALE=scale.kind, SCALE_BN=scale.block[0], SCALE_BK=scale.block[1],
        HAS_BIAS=bias is not None, TO_PARTIALS=partials is not None, SPLITS=splits, REDUCE=int(locks is not None),
        GATED=gated, PRECISION=precision,
        M_PAD=max(16, triton.next_power_of_2(m)), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, W_NK=cfg.w_nk,
        SWAP=cfg.swap_ab, DOT=dot, PDL=pdl_mode, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl.launch_kwargs(pdl_mode))


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None, scale: torch.Tensor | None = None,
                  scale_block: tuple[int, int] | None = None, x_scale: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, gated: bool = False) -> torch.Tensor:
    """``F.linear(x, weight * scale, bias)`` for x [M <= MAX_ROWS, K], weight [N, K] of x's
    dtype or e4m3 (widened tile by tile; ``scale``: None, [N, 1] or [1] per row / tensor, or
    with ``scale_block`` (bn, bk) the [ceil(N / bn), ceil(K / bk)] block scales): y [M, N] in ``out_dtype``
    (default x's). ``x_scale`` [M] float32: x is e4m3, ``x * x_scale`` per row (W8A8).
    ``gated``: W is gate | up (N even, no bias) and y [M, N / 2] is silu(gate) * up, as
    `activation_triton.silu_and_mul` of the product would be, without the second launch."""
    _check(x, weight)
    x, weight = _contiguous(x), _contiguous(weight)
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or skinny_config(n, k, sms(x.device))
    e4m3 = torch.float8_e4m3fn
    if x_scale is not None:
        if x.dtype != e4m3 or weight.dtype != e4m3 or out_dtype is None:
            raise ValueError("skinny W8A8: x and weight must be e4m3 and out_dtype given")
        if x_scale.dtype != torch.float32 or x_scale.numel() != m or not x_scale.is_contiguous():
            raise ValueError(f"skinny W8A8: x_scale must be a contiguous float32 tensor of {m} rows")
    if cfg.dot_f16 and weight.dtype != e4m3:
        raise ValueError("dot_f16 is for e4m3 weights (a 16-bit weight would lose range)")
    if scale is not None and scale_block is None and not (
            scale.numel() == 1 or (scale.dim() >= 1 and scale.shape[0] == n and scale.numel() == n)):
        raise ValueError(f"per-row scales: [N, 1], [N] or [1], got {tuple(scale.shape)}")
    if gated:
        if n % 2 or bias is not None:
            raise ValueError(f"gated skinny linear: W must be gate | up (an even {n} rows) without a bias")
        n //= 2
        if scale_block is not None and n % scale_block[0]:
            raise ValueError(f"gated skinny linear: the up half starts at row {n}, inside a "
                             f"{scale_block[0]}-row scale block")
    sc = _Scale.of(scale, scale_block, cfg.block_n, cfg.block_k)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    _, splits = _shares(k, cfg.split_k, cfg.block_k)
    if splits == 1:
        _launch(x, weight, bias, out, None, cfg, sc, x_scale, n, gated)
        return out
    partials = torch.empty(splits, m, weight.shape[0], dtype=torch.float32, device=x.device)
    locks = _lock_buffer(x.device, triton.cdiv(n, cfg.block_n)) if cfg.reduce_in_kernel else None
    _launch(x, weight, bias if locks is not None else None, out, partials, cfg, sc, x_scale, n, gated, locks)
    if locks is None:
        _reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK))](
            partials, bias if bias is not None else partials, out, m, n, out.stride(0), SPLITS=splits,
            HAS_BIAS=bias is not None, GATED=gated, BLOCK=REDUCE_BLOCK, num_warps=4)
    return out


def skinny_partials(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig | None = None) -> torch.Tensor:
    """x W^T as float32 partial sums [splits, M, N] over shares of K, for a caller that adds
    them itself (their sum is the product; one share is the product itself)."""
    _check(x, weight)
    x, weight = _contiguous(x), _contiguous(weight)
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or skinny_config(n, k, sms(x.device))
    partials = torch.empty(_shares(k, cfg.split_k, cfg.block_k)[1], m, n, dtype=torch.float32, device=x.device)
    if m:
        _launch(x, weight, None, None, partials, cfg, _Scale.of(None, None, cfg.block_n, cfg.block_k))
    return partials
