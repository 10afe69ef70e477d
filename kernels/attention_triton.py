"""Attention over the paged KV cache in Triton: the CUDA path beside `attention.py`.

Same cache layout and semantics as the references (``[num_blocks, block_size, num_kv_heads,
head_dim]`` per layer and per K/V; token ``i`` of a sequence at slot
``block_table[i // bs] * bs + i % bs``; key j visible to query i iff ``j <= i`` and, with a
sliding window, ``i - j < sliding_window``).

Decode (`paged_decode_attention`): one program per (KV head, context split, sequence), KV
heads fastest so that the programs reading the same pages run side by side. The program holds
every query head of its KV head (GQA: the group, padded to 16 rows, is the M side of a
``tl.dot``), so each K/V row is read from memory once for the whole group. With
``DecodeConfig.swap`` the step is computed transposed: S^T = K Q^T and O^T += V^T P^T, so the
K and V^T tiles (converted in registers when the cache is FP8) are the MMAs' left operands, read
from registers with the block of tokens as the MMA's M side, and the group's queries and
probabilities, 16 columns wide, are the small right ones. A loop step gathers
``block_n`` tokens from ``block_n / block_size`` pages; the page ids are loaded one step ahead
(a loop-carried tensor), so the K/V addresses never wait on a table load in the same step and
Triton's pipeliner can keep ``num_stages - 1`` K/V tiles in flight while it computes (with the
table load in the same step it treats K/V as indirect loads, single-buffers them and
serialises load and compute). Long contexts, and batches too small to fill the GPU, are cut
into splits ("flash-decoding"); each split writes its unnormalised partial output with its
running max and sum, and a second kernel merges them. With `DecodeConfig.merge_in_kernel`
the last program of each (sequence, KV head) to finish (an arrival count per pair, zeroed
again by that program) merges them instead, one launch (measured slower on an H200: off by
default). With one split the kernel writes the output directly. The launch shape (`DecodeConfig`) is tuned by
``benchmarks/decode_attention_sweep.py`` (FP8 caches have their own, `DECODE_FP8`);
``SPLITSERVE_DECODE_CONFIG`` (and ``SPLITSERVE_DECODE_CONFIG_FP8``) override the defaults.

Prefill (`paged_prefill_attention_ragged`): every prefill chunk of a step in one launch. One
program per (query tile, sequence, query head); the chunk's queries sit at absolute positions
``cached_len + i``, its keys are the cached prefix plus the chunk itself, read through the
block table. When no chunk has a cached prefix the keys can be read straight from the new K/V
rows (``k_new``/``v_new``), as the reference does. `paged_prefill_attention` keeps the
reference's one-chunk signature on top of it.

FP8 caches (``k_scale``/``v_scale``: float32 [Hk], `attention.py`'s convention): K/V tiles are
loaded as e4m3 and converted to float16 (exact; the queries and probabilities are rounded to it,
which keeps more bits than bf16 and is one conversion instruction from e4m3, not three; float32
queries keep float32); each
program reads the one K scale and one V scale of its KV head, folds the K scale into the
softmax scale and multiplies the accumulated output by the V scale (both per-head constants, so
this equals dequantizing every element first, up to rounding). The prefill's dense path (no
cached prefix: the chunks' own new K/V) reads no cache and so no scales.

Softmax runs in base 2 (``exp2``) with the scale folded into ``scale * log2(e)``; max, sum
and output accumulate in float32. float32 inputs multiply in full float32 (no TF32), so the
CUDA float32 path stays close to the CPU one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from functools import cache
from typing import ClassVar

import torch
import triton
import triton.language as tl

from splitserve.kernels import pdl
from splitserve.kernels.linear_triton import arrival_counts
from splitserve.kernels.pdl import gdc_launch_dependents, gdc_wait

LOG2E = 1.4426950408889634


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # TF32 would cost float32 models ~1e-3 relative error; bf16/fp16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_cache_layout(cache: torch.Tensor, name: str) -> None:
    if cache.stride(-1) != 1:
        raise ValueError(f"{name}: the head dimension must be contiguous (stride 1), got strides {cache.stride()}")


def _check_scales(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor,
                  k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether the caches are FP8 with their scales (and not a dtype the kernels would misread)."""
    if k_scale is None and v_scale is None:
        if torch.float8_e4m3fn in (k_cache.dtype, v_cache.dtype):
            raise ValueError("FP8 caches need their k_scale and v_scale")
        return False
    num_kv_heads = k_cache.shape[2]
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None or t.dtype != torch.float32 or t.numel() != num_kv_heads or not t.is_contiguous():
            raise ValueError(f"{name}: a contiguous float32 tensor of {num_kv_heads} KV heads is needed")
    if k_cache.dtype != torch.float8_e4m3fn or v_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"scales given for {k_cache.dtype}/{v_cache.dtype} caches: only float8_e4m3fn is scaled")
    return True


