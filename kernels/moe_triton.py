"""The fused MoE layer in Triton: the CUDA path beside `moe.py` (`fused_moe_ref`).

One call, four launches (three at one or two tokens), no host synchronisation (so it
records into a CUDA graph):

1. **align** (`align_by_expert`): the (token, slot) pairs, ``pair = t * top_k + j``, sorted
   by local expert, each expert's run padded up to a multiple of ``block_m`` rows. Out come
   ``sorted_pairs`` (the pair of each padded row; padding rows hold ``num_pairs``) and
   ``block_expert`` (the expert of each ``block_m``-row block; -1 for blocks past the last
   expert's run). Pairs whose id falls outside ``[expert_offset, expert_offset + E_local)``
   (another rank's experts) get no row. The number of blocks depends on the routing, so the
   buffers are sized for the worst case (every non-empty expert wastes ``block_m - 1`` rows)
   and the spare blocks exit at once. Up to `ALIGN_TRITON_MAX_PAIRS` pairs this is one
   single-program Triton kernel (a decode step: a handful of torch ops would cost more in
   launches than the kernel does); above it, torch ops (argsort, scatter), whose launches
   are nothing next to a prefill's GEMMs. Both give the same layout: within an expert, pairs
   in token order. Up to `DIRECT_MAX_TOKENS` tokens there is no alignment at all: block b
   is pair b alone, its expert read from the ids by the GEMM kernels. (Down and combine as
   one per-token kernel of vector-matrix products was tried there: slower, 31 against 27 us
   at one token on an H200, for want of tensor-core tiles and programs; so was combining in
   the down kernel's last program per tile: no faster than the combine launch.)
2. **gate_up** (`_gate_up_kernel`): program (block, n) multiplies its block's rows of x
   (gathered by token) with the gate and the up tile ``n`` of the block's expert, together,
   and writes ``silu(gate) * up`` (float32 accumulation, rounded once to x's dtype) into
   row ``block * block_m + i`` of the intermediate [rows, I].
3. **down** (`_down_kernel`): program (block, n) multiplies the block's intermediate rows
   with the expert's ``w2`` tile ``n``, scales each row by its routing weight and writes it
   to its pair's slot of ``slots`` [T * top_k, H].
4. **combine** (`_combine_kernel`): ``out[t] = sum_j slots[t * top_k + j]`` over the slots
   whose expert is local, in float32: no atomics, the same order every run, and the
   skipped slots are never read (so ``slots`` needs no zeroing). With ``defer_combine`` the
   call stops before it and returns the slots (`moe.ExpertSlots`): a layer with no tp peers
   leaves the sum to the next residual add + RMSNorm (`norm_triton`), which does the same
   float32 sum in its own launch, one launch fewer a layer.

FP8 experts (`moe.ExpertWeights` with a scheme) run weight-only up to `W8A8_MIN_PAIRS` pairs
(decode): gate_up and down load e4m3 tiles and widen them in registers (to float16, one
instruction, x saturated to float16's range; or to x's dtype), half the bytes of bf16 for the
memory-bound sizes. Above it (prefill) they run W8A8: x and the intermediate are quantized per
token (per token and K group for block scales) by launches of their own, and the products are
e4m3 x e4m3. Per-row scales multiply the float32 sums once after the loop; block scales multiply
each step's product (the launch narrows its tiles to the scale block, so one scalar serves a
step). The CPU path (`moe.fused_moe_ref` through `dispatch.fused_moe`) is always weight-only, so
CPU and GPU numerics differ for batches past the threshold.

Each block streams its expert's weights; at decode an active expert is one block, so its
weights are read from HBM once per call (prefill's several blocks per expert share them
through L2). A decode step is thus memory bound, and the launch
shape is chosen by the number of pairs (`moe_config`): small blocks and narrow tiles at
decode, for enough programs to keep the HBM busy; larger tiles for prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
import triton
import triton.language as tl

from splitserve.kernels.fp8 import Fp8Scheme
from splitserve.kernels.moe import ExpertSlots, ExpertWeights

#: Up to this many (token, slot) pairs the alignment is the single-program Triton kernel.
#: Its time grows with the pairs (a serial loop: on an H200 3 us at 32 pairs, 25 us at 512,
#: 86 us at 2048), the torch ops' hardly (65 us at 32, 100 us at 2048, 150 us at 16k).
ALIGN_TRITON_MAX_PAIRS = 2048
#: Pairs per step of the alignment kernel's loop (a [chunk, experts] one-hot in registers), by
#: pairs: 64 up to 64 pairs, 128 above (on an H200, 4 warps: 5.0 against 5.6 us at 64 pairs with
#: 32, 21 against 26 us at 512, 65 against 87 us at 2048; 8 or 16 warps, or chunks of 256, were
#: slower;
#: benchmarks/decode_kernel_sweep.py, 2026-12-02).
ALIGN_CHUNK_SMALL_MAX = 64


def align_chunk(num_pairs: int) -> int:
    return 64 if num_pairs <= ALIGN_CHUNK_SMALL_MAX else 128


#: Up to this many tokens there is no alignment: each (token, slot) pair is a block of its
#: own. A token's k experts are distinct (top-k), so at one token no expert is read twice;
#: at two, the few experts both tokens chose (0.5 of 8 of 128, on average) cost less
#: re-read than the alignment launch does (3.6 us against ~1 us on an H200).
DIRECT_MAX_TOKENS = 2


#: From this many (token, slot) pairs FP8 experts run W8A8 (activations quantized, e4m3 x e4m3
#: products) instead of weight-only. On an H200 at Qwen3-30B-A3B's shape (moe_kernel_bench
#: --fp8, CUDA graphs, per-row scales, 2026-12-03): at 1 to 64 tokens (8 to 512 pairs) the two
#: are within 2% (22.3 / 22.2 us at one token, 191 / 194 at 64) and weight-only keeps the
#: activations' precision; at 256 tokens W8A8 256 against 312 us (bf16 378); at 16384, 2667
#: against 5309 (bf16 3562): widened e4m3 tiles cost the tensor cores a round trip through
#: registers that e4m3 x e4m3 products do not.
W8A8_MIN_PAIRS = 1024


@dataclass(frozen=True)
class MoeConfig:
    """Launch shape of the fused MoE kernels. Written and read as
    ``"block_m=16,n1=32,k1=128,n2=64,k2=128,warps=4,stages=4"`` (`parse`, `spec`)."""

    #: Rows per block: every expert's run is padded to a multiple (at least 16, tl.dot's tile).
    block_m: int = 16
    #: gate_up: intermediate columns per program (each of gate and up), hidden columns per step.
    block_n1: int = 32
    block_k1: int = 128
    #: down: hidden columns per program, intermediate columns per step.
    block_n2: int = 64
    block_k2: int = 128
    num_warps: int = 4
    num_stages: int = 4

    KEYS: ClassVar[dict[str, str]] = {
        "block_m": "block_m", "n1": "block_n1", "k1": "block_k1", "n2": "block_n2", "k2": "block_k2",
        "warps": "num_warps", "stages": "num_stages",
    }

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "num_stages":
                if value < 1:
                    raise ValueError(f"MoeConfig.num_stages must be >= 1, got {value}")
            elif value < 1 or value & (value - 1) or (f.name != "num_warps" and value < 16):
                raise ValueError(f"MoeConfig.{f.name} must be a power of two (tiles at least 16), got {value}")

    @classmethod
    def parse(cls, spec: str, base: "MoeConfig | None" = None) -> "MoeConfig":
        values = {f.name: getattr(base or cls(), f.name) for f in fields(cls)}
        for item in filter(None, (s.strip() for s in spec.replace(";", ",").split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in cls.KEYS:
                raise ValueError(f"MoeConfig spec item {item!r}: expected one of {sorted(cls.KEYS)} = int")
            try:
                values[cls.KEYS[key.strip()]] = int(value)
            except ValueError:
                raise ValueError(f"MoeConfig spec item {item!r}: not an integer") from None
        return cls(**values)

    def spec(self) -> str:
        names = {v: k for k, v in self.KEYS.items()}
        return ",".join(f"{names[f.name]}={getattr(self, f.name)}" for f in fields(self))


#: By pairs (tokens x top_k), smallest first: the first whose bound is >= the call's pairs.
#: Decode sizes are memory bound (narrow tiles: more programs streaming weights); prefill
#: sizes compute bound (wide tiles, more reuse of each weight tile).
#: Chosen from benchmarks/moe_kernel_bench.py on an H200 at Qwen3-30B-A3B's shape
#: (2026-12-02): at 1 and 8 tokens gate_up and down each run within 8% of the time their
#: weights take to read at copy bandwidth; the whole call is within 1.15x of its floor at
#: 8 to 64 tokens, 1.5x at one (three launches for 18 us of reading).
CONFIGS: tuple[tuple[int, MoeConfig], ...] = (
    (64, MoeConfig()),
    (512, MoeConfig(block_n1=64, block_k1=128, block_n2=64, block_k2=128)),
    (4096, MoeConfig(block_m=32, block_n1=64, block_k1=128, block_n2=64, block_k2=128)),
    (1 << 62, MoeConfig(block_m=128, block_n1=64, block_k1=64, block_n2=128, block_k2=64, num_warps=8,
                        num_stages=3)),
)


#: W8A8 (FP8 experts from `W8A8_MIN_PAIRS` pairs) beyond this many pairs: 128 x 128 tiles over
#: 128-deep steps, which e4m3 operands fit in shared memory (bf16 ones do not). On an H200 at
#: Qwen3-30B-A3B's shape (moe_kernel_bench --fp8, 2026-12-03): 2048 tokens 561 against 640 us
#: with `CONFIGS`' shape (per-row scales; 634 against 868 with blocks), 16384 tokens 2298
#: against 2667 (2799 against 3935); at 256 tokens `CONFIGS`' shape is as fast (256 against 278).
W8A8_WIDE_PAIRS = 4096
W8A8_WIDE = MoeConfig(block_m=128, block_n1=128, block_k1=128, block_n2=128, block_k2=128, num_warps=8,
                      num_stages=3)


#: Hopper's shared memory a program may use (227 KiB): float32 operands take twice bf16's.
SHARED_MEMORY_LIMIT = 232448


def moe_config(num_pairs: int, w8a8: bool = False, itemsize: int = 2) -> MoeConfig:
    """The launch shape for ``num_pairs`` pairs (``w8a8``: FP8 experts run as W8A8) of
    ``itemsize``-byte activations and weights. The tables are for 16-bit operands; float32 ones
    (a float32 model) step through half as much K a stage, so that the pipelined tiles still fit
    in shared memory (at 512-4096 pairs the bf16 shape would need 240 KiB in float32:
    tests/kernels/test_moe_triton_sm90.py compiles every shape and checks)."""
    if w8a8 and num_pairs > W8A8_WIDE_PAIRS:
        return W8A8_WIDE
    cfg = next(cfg for bound, cfg in CONFIGS if num_pairs <= bound)
    if itemsize > 2:
        cfg = replace(cfg, block_k1=max(16, cfg.block_k1 // 2), block_k2=max(16, cfg.block_k2 // 2))
    return cfg


def pair_bounds() -> tuple[int, ...]:
    """The pair counts where the call's launches change (a launch shape, W8A8, the alignment's
    implementation or chunk), for a warm-up that compiles each side of every one
    (`dispatch.warm_up_token_counts`); `DIRECT_MAX_TOKENS` counts tokens and is not here."""
    return tuple(sorted({bound for bound, _ in CONFIGS[:-1]} | {
        W8A8_MIN_PAIRS, W8A8_WIDE_PAIRS, ALIGN_TRITON_MAX_PAIRS, ALIGN_CHUNK_SMALL_MAX}))


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks the padded layout can need: each non-empty expert (at most min(E, pairs) of
    them) pads its run by at most block_m - 1 rows."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


# ---- 1. align -------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_pairs", "num_rows", "num_blocks"])
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_pairs, expert_offset, num_experts, num_rows,
                  num_blocks, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    experts = tl.arange(0, E_PAD)
    lanes = tl.arange(0, CHUNK)
    # Pass 1: tokens per expert.
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        p = start + lanes
        e = tl.load(ids_ptr + p, mask=p < num_pairs, other=0) - expert_offset
        valid = (p < num_pairs) & (e >= 0) & (e < num_experts)
        onehot = ((e[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)
        counts += tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    row_start = tl.cumsum(padded, 0) - padded
    block_end = tl.cumsum(padded // BLOCK_M, 0)
    # Block b belongs to the first expert whose blocks end after b; past the last, to none.
    for start in range(0, num_blocks, CHUNK):
        b = start + lanes
        owner = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(owner < num_experts, owner, -1), mask=b < num_blocks)
    # Padding rows hold num_pairs; the real rows overwrite theirs below (after the barrier:
    # another thread of the program may store the same row).
    for start in range(0, num_rows, CHUNK):
        r = start + lanes
        tl.store(sorted_ptr + r, tl.zeros([CHUNK], dtype=tl.int32) + num_pairs, mask=r < num_rows)
    tl.debug_barrier()
    # Pass 2: each pair's row = its expert's first row + how many pairs of that expert precede it.
    seen = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        p = start + lanes
        e = tl.load(ids_ptr + p, mask=p < num_pairs, other=0) - expert_offset
        valid = (p < num_pairs) & (e >= 0) & (e < num_experts)
        onehot = ((e[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)
        before = tl.cumsum(onehot, 0) - onehot + seen[None, :]
        row = tl.sum(onehot * (row_start[None, :] + before), axis=1)
        tl.store(sorted_ptr + row, p.to(tl.int32), mask=valid)
        seen += tl.sum(onehot, axis=0)


def _align_torch(ids: torch.Tensor, num_experts: int, expert_offset: int, block_m: int, num_rows: int,
                 num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_align_kernel`'s layout from torch ops, without a host sync (no boolean indexing,
    no bincount): for calls with many pairs."""
    device = ids.device
    num_pairs = ids.numel()
    local = ids.reshape(-1).long() - expert_offset
    key = torch.where((local >= 0) & (local < num_experts), local, num_experts)  # E: not ours
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    # Foreign pairs go to a spare row, cut off below. (Tensors, not item assignments: those
    # copy from the host, which a CUDA graph capture refuses.)
    row_start = torch.cat([torch.cumsum(padded, 0) - padded, padded.new_full((1,), num_rows)])
    order = torch.argsort(key, stable=True)
    key_sorted = key[order]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - first[key_sorted]
    row = torch.where(key_sorted < num_experts, row_start[key_sorted] + rank, num_rows)
    sorted_pairs = torch.full((num_rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[row] = order.to(torch.int32)
    block_end = torch.cumsum(padded // block_m, 0)
    owner = torch.searchsorted(block_end, torch.arange(num_blocks, device=device), right=True)
    block_expert = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    return sorted_pairs[:num_rows], block_expert


def align_by_expert(ids: torch.Tensor, num_experts: int, expert_offset: int, block_m: int,
                    use_kernel: bool | None = None, chunk: int | None = None,
                    num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs int32 [blocks * block_m], block_expert int32 [blocks]) for ids [T, k]:
    see the module docstring. ``use_kernel`` forces one implementation (tests); ``chunk`` and
    ``num_warps`` shape the kernel (benchmarks)."""
    num_pairs = ids.numel()
    num_blocks = max_blocks(num_pairs, num_experts, block_m)
    num_rows = num_blocks * block_m
    if use_kernel is None:
        use_kernel = num_pairs <= ALIGN_TRITON_MAX_PAIRS
    if not use_kernel:
        return _align_torch(ids, num_experts, expert_offset, block_m, num_rows, num_blocks)
    flat = ids.reshape(-1).to(torch.int32)
    sorted_pairs = torch.empty(num_rows, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
    _align_kernel[(1,)](flat, sorted_pairs, block_expert, num_pairs, expert_offset, num_experts, num_rows,
                        num_blocks, BLOCK_M=block_m, CHUNK=chunk or align_chunk(num_pairs),
                        E_PAD=max(16, triton.next_power_of_2(num_experts)), num_warps=num_warps)
    return sorted_pairs, block_expert


# ---- 2. gate_up, 3. down ----------------------------------------------------------------------


@triton.jit
def _block_rows(block, rows, sorted_ptr, block_expert_ptr, ids_ptr, num_pairs, expert_offset, DIRECT: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """(local expert, pair of each row) of a block: from the alignment, or (direct) block b
    is pair b alone, its expert read from the ids."""
    if DIRECT:
        expert = tl.load(ids_ptr + block) - expert_offset
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, block, num_pairs)
    else:
        expert = tl.load(block_expert_ptr + block)
        pair = tl.load(sorted_ptr + rows)
    return expert, pair


@triton.jit
def _scaled_step(a, w, acc, s_ptr, a_scale, SCALE: tl.constexpr, PRECISION: tl.constexpr, DOT_F16: tl.constexpr,
                 A8: tl.constexpr):
    """acc + a w for one K step. Weight-only, an e4m3 weight tile is widened first: to float16
    (DOT_F16: one instruction; x saturated to float16's range) or to x's dtype. W8A8 (A8), a is
    e4m3 too and the product is e4m3 x e4m3. With block scales the product is multiplied by the
    tile's one weight scale (SCALE 2: a tile never crosses a scale block) and, W8A8, by each
    row's activation scale of this K group (``a_scale`` [BLOCK_M]); otherwise it accumulates
    inside the MMA, but for W8A8's per step (per-row scales are applied after the loop). (One return, branches on
    constexprs only: what Triton's code generator accepts.)"""
    if A8:
        pass
    elif DOT_F16:
        a = tl.clamp(a.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        w = w.to(tl.float16)
    else:
        w = w.to(a.dtype)
    if SCALE == 2:
        step = tl.dot(a, w, input_precision=PRECISION) * tl.load(s_ptr)
        if A8:
            step = step * a_scale[:, None]
        acc += step
    elif A8:
        # Hopper's e4m3 MMAs keep fewer than float32's bits across a chained K loop: each step's
        # product joins the float32 sum on its own (every BLOCK_K, as the block-scaled path does).
        acc += tl.dot(a, w)
    else:
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _a_scale(xs_ptr, row, real, k0, stride_xsm, SCALE: tl.constexpr, SCALE_BK: tl.constexpr, A8: tl.constexpr):
    """W8A8: each row's activation scale for the K step at ``k0`` (block scheme: its K group's;
    per-row scheme: the token's one scale, [BLOCK_M]); weight-only: a placeholder."""
    if A8:
        if SCALE == 2:
            scale = tl.load(xs_ptr + row * stride_xsm + k0 // SCALE_BK, mask=real, other=0.0)
        else:
            scale = tl.load(xs_ptr + row * stride_xsm, mask=real, other=0.0)
    else:
        scale = tl.zeros_like(row).to(tl.float32)
    return scale


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_kernel(x_ptr, w13_ptr, out_ptr, sorted_ptr, block_expert_ptr, ids_ptr, s_ptr, xs_ptr, num_pairs, top_k,
                    inter, hidden, expert_offset, num_experts, stride_xt, stride_we, stride_wn, stride_ot, stride_se,
                    stride_sn, stride_sk, stride_xsm, up_block_rows, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                    SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr, DOT_F16: tl.constexpr,
                    A8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    expert, pair = _block_rows(block, rows, sorted_ptr, block_expert_ptr, ids_ptr, num_pairs, expert_offset,
                               DIRECT, BLOCK_M)
    if (expert < 0) | (expert >= num_experts):  # a spare block, or (direct) another rank's expert
        return
    real = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xt + ks[None, :]
    # Weight tiles are read [K, N] from the [N, K] rows of w13 (K contiguous).
    g_ptrs = w13_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    u_ptrs = g_ptrs + inter * stride_wn
    # Scales: per row, gate's at [e, n] and up's at [e, inter + n]; per block, gate's block row
    # n // SCALE_BN and up's up_block_rows further (each part's blocks start at its row 0).
    s_base = s_ptr + expert.to(tl.int64) * stride_se
    sg_ptr = s_base + (col0 // SCALE_BN) * stride_sn
    su_ptr = sg_ptr + up_block_rows * stride_sn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        a = tl.load(a_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_scale = _a_scale(xs_ptr, token, real, k0, stride_xsm, SCALE, SCALE_BK, A8 and SCALE == 2)
        gate = _scaled_step(a, wg, gate, sg_ptr + (k0 // SCALE_BK) * stride_sk, a_scale, SCALE, PRECISION, DOT_F16,
                            A8)
        up = _scaled_step(a, wu, up, su_ptr + (k0 // SCALE_BK) * stride_sk, a_scale, SCALE, PRECISION, DOT_F16, A8)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if SCALE == 1:
        if A8:
            row_scale = _a_scale(xs_ptr, token, real, 0, stride_xsm, SCALE, SCALE_BK, A8)
            gate *= row_scale[:, None]
            up *= row_scale[:, None]
        gate *= tl.load(s_base + cols * stride_sn, mask=col_ok, other=0.0)[None, :]
        up *= tl.load(s_base + (inter + cols) * stride_sn, mask=col_ok, other=0.0)[None, :]
    act = gate / (1.0 + tl.exp(-gate)) * up
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_ot + cols[None, :]
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=real[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(h_ptr, w2_ptr, slots_ptr, weights_ptr, sorted_ptr, block_expert_ptr, ids_ptr, s_ptr, xs_ptr,
                 num_pairs, hidden, inter, expert_offset, num_experts, stride_ht, stride_we, stride_wn, stride_st,
                 stride_se, stride_sn, stride_sk, stride_xsm, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                 SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr, DOT_F16: tl.constexpr,
                 A8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    expert, pair = _block_rows(block, rows, sorted_ptr, block_expert_ptr, ids_ptr, num_pairs, expert_offset,
                               DIRECT, BLOCK_M)
    if (expert < 0) | (expert >= num_experts):
        return
    real = pair < num_pairs
    col0 = tl.program_id(1) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    hrow = rows.to(tl.int64)
    a_ptrs = h_ptr + hrow[:, None] * stride_ht + ks[None, :]
    w_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    s_base = s_ptr + expert.to(tl.int64) * stride_se
    sb_ptr = s_base + (col0 // SCALE_BN) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = ks < inter - k0
        a = tl.load(a_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_scale = _a_scale(xs_ptr, hrow, real, k0, stride_xsm, SCALE, SCALE_BK, A8 and SCALE == 2)
        acc = _scaled_step(a, w, acc, sb_ptr + (k0 // SCALE_BK) * stride_sk, a_scale, SCALE, PRECISION, DOT_F16, A8)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SCALE == 1:
        if A8:
            acc *= _a_scale(xs_ptr, hrow, real, 0, stride_xsm, SCALE, SCALE_BK, A8)[:, None]
        acc *= tl.load(s_base + cols * stride_sn, mask=col_ok, other=0.0)[None, :]
    weight = tl.load(weights_ptr + pair, mask=real, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = slots_ptr + pair[:, None].to(tl.int64) * stride_st + cols[None, :]
    tl.store(out_ptrs, acc.to(slots_ptr.dtype.element_ty), mask=real[:, None] & col_ok[None, :])


# ---- 4. combine -------------------------------------------------------------------------------


@triton.jit
def _combine_kernel(slots_ptr, ids_ptr, out_ptr, top_k, hidden, expert_offset, num_experts, stride_st, stride_ot,
                    BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, top_k):
        e = tl.load(ids_ptr + token * top_k + j) - expert_offset
        if (e >= 0) & (e < num_experts):
            acc += tl.load(slots_ptr + (token * top_k + j) * stride_st + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


COMBINE_BLOCK = 1024


@dataclass(frozen=True)
class _Scales:
    """How the kernels read one weight's scales: the kind (0 none, 1 per row, 2 per block), the
    tensor (a placeholder when none) and its strides (expert, row, column), and the block."""

    kind: int
    tensor: torch.Tensor
    strides: tuple[int, int, int]
    block: tuple[int, int]

    @classmethod
    def of(cls, scale: torch.Tensor | None, scheme: Fp8Scheme | None, block: tuple[int, int],
           placeholder: torch.Tensor) -> "_Scales":
        if scheme is None:
            return cls(0, placeholder, (0, 0, 0), (1, 1))
        if scheme is Fp8Scheme.CHANNEL:  # [E, N]: the row stride is the column one
            return cls(1, scale, (scale.stride(0), scale.stride(1), 0), (1, 1))
        return cls(2, scale, (scale.stride(0), scale.stride(1), scale.stride(2)), block)


def _activations(a: torch.Tensor, experts: ExpertWeights, w8a8: bool,
                 placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEMM's left operand and its scales: W8A8, ``a`` quantized per row (per row and K group
    of the weights' block width); otherwise ``a`` itself and a placeholder. On a GPU by
    `fp8_triton`'s one-pass kernels; on the CPU by `fp8`'s torch functions, which compute the
    same values (Triton's interpreter, unpatched, rounds values that round up across a power of
    two to the power below: 126.6 -> 64 instead of 128; the tests' fixture patches it, a
    benchmark's smoke run does not). Rows of the padded intermediate that no pair wrote are
    quantized too (never read: the down kernel masks them)."""
    if not w8a8:
        return a, placeholder
    if a.device.type == "cuda":
        from splitserve.kernels import fp8_triton as quant
    else:
        from splitserve.kernels import fp8 as quant
    if experts.scheme is Fp8Scheme.BLOCK:
        q, scale = quant.quantize_per_token_group(a, experts.block[1])
        return q, scale.contiguous()
    q, scale = quant.quantize_per_token(a)
    return q, scale.reshape(-1).contiguous()


def launch_tiles(cfg: MoeConfig, experts: ExpertWeights) -> MoeConfig:
    """``cfg`` with tiles that never cross a scale block (BLOCK scheme: no wider than it)."""
    if experts.scheme is not Fp8Scheme.BLOCK:
        return cfg
    bn, bk = experts.block
    if bn & (bn - 1) or bk & (bk - 1) or min(bn, bk) < 16:
        raise ValueError(f"fused_moe: FP8 scale blocks {experts.block} must be powers of two of at least 16")
    return replace(cfg, block_n1=min(cfg.block_n1, bn), block_k1=min(cfg.block_k1, bk),
                   block_n2=min(cfg.block_n2, bn), block_k2=min(cfg.block_k2, bk))


def fused_moe_triton(x: torch.Tensor, experts: ExpertWeights, weights: torch.Tensor, ids: torch.Tensor,
                     expert_offset: int = 0, config: MoeConfig | None = None,
                     dot_f16: bool | None = None, w8a8: bool | None = None,
                     defer_combine: bool = False) -> torch.Tensor | ExpertSlots:
    """`fused_moe_ref`'s call: x [T, H], the experts (float or FP8: `ExpertWeights`), routing
    weights float32 [T, k] and ids int32 [T, k] -> [T, H] in x's dtype. ``config`` overrides
    `moe_config` (benchmarks). FP8 experts run weight-only, their tiles widened to float16
    (``dot_f16``, default for 16-bit x: one instruction, x saturated to float16's range) or to
    x's dtype; or, from `W8A8_MIN_PAIRS` pairs (``w8a8`` overrides), W8A8: x and the
    intermediate quantized per token (per token and K group for block scales) by their own
    launches, e4m3 x e4m3 products (`fused_moe_ref` with ``quantize_activations``).
    ``defer_combine``: return the weighted slots (`ExpertSlots`) for the next residual add +
    RMSNorm to sum, instead of summing them in a launch of their own."""
    num_tokens, hidden = x.shape
    w13, w2 = experts.w13, experts.w2
    num_experts, inter = experts.num_local, experts.intermediate
    top_k = ids.shape[1]
    if w13.shape[2] != hidden:
        raise ValueError(f"fused_moe: x {tuple(x.shape)} and w13 {tuple(w13.shape)} disagree")
    out = torch.empty_like(x)
    if num_tokens == 0:
        return ExpertSlots(out.new_empty(0, hidden), ids, expert_offset, num_experts) if defer_combine else out
    num_pairs = num_tokens * top_k
    if dot_f16 and not experts.quantized:
        raise ValueError("fused_moe: dot_f16 widens e4m3 weights; these experts are float")
    if dot_f16 is None:
        dot_f16 = experts.quantized and x.dtype in (torch.float16, torch.bfloat16)
    if w8a8 is None:
        w8a8 = experts.quantized and num_pairs >= W8A8_MIN_PAIRS
    if w8a8 and not experts.quantized:
        raise ValueError("fused_moe: W8A8 needs FP8 experts")
    cfg = launch_tiles(config or moe_config(num_pairs, w8a8, x.element_size()), experts)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    ids = ids.contiguous()
    weights = weights.to(torch.float32).contiguous()
    s13 = _Scales.of(experts.w13_scale, experts.scheme, experts.block, weights)
    s2 = _Scales.of(experts.w2_scale, experts.scheme, experts.block, weights)
    direct = num_tokens <= DIRECT_MAX_TOKENS
    if direct:  # no alignment: block b is pair b (the buffers are unread placeholders)
        sorted_pairs = block_expert = ids
        num_blocks = num_pairs
    else:
        sorted_pairs, block_expert = align_by_expert(ids, num_experts, expert_offset, cfg.block_m)
        num_blocks = block_expert.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "DIRECT": direct, "PRECISION": precision,
              "DOT_F16": dot_f16 and not w8a8, "A8": w8a8, "BLOCK_M": cfg.block_m}
    a, a_scale = _activations(x, experts, w8a8, weights)
    h = torch.empty(num_blocks * cfg.block_m, inter, dtype=x.dtype, device=x.device)
    up_block_rows = triton.cdiv(inter, s13.block[0]) if s13.kind == 2 else 0
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, cfg.block_n1))](
        a, w13, h, sorted_pairs, block_expert, ids, s13.tensor, a_scale, num_pairs, top_k, inter, hidden,
        expert_offset, num_experts, a.stride(0), w13.stride(0), w13.stride(1), h.stride(0), *s13.strides,
        a_scale.stride(0), up_block_rows, SCALE=s13.kind, SCALE_BN=s13.block[0], SCALE_BK=s13.block[1],
        BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1, **launch)
    h, h_scale = _activations(h, experts, w8a8, weights)
    slots = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(num_blocks, triton.cdiv(hidden, cfg.block_n2))](
        h, w2, slots, weights, sorted_pairs, block_expert, ids, s2.tensor, h_scale, num_pairs, hidden, inter,
        expert_offset, num_experts, h.stride(0), w2.stride(0), w2.stride(1), slots.stride(0), *s2.strides,
        h_scale.stride(0), SCALE=s2.kind, SCALE_BN=s2.block[0], SCALE_BK=s2.block[1], BLOCK_N=cfg.block_n2,
        BLOCK_K=cfg.block_k2, **launch)
    pending = ExpertSlots(slots, ids, expert_offset, num_experts)
    return pending if defer_combine else combine_slots(pending, out)


def combine_slots(pending: ExpertSlots, out: torch.Tensor | None = None) -> torch.Tensor:
    """The combine launch: [T, H] in the slots' dtype (into ``out`` if given)."""
    num_tokens, hidden = pending.shape
    slots, ids = pending.slots, pending.ids
    out = torch.empty(num_tokens, hidden, dtype=slots.dtype, device=slots.device) if out is None else out
    if num_tokens:
        _combine_kernel[(num_tokens, triton.cdiv(hidden, COMBINE_BLOCK))](
            slots, ids, out, ids.shape[1], hidden, pending.expert_offset, pending.num_local, slots.stride(0),
            out.stride(0), BLOCK=COMBINE_BLOCK, num_warps=4)
    return out
