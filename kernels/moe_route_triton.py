"""The MoE router in Triton: softmax, top-k and renormalisation in one launch (`moe.route`'s GPU
twin), and the whole router, logits included, in one launch (`router_triton`).

In torch the router is five or more kernels a layer (softmax, a sorting top-k, the sum and the
division of the renormalisation, the int32 cast): on an H200 they took ~9 µs of a Qwen3-30B-A3B
layer's batch-1 decode step, more than a third of what its experts' GEMMs take
(benchmarks/results/decode_profile_h200_2026-12-02-qwen3-30b-a3b.json).

`route_triton` (`_route_kernel`): one program per token loads its row of router logits, takes
the softmax in float32, picks the k largest by k rounds of max-and-mask (k is small: 2 to 8;
the lowest expert id wins a tie), renormalises over them if asked, and writes the weights
(float32) and expert ids (int32), highest first, as `moe.route` does. The logits may come as
float32 partial sums over shares of the hidden dimension (the router's skinny GEMM,
`linear_triton.skinny_partials`): the program adds them as it loads its row, which saves the
reduction's launch. That pair, two launches, is the router of a decode batch before
`router_triton`, and stays as `dispatch.RouterPath.SKINNY_THEN_ROUTE` for comparison.

`router_triton` (`_router_kernel`): x [T <= 64, H] and the router's weight W [E, H] to the
routing in one launch. Its lifecycle per call:

1. Program (b, s) multiplies ``BLOCK_E`` experts' rows of W (block b) by x over share s of H,
   in float32 (``tl.dot``, W the left operand, x's rows padded to 16), and stores that partial
   [T, BLOCK_E] tile to a scratch buffer [S, T, E]. W is read once, by all the programs: at
   Qwen3-30B-A3B's 128 x 2048, 8 blocks x 8 shares = 64 programs of 8 KB each, so the launch
   pulls W through many SMs at once instead of one program's worth of bandwidth.
2. Each program then counts itself in (an atomic add, acquire-release, after a barrier so its
   whole tile is stored first). The program that arrives last has everyone's partials, and
   finishes (`Finish`): it sums each logit's S partials in share order (a fixed order: the same
   bits every run, no float atomics), rounds the logits to x's dtype as a GEMM in that dtype
   writes them (so the routing does not depend on which path, or how many rows, computed
   them), and routes every row as `_route_kernel` does, a tile of rows at a time. With
   ``Finish.PER_BLOCK`` the sums are spread first: the last share of each expert block to
   arrive sums that block's partials and stores its rounded logits, and the last block to do
   so routes; the same arithmetic in the same order (the same bits), for when one program
   would have too many partials to read alone (many rows).
3. The finisher resets the counts to zero, so the next launch on the stream starts clean.

The counts live in one small int32 buffer per device (`_counters`), made by the first call on
that device outside a CUDA graph capture (the engine warms every graph up eagerly first). The
reset in step 3 makes it reusable, but only by one launch at a time: router launches on a
device must not overlap (the engine runs a step's forward on one stream). A first call under
capture finds no buffer, cannot make one there (it would belong to the graph's memory pool),
and takes the two-launch path instead. `RouterConfig` is the launch shape; `router_config` picks
it from the shape and the SM count.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cache

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


# ---- the whole router in one launch ----------------------------------------------------------

#: Rows of x a one-launch router call takes: a decode batch (more: cuBLAS and `route_triton`).
MAX_ROWS = 64


class Finish(enum.Enum):
    """Who sums the shares' partial logits once every program has stored its own (the same
    sums in the same order either way: only where the work runs differs)."""

    #: The launch's last program to arrive sums every partial and routes every row: the
    #: shortest chain after the products, for few rows (T x E x S floats to read alone).
    LAST_PROGRAM = "last_program"
    #: The last share of each expert block sums that block's partials into rounded logits;
    #: the last block to finish routes from those: two arrivals, but each program reads
    #: 1 / (expert blocks) of the partials, for many rows.
    PER_BLOCK = "per_block"


@dataclass(frozen=True)
class RouterConfig:
    """Launch shape of `router_triton`."""

    #: Experts (rows of W) per program: the MMA's M side.
    block_e: int = 16
    #: Columns of H per loop step.
    block_k: int = 128
    #: Shares of H, each a program of its own.
    split_k: int = 8
    num_warps: int = 4
    num_stages: int = 3
    finish: Finish = Finish.LAST_PROGRAM

    def __post_init__(self) -> None:
        for name in ("block_e", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"RouterConfig.{name} must be a power of two >= 16, got {value}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"RouterConfig: split_k, num_warps and num_stages must be >= 1: {self}")


#: `router_config` spreads the sums (`Finish.PER_BLOCK`) when one finisher would read more
#: partial-sum bytes than this (at 128 experts and 8 shares: from 9 rows on).
FINISH_ALONE_BYTES = 32 << 10


def router_config(num_experts: int, hidden: int, rows: int, num_sms: int) -> RouterConfig:
    """16 experts per program; shares of H doubled while the programs number fewer than the
    SMs and a share keeps at least 256 columns (`linear_triton.skinny_config`'s rule for the
    same matrix: Qwen3-30B-A3B's 128 x 2048 gets 8 x 8 programs, as the two-launch path did).
    The shares depend on the matrix and the GPU only, never on ``rows``: a row's float32 sums,
    and so its routing, are the same whatever the batch. ``rows`` picks only the `Finish`,
    which does not change the arithmetic."""
    block_e = 16
    programs = triton.cdiv(num_experts, block_e)
    split_k = 1
    while programs * split_k < num_sms and hidden // (2 * split_k) >= 256:
        split_k *= 2
    alone = split_k * rows * num_experts * 4
    finish = Finish.PER_BLOCK if split_k > 1 and alone > FINISH_ALONE_BYTES else Finish.LAST_PROGRAM
    return RouterConfig(block_e=block_e, block_k=128, split_k=split_k, finish=finish)


@triton.jit
def _route_rows(src_ptr, plane, T, E, weights_ptr, ids_ptr, SPLITS: tl.constexpr, ROUND: tl.constexpr,
                TOP_K: tl.constexpr, K_PAD: tl.constexpr, ROWS: tl.constexpr, E_PAD: tl.constexpr,
                RENORMALIZE: tl.constexpr):
    """Every row's routing from ``SPLITS`` planes [T, E] of float32 partial logits (``plane``
    apart), summed in plane order and rounded (``ROUND`` as in `_route_kernel`); ``ROWS``
    rows a step, each step `_route_kernel`'s arithmetic on a [ROWS, E] tile."""
    experts = tl.arange(0, E_PAD)
    e_ok = experts < E
    slots = tl.arange(0, K_PAD)
    for r0 in range(0, T, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        r_ok = rows < T
        mask = r_ok[:, None] & e_ok[None, :]
        src = src_ptr + rows[:, None] * E + experts[None, :]
        x = tl.zeros([ROWS, E_PAD], dtype=tl.float32)
        for s in tl.static_range(SPLITS):  # share order: the same sums every run
            x += tl.load(src + s * plane, mask=mask, other=0.0, cache_modifier=".cg")  # L2: other SMs wrote them
        if ROUND == 1:
            x = x.to(tl.bfloat16).to(tl.float32)
        elif ROUND == 2:
            x = x.to(tl.float16).to(tl.float32)
        x = tl.where(e_ok[None, :], x, -float("inf"))
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = tl.where(e_ok[None, :], e / tl.sum(e, axis=1)[:, None], -2.0)  # padding lanes never win
        weights = tl.zeros([ROWS, K_PAD], dtype=tl.float32)
        ids = tl.zeros([ROWS, K_PAD], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(p, axis=1)
            idx = tl.min(tl.where(p == best[:, None], experts[None, :], E_PAD), axis=1)
            weights = tl.where(slots[None, :] == j, best[:, None], weights)
            ids = tl.where(slots[None, :] == j, idx[:, None], ids)
            p = tl.where(experts[None, :] == idx[:, None], -2.0, p)
        if RENORMALIZE:
            weights = weights / tl.sum(tl.where(slots[None, :] < TOP_K, weights, 0.0), axis=1)[:, None]
        out = rows[:, None] * TOP_K + slots[None, :]
        keep = r_ok[:, None] & (slots[None, :] < TOP_K)
        tl.store(weights_ptr + out, weights, mask=keep)
        tl.store(ids_ptr + out, ids, mask=keep)


@triton.jit
def _router_kernel(x_ptr, w_ptr, part_ptr, logit_ptr, count_ptr, weights_ptr, ids_ptr, T, E, K, k_share,
                   stride_xt, stride_we, SPLITS: tl.constexpr, E_BLOCKS: tl.constexpr, PER_BLOCK: tl.constexpr,
                   ROUND: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                   T_PAD: tl.constexpr, ROWS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (b, s): experts b*BLOCK_E.. over share s of K (the module docstring's steps).
    ``count_ptr``: [0] the launch's arrivals (programs, or expert blocks with PER_BLOCK),
    [1 + b] block b's arriving shares (PER_BLOCK); all zero between launches."""
    pid_e = tl.program_id(0)
    share = tl.program_id(1)
    experts = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    rows = tl.arange(0, T_PAD)
    ks = tl.arange(0, BLOCK_K)
    e_ok = experts < E
    t_ok = rows < T
    k_lo = share * k_share
    k_hi = tl.minimum(k_lo + k_share, K)
    w_ptrs = w_ptr + experts[:, None].to(tl.int64) * stride_we + (k_lo + ks)[None, :]
    x_ptrs = x_ptr + rows[None, :].to(tl.int64) * stride_xt + (k_lo + ks)[:, None]
    acc = tl.zeros([BLOCK_E, T_PAD], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = ks < k_hi - k0
        w = tl.load(w_ptrs, mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=k_ok[:, None] & t_ok[None, :], other=0.0)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)  # [experts, rows]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    plane = T * E
    tile = rows[None, :] * E + experts[:, None]  # [experts, rows] in a [T, E] plane
    mask = e_ok[:, None] & t_ok[None, :]
    tl.store(part_ptr + share * plane + tile, acc, mask=mask)
    # Every thread's partial stored before the count says so (the release orders them).
    tl.debug_barrier()
    if PER_BLOCK:
        arrived = tl.atomic_add(count_ptr + 1 + pid_e, 1, sem="acq_rel")
        if arrived == SPLITS - 1:  # this block's last share: its logits, then the block counts in
            logits = tl.zeros([BLOCK_E, T_PAD], dtype=tl.float32)
            for s in tl.static_range(SPLITS):  # share order, as `_route_rows` would add them
                logits += tl.load(part_ptr + s * plane + tile, mask=mask, other=0.0, cache_modifier=".cg")
            if ROUND == 1:
                logits = logits.to(tl.bfloat16).to(tl.float32)
            elif ROUND == 2:
                logits = logits.to(tl.float16).to(tl.float32)
            tl.store(logit_ptr + tile, logits, mask=mask)
            tl.atomic_xchg(count_ptr + 1 + pid_e, 0)
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
            if done == E_BLOCKS - 1:
                _route_rows(logit_ptr, plane, T, E, weights_ptr, ids_ptr, 1, 0, TOP_K, K_PAD, ROWS, E_PAD,
                            RENORMALIZE)
                tl.atomic_xchg(count_ptr, 0)
    else:
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if done == E_BLOCKS * SPLITS - 1:
            _route_rows(part_ptr, plane, T, E, weights_ptr, ids_ptr, SPLITS, ROUND, TOP_K, K_PAD, ROWS, E_PAD,
                        RENORMALIZE)
            tl.atomic_xchg(count_ptr, 0)


#: Arrival counts per device: [0] a launch's, [1 + b] expert block b's (so up to
#: COUNTERS - 1 expert blocks). Zero between launches (the finisher resets them).
COUNTERS = 1024
_counts: dict[int, torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor | None:
    """The arrival counts for a launch on ``device``, or None when the first call on it is
    being captured into a CUDA graph (a buffer made there would belong to the graph's pool).
    One buffer per device, not per stream: the engine warms its graphs up on other streams
    than it captures on, and one launch at a time uses it (see the module docstring)."""
    from splitserve.kernels.linear_triton import arrival_counts

    return arrival_counts(_counts, device, COUNTERS)


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small grid
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def router_triton(x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool,
                  config: RouterConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe.route` of the logits ``x weight^T`` rounded to x's dtype, in one launch: x [T <=
    MAX_ROWS, H], weight [E, H] of x's dtype -> (weights [T, k] float32, expert ids [T, k]
    int32), highest first. ``config``: the launch shape (default `router_config`'s)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or x.dtype != weight.dtype:
        raise ValueError(f"router: x {x.dtype} {tuple(x.shape)} and weight {weight.dtype} {tuple(weight.shape)} "
                         "disagree")
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if num_tokens > MAX_ROWS:
        raise ValueError(f"router: {num_tokens} rows, at most {MAX_ROWS}")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    cfg = config or router_config(num_experts, hidden, num_tokens, _sms(x.device))
    e_blocks = triton.cdiv(num_experts, cfg.block_e)
    if e_blocks >= COUNTERS:
        raise ValueError(f"router: {e_blocks} expert blocks, at most {COUNTERS - 1}")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=x.device)
    if num_tokens == 0:
        return weights, ids
    counts = _counters(x.device)
    if counts is None:  # captured before any eager call: the two launches, which need no counts
        from splitserve.kernels import linear_triton

        return route_triton(linear_triton.skinny_partials(x, weight), top_k, renormalize, logits_dtype=x.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    # Shares: every one but the last a whole number of loop steps (as the skinny kernel's).
    k_share = triton.cdiv(triton.cdiv(hidden, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(hidden, k_share)
    per_block = cfg.finish is Finish.PER_BLOCK and splits > 1
    partials = torch.empty(splits, num_tokens, num_experts, dtype=torch.float32, device=x.device)
    logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device) if per_block else partials
    e_pad = triton.next_power_of_2(num_experts)
    _router_kernel[(e_blocks, splits)](
        x, weight, partials, logits, counts, weights, ids, num_tokens, num_experts, hidden, k_share,
        x.stride(0), weight.stride(0), SPLITS=splits, E_BLOCKS=e_blocks, PER_BLOCK=per_block,
        ROUND=_ROUND.get(x.dtype, 0), TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
        T_PAD=max(16, triton.next_power_of_2(num_tokens)),
        # The finisher's tile: up to 2048 logits (16 rows of 128 experts) a step.
        ROWS=min(triton.next_power_of_2(num_tokens), max(1, 2048 // e_pad)), E_PAD=e_pad,
        BLOCK_E=cfg.block_e, BLOCK_K=cfg.block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 inputs: no TF32 rounding
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return weights, ids