# ---- decode -------------------------------------------------------------------------------


DECODE_CONFIG_ENV = "SPLITSERVE_DECODE_CONFIG"


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernels (bf16, head_dim 128 in mind).

    Written and read as ``"block_n=64,warps=4,stages=3,min_partition=256,programs_per_sm=8"``
    (`parse`, `spec`); a spec may name only some fields."""

    #: Context tokens per loop step, gathered from ``block_n / block_size`` pages: each step
    #: moves ``2 * block_n * head_dim * elem`` bytes (32 KiB at 64 tokens, bf16, head_dim 128).
    #: A power of two, at least 16 on GPU (the smallest ``tl.dot`` tile). The defaults are
    #: the sweep's choice on an H200 (benchmarks/decode_attention_sweep.py, 2026-11-29): within
    #: 2% of the best at batch 64 x 4k (0.99 of copy bandwidth) and batch 256 x 1k (0.98), and
    #: the best at batch 1 x 8k.
    block_n: int = 32
    #: Warps per program.
    num_warps: int = 4
    #: Pipelining depth: K/V tiles are fetched ``num_stages - 1`` steps ahead, each stage one
    #: shared-memory buffer of a step's bytes. 2 or less serialises load and compute.
    num_stages: int = 4
    #: Splits are made no shorter than this many tokens (the merge costs a pass over partials).
    #: 64: a batch-1 step over 1k tokens has 4 KV heads x 16 splits instead of x 4, 6.2 us a
    #: layer instead of 11.0 on an H200 (benchmarks/decode_kernel_sweep.py, 2026-12-02; 10.9
    #: against 12.1 at 4k, 11.0 against 12.8 at batch 8). Large batches are not split further:
    #: ``programs_per_sm`` caps the splits first.
    min_partition: int = 64
    #: Programs wanted per SM (batch x KV heads x splits) before the context stops being split:
    #: enough that the last wave of programs is a small part of the run.
    programs_per_sm: int = 2
    #: 1: the transposed loop (K and V^T as the MMAs' left operands, read from registers, the
    #: query group the small right side; module docstring), 0: queries on the left. 0 stays the
    #: default: on an H200 at batch 64 x 4k (benchmarks/fp8_perf.py, 2026-12-03) the transposed
    #: loop reached 0.35-0.39 of copy bandwidth over an FP8 cache against 0.39-0.49, and
    #: 0.46-0.73 against 0.57-0.75 over bf16.
    swap: int = 0
    #: FP8 caches on the GPU: 1 widens the e4m3 K/V tiles to float16 where they are loaded and
    #: stages them through shared memory for the MMAs (`_staged`), 0 leaves the widening to
    #: Triton (after reading in the MMA operand's layout: V a byte at a time). The untransposed
    #: loop only; the interpreter (no inline assembly) always runs 0. 1 runs 38% fewer loop
    #: instructions but was slower on an H200 (batch 64 x 1k: 2.46x the floor against 2.03x,
    #: benchmarks/results, 2026-12-03): Nsight Compute showed the loop bound by latency at four
    #: programs an SM, not by issue, and staging adds shared-memory round trips to it.
    widen_early: int = 0
    #: Warps per program when each program's share of the context is at most
    #: ``SHORT_PARTITION`` tokens (0: ``num_warps``): such a short loop (a batch too small to
    #: fill the GPU, cut into 64-token splits at batch 1 x 1k) is one where more warps shorten it.
    short_warps: int = 0
    #: Registers per thread the compiler may use (Triton's ``maxnreg``; 0: its own choice). At
    #: 128 (the FP8 loop's own count) four programs fit on an SM by registers.
    max_registers: int = 0
    #: 1: a split context is merged by the last of a (sequence, KV head)'s programs to finish
    #: (an arrival count per pair, as the skinny linear's split-K sum), one launch; 0: by
    #: `_decode_merge_kernel`, a second launch. 0 stays the default: on an H200
    #: (benchmarks/gpu_perf.py, 2026-12-03) the one launch was slower, Qwen3-30B-A3B's bf16
    #: batch-1 step 3.611 against 3.578 ms and batch 64 18.96 against 18.82: the decode kernel
    #: grew from 4.5 to 7.8 us a layer at batch 1 x 1k, more than the 2.7 us merge launch and
    #: its gap, the last program of a KV head merging its 8 query heads' 16 splits alone where
    #: the merge launch spreads them over 32 programs.
    merge_in_kernel: int = 0

    #: Spec keys -> fields (the short names first, as `spec` writes them).
    KEYS: ClassVar[dict[str, str]] = {
        "block_n": "block_n", "warps": "num_warps", "stages": "num_stages", "min_partition": "min_partition",
        "programs_per_sm": "programs_per_sm", "swap": "swap", "widen": "widen_early", "num_warps": "num_warps",
        "num_stages": "num_stages", "widen_early": "widen_early", "maxnreg": "max_registers",
        "max_registers": "max_registers", "short_warps": "short_warps", "merge": "merge_in_kernel",
        "merge_in_kernel": "merge_in_kernel",
    }

    def __post_init__(self) -> None:
        for name in ("block_n", "num_warps", "short_warps"):
            value = getattr(self, name)
            if (value < 1 and name != "short_warps") or value < 0 or value & (value - 1):
                raise ValueError(f"DecodeConfig.{name} must be a power of two, got {value}")
        for name in ("num_stages", "min_partition", "programs_per_sm"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("swap", "widen_early", "merge_in_kernel"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"DecodeConfig.{name} must be 0 or 1, got {getattr(self, name)}")
        if self.max_registers and not 24 <= self.max_registers <= 255:
            raise ValueError(f"DecodeConfig.max_registers must be 0 or 24..255, got {self.max_registers}")

    @classmethod
    def parse(cls, spec: str, base: "DecodeConfig | None" = None) -> "DecodeConfig":
        """``"block_n=64,warps=4,stages=3"`` -> a config; fields not named keep ``base``'s."""
        fields = {}
        for item in spec.replace(";", ",").split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in cls.KEYS:
                raise ValueError(f"decode config {spec!r}: expected key=value with keys {sorted(set(cls.KEYS))}")
            try:
                fields[cls.KEYS[key]] = int(value)
            except ValueError:
                raise ValueError(f"decode config {spec!r}: {key} must be an integer, got {value.strip()!r}") from None
        return replace(base or cls(), **fields)

    def spec(self) -> str:
        """Every field, so that the spec reads back as this config over any base."""
        return (f"block_n={self.block_n},warps={self.num_warps},stages={self.num_stages},"
                f"min_partition={self.min_partition},programs_per_sm={self.programs_per_sm},swap={self.swap},"
                f"widen={self.widen_early},maxnreg={self.max_registers},short_warps={self.short_warps},"
                f"merge={self.merge_in_kernel}")


#: The built-in default: the config expected to be fastest on an H100/H200 (see the sweep).
DECODE = DecodeConfig()
#: Context tokens per program up to which `DecodeConfig.short_warps` applies: between the
#: shares measured on an H200 (64 tokens: four warps faster; 512 and more: two).
SHORT_PARTITION = 256

#: The default over an FP8 cache (whose loop steps move half the bytes and widen them): two warps
#: and three stages a program, four warps when its share of the context is short. On an H200 in
#: graphs (benchmarks/decode_attention_batch.py, 2026-12-03), Llama-3-8B's heads: batch 64 x 1k
#: 57.6 us with two warps and three stages, 58.6 with four stages, 63.8 with four warps (the
#: old default); 64 x 4k 212 / 221 / 236 (Qwen3-30B-A3B's heads: 35.8 / 36.5 / 38.5 and
#: 113.5 / 114.4 / 126). In a sweep of 21 shapes at 64 x 1k over the old default, register caps
#: (spilling), 16-token steps and more splits were slower than two warps. At batch 1 x 1k
#: (16 splits of 64 tokens) four warps won: 7.0 us against 8.5 with two (Qwen3: 6.3 / 8.1; at
#: four stages: three there is not measured). Nsight Compute had shown the four-warp loop
#: latency-bound (0.9 eligible warps a scheduler, DRAM at 45%).
DECODE_FP8 = DecodeConfig(num_warps=2, num_stages=3, short_warps=4)
#: Replaces fields for FP8 caches only, after ``SPLITSERVE_DECODE_CONFIG``.
DECODE_CONFIG_FP8_ENV = "SPLITSERVE_DECODE_CONFIG_FP8"


@cache
def default_decode_config(fp8: bool = False) -> DecodeConfig:
    """`DECODE` (`DECODE_FP8` for an FP8 cache), with the fields ``SPLITSERVE_DECODE_CONFIG``
    names replaced, then for FP8 those ``SPLITSERVE_DECODE_CONFIG_FP8`` names (read once;
    tests clear the cache)."""
    cfg = DECODE_FP8 if fp8 else DECODE
    for env in (DECODE_CONFIG_ENV, DECODE_CONFIG_FP8_ENV) if fp8 else (DECODE_CONFIG_ENV,):
        spec = os.environ.get(env, "").strip()
        if spec:
            cfg = DecodeConfig.parse(spec, cfg)
    return cfg


@triton.jit
def _staged(x):
    """``x`` unchanged, through an instruction Triton may not move (not pure). An e4m3 tile
    widened to float16 and passed through this is widened where it was loaded (16 bytes a
    thread) and reaches the MMA through shared memory as float16 (``ldmatrix``, transposing for
    V); otherwise Triton widens it after reading it in the MMA operand's layout, and V's operand
    wants consecutive tokens per thread, which for 8-bit data is one shared-memory load per
    byte (benchmarks/decode_kernel_asm.py counts both loops)."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=2)


# Arguments that change from call to call are not specialised on (divisible by 16, equal to 1):
# each specialisation is one more compile, and a compile stalls a serving step for about a second.
@triton.jit(do_not_specialize=["partition", "stride_tb"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr, counts_ptr,
    scale_log2, window, partition,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_tb,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    k_scale_ptr, v_scale_ptr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr, SWAP: tl.constexpr,
    WIDEN: tl.constexpr, MERGE: tl.constexpr, GROUP_P2: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
):
    if PDL:  # the output projection (or the merge) after us may start (`pdl.py`)
        gdc_launch_dependents()
    if PDL == 2:  # launched early ourselves: wait for the kernel before
        gdc_wait()
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    num_kv_heads = tl.num_programs(0)
    num_splits = tl.num_programs(1)

    ctx = tl.load(lens_ptr + seq).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)  # key j is kept iff (ctx - 1) - j < window
    start = lo + split * partition
    end = tl.minimum(start + partition, ctx)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, D_PAD)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    qk_scale = scale_log2
    if QUANT:  # FP8: the KV head's K scale folds into the scores' (module docstring)
        qk_scale = scale_log2 * tl.load(k_scale_ptr + kv_head)
        if q.dtype != tl.float32:  # e4m3 widens to float16 in one instruction, to bf16 in three
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)  # saturate

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    offs = start + tl.arange(0, BLOCK_N)
    page = tl.load(table + offs // BLOCK_SIZE, mask=offs < end, other=0).to(tl.int64)
    if SWAP:
        # Transposed (module docstring): K and V^T tiles are the MMAs' left operands, straight
        # from registers; the group's queries and probabilities the small right ones.
        q_t = tl.trans(q)
        acc_t = tl.zeros([D_PAD, GROUP_PAD], tl.float32)
        k_head = k_ptr + kv_head * stride_kh + dims[None, :]
        v_head = v_ptr + kv_head * stride_vh + dims[:, None]
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            key_ok = offs < end
            slot = offs % BLOCK_SIZE
            k = tl.load(k_head + page[:, None] * stride_kb + slot[:, None] * stride_kt,
                        mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            v_t = tl.load(v_head + page[None, :] * stride_vb + slot[None, :] * stride_vt,
                          mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
            if QUANT:
                k = k.to(q_t.dtype)
                v_t = v_t.to(q_t.dtype)
            nxt = offs + BLOCK_N
            page = tl.load(table + nxt // BLOCK_SIZE, mask=nxt < end, other=0).to(tl.int64)
            s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale
            s_t = tl.where(key_ok[:, None], s_t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_t, 0))
            alpha = tl.exp2(m_i - m_new)
            p_t = tl.exp2(s_t - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p_t, 0)
            acc_t = acc_t * alpha[None, :] + tl.dot(v_t, p_t.to(v_t.dtype), input_precision=PRECISION)
            m_i = m_new
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        k_head = k_ptr + kv_head * stride_kh + dims[None, :]
        v_head = v_ptr + kv_head * stride_vh + dims[None, :]
        # Every tile holds at least one visible key, so the running max is finite after the first.
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            key_ok = offs < end
            slot = (offs % BLOCK_SIZE)[:, None]
            mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_head + page[:, None] * stride_kb + slot * stride_kt, mask=mask, other=0.0)
            v = tl.load(v_head + page[:, None] * stride_vb + slot * stride_vt, mask=mask, other=0.0)
            if QUANT:
                k = k.to(q.dtype)
                v = v.to(q.dtype)
                if WIDEN:  # widened here, staged as float16 (`_staged`)
                    k = _staged(k)
                    v = _staged(v)
            # Next step's page ids now (see the module docstring: keeps K/V off the indirect path).
            nxt = offs + BLOCK_N
            page = tl.load(table + nxt // BLOCK_SIZE, mask=nxt < end, other=0).to(tl.int64)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    if QUANT:
        acc = acc * tl.load(v_scale_ptr + kv_head)
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        # Partials [B, Hq, splits, D] and (max, sum) [B, Hq, splits, 2], float32; an empty
        # split (past the context) leaves max -inf, sum 0 and weighs nothing in the merge.
        part_row = (seq * num_kv_heads * GROUP + heads).to(tl.int64) * num_splits + split
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
        tl.store(part_ml_ptr + part_row * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part_row * 2 + 1, l_i, mask=row_ok)
        if MERGE:
            # Every thread's partial stored before the count says so (the release orders them);
            # the last program of this (sequence, KV head) to arrive merges every split.
            tl.debug_barrier()
            count = counts_ptr + seq * num_kv_heads + kv_head
            if tl.atomic_add(count, 1, sem="acq_rel") == num_splits - 1:
                _merge_group(part_acc_ptr, part_ml_ptr, out_ptr, seq, kv_head, num_kv_heads, num_splits,
                             stride_ob, stride_oh, GROUP, GROUP_P2, HEAD_DIM, D_PAD, SPLIT_BLOCK)
                tl.atomic_xchg(count, 0)  # zero again for the next call
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_group(part_acc_ptr, part_ml_ptr, out_ptr, seq, kv_head, num_kv_heads, num_splits, stride_ob, stride_oh,
                 GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 SPLIT_BLOCK: tl.constexpr):
    """The output rows of a KV head's query group from its splits' partials: a pass for each
    head's overall max, then one for the weighted sums ([group, splits, dims] tiles, so the
    loads of all heads and splits are in flight at once: the tail is two round trips to L2,
    not one per split). Read with ``.cg``: other SMs wrote them."""
    g = tl.arange(0, GROUP_P2)
    heads = kv_head * GROUP + g
    dims = tl.arange(0, D_PAD)
    base = (seq * num_kv_heads * GROUP + heads).to(tl.int64) * num_splits  # [G]
    head_ok = g < GROUP
    m_all = tl.full([GROUP_P2], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        splits = s0 + tl.arange(0, SPLIT_BLOCK)
        ok = head_ok[:, None] & (splits < num_splits)[None, :]
        m = tl.load(part_ml_ptr + (base[:, None] + splits[None, :]) * 2, mask=ok, other=float("-inf"),
                    cache_modifier=".cg")
        m_all = tl.maximum(m_all, tl.max(m, 1))
    # A padded row (context 0) has only empty splits (max -inf, sum 0): it comes out 0, not NaN.
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, D_PAD], tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        splits = s0 + tl.arange(0, SPLIT_BLOCK)
        ok = head_ok[:, None] & (splits < num_splits)[None, :]
        row = base[:, None] + splits[None, :]  # [G, S]
        m = tl.load(part_ml_ptr + row * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_ml_ptr + row * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        part = tl.load(part_acc_ptr + row[:, :, None] * HEAD_DIM + dims[None, None, :],
                       mask=ok[:, :, None] & (dims < HEAD_DIM)[None, None, :], other=0.0, cache_modifier=".cg")
        weight = tl.exp2(m - m_all[:, None])
        total += tl.sum(weight * l, 1)
        acc += tl.sum(weight[:, :, None] * part, 1)
    total = tl.where(total == 0.0, 1.0, total)
    out = acc / total[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # as in _decode_kernel
        gdc_launch_dependents()
    if PDL == 2:
        gdc_wait()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq * tl.num_programs(1) + head).to(tl.int64) * num_splits
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    # Lane j merges splits j, j + SPLIT_BLOCK, ... online; the lanes are merged at the end.
    m_lane = tl.full([SPLIT_BLOCK], float("-inf"), tl.float32)
    l_lane = tl.zeros([SPLIT_BLOCK], tl.float32)
    acc = tl.zeros([SPLIT_BLOCK, D_PAD], tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        splits = s0 + tl.arange(0, SPLIT_BLOCK)
        ok = splits < num_splits
        m = tl.load(part_ml_ptr + (base + splits) * 2, mask=ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + (base + splits) * 2 + 1, mask=ok, other=0.0)
        part = tl.load(part_acc_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                       mask=ok[:, None] & dim_ok[None, :], other=0.0)
        m_new = tl.maximum(m_lane, m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only empty splits
        alpha = tl.exp2(m_lane - m_safe)
        weight = tl.exp2(m - m_safe)
        l_lane = l_lane * alpha + weight * l
        acc = acc * alpha[:, None] + weight[:, None] * part
        m_lane = m_new
    # With a real row split 0 holds the query's own key, so the overall max is finite; a
    # padded row (context 0) has none, and must come out finite (0), not NaN.
    m_all = tl.max(m_lane, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    weight = tl.exp2(m_lane - m_all)
    total = tl.sum(weight * l_lane, 0)
    total = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(weight[:, None] * acc, 0) / total
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


#: Arrival counts for the in-kernel merge (`DecodeConfig.merge_in_kernel`): one per (sequence,
#: KV head), per device, zero between calls. A launch with more pairs merges in a second launch.
MERGE_COUNTS = 16384
_merge_counts: dict[int, torch.Tensor] = {}
#: Splits per merge step: one value for every split count (a new one would compile mid-serving).
MERGE_SPLIT_BLOCK = 16


def decode_num_splits(num_programs: int, span: int, device: torch.device, cfg: DecodeConfig | None = None) -> int:
    """How many context splits for ``num_programs`` (batch x KV heads) over ``span`` tokens:
    enough programs for ``cfg.programs_per_sm`` per SM, no split under ``cfg.min_partition``.
    From shapes only, so a CUDA graph captures one launch shape for every context length."""
    cfg = cfg or default_decode_config()
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    wanted = triton.cdiv(cfg.programs_per_sm * sms, max(1, num_programs))
    return max(1, min(wanted, triton.cdiv(span, cfg.min_partition)))


def decode_partition(num_programs: int, span: int, device: torch.device, cfg: DecodeConfig | None = None,
                     num_splits: int | None = None) -> tuple[int, int]:
    """(splits, tokens per split) of a launch: ``num_splits`` (default `decode_num_splits`)
    rounded so that every split but the last is a whole number of ``block_n`` steps."""
    cfg = cfg or default_decode_config()
    if num_splits is None:
        num_splits = decode_num_splits(num_programs, span, device, cfg)
    partition = triton.cdiv(triton.cdiv(span, num_splits), cfg.block_n) * cfg.block_n
    return triton.cdiv(span, partition), partition


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    cfg: DecodeConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per row. q [B, Hq, D]; context_lens [B] include the new token.

    Same as `paged_decode_attention_ref`; ``out`` (a [B, Hq, D] view) receives the result
    in place. ``num_splits`` overrides the context-split heuristic (tests, tuning); ``cfg``
    the launch shape (default: `default_decode_config`); ``k_scale``/``v_scale``: an FP8
    cache's float32 [Hk] scales."""
    cfg = cfg or default_decode_config(k_cache.dtype == torch.float8_e4m3fn)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        _check_cache_layout(t, name)
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if batch > 65535:  # the grid's z dimension
        raise ValueError(f"decode batch {batch} over 65535 rows: split it into several calls")
    quant = _check_scales(k_cache, v_cache, q, k_scale, v_scale)
    group = num_heads // num_kv_heads
    span = block_tables.shape[1] * block_size  # the longest context the tables can hold
    if sliding_window is not None:
        span = min(span, sliding_window)
    num_splits, partition = decode_partition(batch * num_kv_heads, span, q.device, cfg, num_splits)
    split = num_splits > 1
    d_pad = _pow2(head_dim, 16)
    counts = None
    if split:
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
        if cfg.merge_in_kernel and batch * num_kv_heads <= MERGE_COUNTS:
            counts = arrival_counts(_merge_counts, q.device, MERGE_COUNTS)
    else:
        part_acc = part_ml = out  # unused
    mode = pdl.mode(q.device)
    _decode_kernel[(num_kv_heads, num_splits, batch)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml,
        counts if counts is not None else context_lens,
        scale * LOG2E, sliding_window or 0, partition,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *((k_scale, v_scale) if quant else (context_lens, context_lens)),
        GROUP=group, GROUP_PAD=_pow2(group, 16), HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n, HAS_WINDOW=sliding_window is not None,
        SPLIT=split, PRECISION=_precision(q.dtype), QUANT=quant, PDL=mode, SWAP=bool(cfg.swap),
        # `_staged` moves 16-bit pairs: float32 queries keep float32 products, never widened to float16
        WIDEN=bool(cfg.widen_early) and quant and q.device.type == "cuda" and q.dtype != torch.float32,
        MERGE=counts is not None, GROUP_P2=_pow2(group), SPLIT_BLOCK=MERGE_SPLIT_BLOCK,
        num_warps=cfg.short_warps if cfg.short_warps and partition <= SHORT_PARTITION else cfg.num_warps,
        num_stages=cfg.num_stages, **pdl.launch_kwargs(mode == 2),
        **({"maxnreg": cfg.max_registers} if cfg.max_registers and q.device.type == "cuda" else {}),
    )
    if split and counts is None:
        _decode_merge_kernel[(batch, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), num_splits,
            # One lane count for every split count: a new value would compile a new kernel mid-serving.
            HEAD_DIM=head_dim, D_PAD=d_pad, SPLIT_BLOCK=16, PDL=mode, num_warps=1,
            **pdl.launch_kwargs(mode == 2),
        )
    return out


# ---- prefill ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaggedPrefill:
    """A step's prefill chunks as device tensors, for one kernel launch over all of them."""

    #: Block ids of each sequence, int64 [B, max_blocks], short rows padded with 0.
    block_tables: torch.Tensor
    #: First row of each chunk in the flattened batch (q, out), int32 [B].
    q_starts: torch.Tensor
    #: Tokens in each chunk, int32 [B].
    q_lens: torch.Tensor
    #: Context of each sequence after its chunk (cached prefix + chunk), int32 [B].
    context_lens: torch.Tensor
    #: The longest chunk (sizes the grid; a host value, so no device sync).
    max_q_len: int
    #: No chunk has a cached prefix: the keys are exactly the chunks' own new K/V rows.
    no_prefix: bool

    @classmethod
    def from_chunks(cls, chunks) -> "RaggedPrefill":
        """From `PrefillChunk`-like objects (start, num_tokens, context_len, block_table)."""
        tables = [c.block_table for c in chunks]
        device = tables[0].device
        # Each row padded to 16 bytes, so that every view starts aligned whatever the chunks:
        # Triton compiles a variant per pointer alignment, and one that changed with the number of
        # chunks would compile in the middle of serving.
        width = -(-len(chunks) // 4) * 4
        rows = [[c.start for c in chunks], [c.num_tokens for c in chunks], [c.context_len for c in chunks]]
        ints = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32).to(device, non_blocking=True)
        padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=0)
        n = len(chunks)
        return cls(padded, ints[0, :n], ints[1, :n], ints[2, :n], max(c.num_tokens for c in chunks),
                   all(c.context_len == c.num_tokens for c in chunks))


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_config(dtype: torch.dtype, head_dim: int) -> PrefillConfig:
    if dtype == torch.float32 or head_dim > 128:
        return PrefillConfig(32, 32, 4, 2)
    return PrefillConfig(128, 64, 8, 3)


@triton.jit(do_not_specialize=["stride_tb"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, starts_ptr, qlens_ptr, lens_ptr,
    scale_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_tb,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    k_scale_ptr, v_scale_ptr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, KV_DENSE: tl.constexpr,
    PRECISION: tl.constexpr, QUANT: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_len = tl.load(qlens_ptr + seq)
    if tile * BLOCK_M >= q_len:
        return
    q_start = tl.load(starts_ptr + seq)
    ctx = tl.load(lens_ptr + seq)
    prefix = ctx - q_len
    kv_head = head // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = prefix + rows
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # Keys any row of this tile may see: up to the tile's last position, and with a window
    # from the first row's earliest visible key.
    hi = tl.minimum(ctx, prefix + (tile + 1) * BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix + tile * BLOCK_M - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N

    qk_scale = scale_log2
    if QUANT:  # FP8 cache: the KV head's K scale folds into the scores' (module docstring)
        qk_scale = scale_log2 * tl.load(k_scale_ptr + kv_head)
        if q.dtype != tl.float32:  # as in the decode kernel: products in float16
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)  # saturate

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs < hi
        if KV_DENSE:  # no prefix: key j is row q_start + j of the new K/V
            k_off = (q_start + offs).to(tl.int64)[:, None] * stride_kt
            v_off = (q_start + offs).to(tl.int64)[:, None] * stride_vt
        else:
            block = tl.load(table + offs // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
            slot = offs % BLOCK_SIZE
            k_off = block[:, None] * stride_kb + slot[:, None] * stride_kt
            v_off = block[:, None] * stride_vb + slot[:, None] * stride_vt
        mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + k_off + kv_head * stride_kh + dims[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + v_off + kv_head * stride_vh + dims[None, :], mask=mask, other=0.0)
        if QUANT:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = (offs[None, :] <= q_pos[:, None]) & key_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - offs[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see nothing in this tile yet (window, padding rows): keep exp2 off -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if QUANT:
        acc = acc * tl.load(v_scale_ptr + kv_head)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_prefill_attention_ragged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: RaggedPrefill,
    scale: float,
    sliding_window: int | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    cfg: PrefillConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every chunk in ``batch``: rows ``q_starts[b] .. + q_lens[b]`` of
    q [T, Hq, D] attend their sequence's cached prefix and themselves; the results go to the
    same rows of ``out`` (other rows untouched). The chunks' K/V must be in the cache already
    unless ``batch.no_prefix`` and ``k_new``/``v_new`` [T, Hk, D] (rows as q's) are given.
    ``k_scale``/``v_scale``: an FP8 cache's float32 [Hk] scales."""
    num_heads, head_dim = q.shape[1:]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if batch.max_q_len == 0:
        return out
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    cfg = cfg or prefill_config(q.dtype, head_dim)
    quant = _check_scales(k_cache, v_cache, q, k_scale, v_scale)
    dense = batch.no_prefix and k_new is not None and v_new is not None
    if dense:
        k_src, v_src = k_new, v_new
        k_strides = (0, k_new.stride(0), k_new.stride(1))
        v_strides = (0, v_new.stride(0), v_new.stride(1))
    else:
        k_src, v_src = k_cache, v_cache
        k_strides, v_strides = k_cache.stride()[:3], v_cache.stride()[:3]
    for name, t in (("q", q), ("k", k_src), ("v", v_src), ("out", out)):
        _check_cache_layout(t, name)
    grid = (triton.cdiv(batch.max_q_len, cfg.block_m), len(batch.q_lens), num_heads)
    _prefill_kernel[grid](
        q, k_src, v_src, out, batch.block_tables, batch.q_starts, batch.q_lens, batch.context_lens,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), batch.block_tables.stride(0),
        *k_strides, *v_strides,
        *((k_scale, v_scale) if quant and not dense else (batch.q_lens, batch.q_lens)),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, D_PAD=_pow2(head_dim, 16),
        BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_WINDOW=sliding_window is not None, KV_DENSE=dense, PRECISION=_precision(q.dtype),
        QUANT=quant and not dense,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


@dataclass(frozen=True)
class _Chunk:
    start: int
    num_tokens: int
    context_len: int
    block_table: torch.Tensor


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference's one-chunk call (`paged_prefill_attention_ref`): q [Tq, Hq, D] are the
    last Tq tokens of ``context_len``; with no cached prefix ``k_new``/``v_new`` are the keys."""
    num_blocks = math.ceil(context_len / k_cache.shape[1])
    batch = RaggedPrefill.from_chunks([_Chunk(0, q.shape[0], context_len, block_table[:num_blocks])])
    return paged_prefill_attention_ragged(q, k_cache, v_cache, batch, scale, sliding_window, k_new, v_new,
                                          k_scale=k_scale, v_scale=v_scale)


# ---- warm-up ------------------------------------------------------------------------------


def warm_up(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
            sliding_window: int | None = None, *, dtype: torch.dtype | None = None,
            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Compile every launch variant the engine uses, now: decode with and without a context
    split, over short and long shares of it, prefill over the chunks' own keys and over a
    cached prefix. Triton compiles a variant the first time it runs (about a second), and
    every request of that step would wait for it. Reads block 0 of the cache, writes nothing there; the inputs have the
    engine's dtypes (int64 tables and lengths), which the compiled variants depend on; ``dtype``
    is the queries' (the model's), given when the cache is FP8 (with its scales)."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    dev, dt = k_cache.device, dtype or k_cache.dtype
    q = torch.zeros(2, num_heads, head_dim, dtype=dt, device=dev)
    k_new = torch.zeros(2, num_kv_heads, head_dim, dtype=dt, device=dev)
    tables = torch.zeros(2, 2, dtype=torch.int64, device=dev)
    lens = torch.full((2,), 2, dtype=torch.int64, device=dev)
    # Each program's share decides the warps (`DecodeConfig.short_warps`): shares short and long,
    # each with and without a split, over a table wide enough for two long shares.
    cfg = default_decode_config(k_cache.dtype == torch.float8_e4m3fn)
    wide = torch.zeros(2, triton.cdiv(2 * (SHORT_PARTITION + cfg.block_n), block_size), dtype=torch.int64, device=dev)
    span = wide.shape[1] * block_size
    for table, splits in ((tables, 1), (wide, triton.cdiv(span, cfg.block_n)), (wide, 1), (wide, 2)):
        paged_decode_attention(q, k_cache, v_cache, table, lens, scale, sliding_window, num_splits=splits,
                               k_scale=k_scale, v_scale=v_scale)
    for prefix in (0, 1):
        batch = RaggedPrefill.from_chunks([_Chunk(0, 2, 2 + prefix, tables[0])])
        paged_prefill_attention_ragged(q, k_cache, v_cache, batch, scale, sliding_window, k_new, k_new,
                                       k_scale=k_scale, v_scale=v_scale)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
