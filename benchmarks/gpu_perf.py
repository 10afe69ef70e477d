"""GPU performance of the engine (issue 8): kernels, decode steps, prefill, offline throughput.

One run on one GPU, every section timed and guarded (an exception or OOM in one section is
recorded and the next runs):

    a kernels     Triton kernels at full shapes, bf16, vs the torch references (relative error)
    b ceilings    device-to-device copy bandwidth (read + written) and bf16 8192^3 matmul rate
    c decode      engine decode step, Llama-3-8B shape, batch 1 and batch 64 @ 1k context, vs the
                  HBM floor; CUDA graphs vs eager, Triton vs torch-reference kernels
    d prefill     8 x 2048 tokens into the paged cache: TFLOP/s vs the matmul rate; transformers'
                  forward (sdpa) over the same batch
    e attention   paged decode kernel alone, batch 64 @ 4k context: bandwidth vs copy bandwidth
    f offline     N requests 1024 in / 128 out (ignore_eos) vs a roofline; transformers
                  generate() at batch 128 for a few batches
    g correct     greedy tokens on GPU == transformers (tiny random float32 model of the
                  model's family); bf16 logits vs float32 within bf16 error

``--model`` picks the engine sections' model (default the Llama-3-8B shape). A mixture-of-experts
model (issue 17) is counted by what it computes and reads: prefill FLOPs of the router and the
top_k experts of each token (not all experts); decode floors of the bytes a step must read (the
non-expert weights, one embedding row, the distinct experts the step touches: top_k per layer at
batch 1, at batch 64 the mean measured in an untimed pass), and its own targets (`MOE_TARGETS`).
Dense models keep their all-weights floor as the target basis and report the bytes-read floor
beside it. ``--compare-model`` runs the offline workload on a second model after releasing the
first, in the same process, and tabulates both.

Usage (from the repository root, package on PYTHONPATH):
    python benchmarks/gpu_perf.py --out benchmarks/results [--num-requests 1000] [--quick]
    python benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --kv-gb 48 --sections ceilings,decode,prefill
    python benchmarks/gpu_perf.py --model random:qwen3-30b-a3b --compare-model random:qwen3-8b \
        --kv-gb 48 --sections ceilings,offline
    python benchmarks/gpu_perf.py --device cpu --tiny          # a smoke test of the plumbing
    python benchmarks/gpu_perf.py --device cpu --tiny --model random:tiny-qwen3-moe --compare-model random:tiny-qwen3
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
import results_meta  # noqa: E402

TARGETS = {"decode_b1_vs_floor": 1.25, "decode_b64_vs_floor": 1.3, "prefill_frac_of_matmul": 0.72,
           "attention_frac_of_copy": 0.80}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- pure functions (tested on CPU) -------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes the FLOP and byte counts need. Mixture-of-experts models add their experts:
    ``moe_layers`` of the ``layers`` route each token to ``top_k`` of ``num_experts`` gated MLPs
    of width ``moe_intermediate`` (the others keep a dense MLP of ``intermediate``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    moe_layers: int = 0
    qk_norm: bool = False
    tie_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelShape":
        """From a splitserve `ModelConfig`."""
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.vocab_size, num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                   moe_intermediate=cfg.moe_intermediate_size,
                   moe_layers=sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers)), qk_norm=cfg.qk_norm,
                   tie_embeddings=cfg.tie_word_embeddings)

    @property
    def is_moe(self) -> bool:
        return self.moe_layers > 0

    @property
    def attention_params(self) -> int:
        """One layer's q, k, v, o projections."""
        d, h = self.head_dim, self.hidden
        return h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h

    @property
    def layer_linear_params(self) -> int:
        """Weights of one dense layer's matrix multiplies (q, k, v, o, gate, up, down)."""
        return self.attention_params + 3 * self.hidden * self.intermediate

    @property
    def expert_params(self) -> int:
        """One expert's gate, up and down projections."""
        return 3 * self.hidden * self.moe_intermediate

    @property
    def active_linear_params(self) -> int:
        """Matmul weights one token goes through over all layers (no lm_head): attention, the
        dense MLPs, and in each sparse layer the router and ``top_k`` experts, not all of them."""
        dense = self.layers - self.moe_layers
        sparse = self.num_experts * self.hidden + self.top_k * self.expert_params
        return (self.layers * self.attention_params + dense * 3 * self.hidden * self.intermediate
                + self.moe_layers * sparse)

    def step_read_params(self, experts_per_layer: float) -> float:
        """Parameters a decode step must read: every non-expert weight (attention, norms, routers,
        dense MLPs, lm_head) but only ONE embedding row, plus ``experts_per_layer`` distinct experts
        in each sparse layer. (Tied embeddings: the lm_head reads the table, the row is in it.)"""
        return self.step_read_bytes(experts_per_layer, 1)

    def step_read_bytes(self, experts_per_layer: float, elem_bytes: float, linear_bytes: float | None = None) -> float:
        """`step_read_params` in bytes: the projections (attention, dense MLPs, experts) at
        ``linear_bytes`` a weight (FP8: 1; their per-row scales are left out, under 0.4%), the
        rest (norms, routers, lm_head, the embedding row) at ``elem_bytes``."""
        linear_bytes = elem_bytes if linear_bytes is None else linear_bytes
        dense = self.layers - self.moe_layers
        norms = self.layers * (2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)) + self.hidden
        embedding_row = 0 if self.tie_embeddings else self.hidden
        linears = (self.layers * self.attention_params + dense * 3 * self.hidden * self.intermediate
                   + self.moe_layers * experts_per_layer * self.expert_params)
        rest = self.moe_layers * self.num_experts * self.hidden + norms + self.vocab * self.hidden + embedding_row
        return linears * linear_bytes + rest * elem_bytes

    @property
    def total_params(self) -> int:
        """Every parameter (no biases): what the dense floor counts, the whole embedding table included."""
        table = 0 if self.tie_embeddings else self.vocab * self.hidden - self.hidden
        return int(self.step_read_params(self.num_experts)) + table

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem_bytes


def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts ``batch`` tokens touch in one layer when each picks ``top_k`` of
    ``num_experts`` uniformly (an expert is missed by one token with probability 1 - k/E)."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def prefill_flops(shape: ModelShape, prompt_lens: list[int], prefix_lens: list[int] | None = None) -> float:
    """Matmul FLOPs of the layers (no lm_head: only the last row of each prompt needs it; MoE:
    the router and the ``top_k`` experts of each token) plus causal attention (QK^T and PV over
    the visible keys), for prompts computed from scratch."""
    prefix_lens = prefix_lens or [0] * len(prompt_lens)
    tokens = sum(prompt_lens)
    linear = 2 * tokens * shape.active_linear_params
    pairs = sum(n * prefix + n * (n + 1) / 2 for n, prefix in zip(prompt_lens, prefix_lens))
    attention = 4 * pairs * shape.heads * shape.head_dim * shape.layers
    return float(linear + attention)


def decode_floor_s(weight_bytes: float, kv_bytes: float, copy_bw: float) -> float:
    """A decode step reads every weight and every context token's K/V once: bytes / bandwidth."""
    return (weight_bytes + kv_bytes) / copy_bw


def offline_roofline_s(num_requests: int, input_len: int, output_len: int, max_batch: int, shape: ModelShape,
                       weight_bytes: float, elem_bytes: int, matmul_flops: float, copy_bw: float) -> dict[str, float]:
    """Floor of an offline run: every prompt's prefill at the matmul rate, then decode in waves of
    ``max_batch`` sequences, each step reading ``weight_bytes``, the wave's K/V once and, for a
    MoE model, the experts a wave of that size touches under uniform routing
    (`expected_distinct_experts`; ``weight_bytes`` then counts the non-expert weights only)."""
    prefill = prefill_flops(shape, [input_len] * num_requests) / matmul_flops
    kv_token = shape.kv_bytes_per_token(elem_bytes)
    decode = 0.0
    remaining = num_requests
    while remaining > 0:
        wave = min(max_batch, remaining)
        remaining -= wave
        experts = (shape.moe_layers * expected_distinct_experts(shape.num_experts, shape.top_k, wave)
                   * shape.expert_params * elem_bytes)
        # output_len - 1 decode steps: the first token comes from the prefill.
        for step in range(1, output_len):
            decode += decode_floor_s(weight_bytes + experts, wave * (input_len + step) * kv_token, copy_bw)
    return {"prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode}


def rel_error(got, want) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return float("nan")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ---- timing helpers -----------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_s(fn: Callable[[], Any], device, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds per call (events on CUDA, host clock on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- sections -----------------------------------------------------------------------------


def section_ceilings(ctx: "Ctx") -> dict:
    import torch

    dev, tiny = ctx.device, ctx.args.tiny
    n = (1 << 22) if tiny else (1 << 30)
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = bench_s(lambda: y.copy_(x), dev, iters=5 if tiny else 20)
    ctx.copy_bw = 2 * n / t
    del x, y
    m = 256 if tiny else 8192
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    a_s = [torch.randn(m, m, device=dev, dtype=dtype) for _ in range(3)]
    b = torch.randn(m, m, device=dev, dtype=dtype)
    i = [0]

    def mm():
        i[0] = (i[0] + 1) % 3
        return a_s[i[0]] @ b

    t = bench_s(mm, dev, iters=5 if tiny else 30)
    ctx.matmul_flops = 2 * m**3 / t
    return {"copy_bandwidth_TBps": ctx.copy_bw / 1e12, "matmul_TFLOPs": ctx.matmul_flops / 1e12, "matmul_n": m}


def section_kernels(ctx: "Ctx") -> dict:
    """Triton vs reference at full shapes (bf16), relative error and time of each."""
    import torch

    from splitserve.kernels import attention as aref, attention_triton as at
    from splitserve.kernels import activation, activation_triton
    from splitserve.kernels import kv_pack, kv_pack_triton, norm, norm_triton, rotary, rotary_triton

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    out: dict[str, Any] = {}

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    # decode: batch 32, GQA 32/8, head_dim 128, contexts 1..4096, shuffled blocks of 16
    b, hq, hk, d, bs = 32, 32, 8, 128, 16
    lens = torch.randint(1, 4097, (b,), generator=g, device=dev)
    lens[0], lens[1] = 1, 4096
    max_blocks = 4096 // bs
    num_blocks = b * max_blocks + 8
    kc, vc = rnd(num_blocks, bs, hk, d), rnd(num_blocks, bs, hk, d)
    tables = torch.randperm(num_blocks, device=dev, generator=g)[: b * max_blocks].view(b, max_blocks)
    q = rnd(b, hq, d)
    scale = d**-0.5
    want = aref.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens, scale)
    for splits in (None, 1, 4):
        got = at.paged_decode_attention(q, kc, vc, tables, lens, scale, num_splits=splits)
        out[f"decode_splits_{splits}_rel_err"] = rel_error(got, want)
    got = at.paged_decode_attention(q, kc, vc, tables, lens, scale, sliding_window=1000)
    out["decode_window_rel_err"] = rel_error(got, aref.paged_decode_attention_ref(
        q.float(), kc.float(), vc.float(), tables, lens, scale, 1000))
    del kc, vc, want

    # ragged prefill: 4 chunks with cached prefixes, then without
    chunks_spec = [(0, 512), (300, 700), (1024, 64), (17, 1000)]
    blocks_needed = sum(-(-(p + n) // bs) for p, n in chunks_spec)
    kc, vc = rnd(blocks_needed + 4, bs, hk, d), rnd(blocks_needed + 4, bs, hk, d)
    perm = torch.randperm(blocks_needed + 4, device=dev, generator=g)
    total = sum(n for _, n in chunks_spec)
    q, k, v = rnd(total, hq, d), rnd(total, hk, d), rnd(total, hk, d)

    class C:
        def __init__(self, start, n, ctx_len, table):
            self.start, self.num_tokens, self.context_len, self.block_table = start, n, ctx_len, table

    chunks, row, used = [], 0, 0
    for prefix, n in chunks_spec:
        need = -(-(prefix + n) // bs)
        table = perm[used:used + need].contiguous()
        used += need
        pos = torch.arange(prefix, prefix + n, device=dev)
        aref.write_kv_ref(kc, vc, k[row:row + n], v[row:row + n], table[pos // bs] * bs + pos % bs)
        chunks.append(C(row, n, prefix + n, table))
        row += n
    got = at.paged_prefill_attention_ragged(q, kc, vc, at.RaggedPrefill.from_chunks(chunks), scale)
    want = torch.cat([aref.paged_prefill_attention_ref(q[c.start:c.start + c.num_tokens].float(), kc.float(),
                                                       vc.float(), c.block_table, c.context_len, scale)
                      for c in chunks])
    out["prefill_prefix_rel_err"] = rel_error(got, want)

    # norm, rotary, kv pack at Llama-3-8B widths
    x, res, w = rnd(4096, 4096), rnd(4096, 4096), rnd(4096)
    out["rms_norm_rel_err"] = rel_error(norm_triton.rms_norm(x, w, 1e-5), norm.rms_norm_ref(x.float(), w.float(), 1e-5))
    got_n, got_s = norm_triton.add_rms_norm(x, res, w, 1e-5)
    want_n, want_s = norm.add_rms_norm_ref(x, res, w, 1e-5)
    out["add_rms_norm_rel_err"] = max(rel_error(got_n, want_n), rel_error(got_s, want_s))
    out["rms_norm_us"] = 1e6 * bench_s(lambda: norm_triton.add_rms_norm(x, res, w, 1e-5), dev)
    out["rms_norm_ref_us"] = 1e6 * bench_s(lambda: norm.add_rms_norm_ref(x, res, w, 1e-5), dev)
    spec = rotary.RopeSpec(head_dim=128, theta=500000.0)
    cos, sin = rotary.rope_cos_sin(spec, 8192)
    pos = torch.randint(0, 8192, (4096,), device=dev, generator=g)
    cos, sin = cos.to(dev)[pos], sin.to(dev)[pos]
    qr, kr = rnd(4096, 32, 128), rnd(4096, 8, 128)
    got_q, got_k = rotary_triton.apply_rotary(qr, kr, cos, sin)
    want_q, want_k = rotary.apply_rotary_ref(qr.float(), kr.float(), cos, sin)
    out["rotary_rel_err"] = max(rel_error(got_q, want_q), rel_error(got_k, want_k))
    kc, vc = rnd(300, 16, 8, 128), rnd(300, 16, 8, 128)
    want_kc, want_vc = kc.clone(), vc.clone()
    vr, slots = rnd(4096, 8, 128), torch.randperm(300 * 16, device=dev, generator=g)[:4096]
    got_q, got_k = rotary_triton.apply_rotary_and_write_kv(qr, kr, vr, cos, sin, kc, vc, slots)
    aref.write_kv_ref(want_kc, want_vc, rotary.apply_rotary_ref(qr, kr, cos, sin)[1], vr, slots)
    out["rotary_kv_write_rel_err"] = max(rel_error(got_q, want_q), rel_error(got_k, want_k), rel_error(kc, want_kc))
    out["rotary_kv_write_v_exact"] = bool(torch.equal(vc, want_vc))
    gu = rnd(4096, 2 * 14336)
    out["silu_and_mul_rel_err"] = rel_error(activation_triton.silu_and_mul(gu), activation.silu_and_mul_ref(gu.float()))
    cache = rnd(8, 2, 512, 16, 8, 128)
    blocks = torch.randperm(512, device=dev, generator=g)[:100]
    packed = kv_pack_triton.pack_kv_blocks(cache, slice(2, 6), slice(0, 4), blocks)
    out["kv_pack_exact"] = bool(torch.equal(packed, kv_pack.pack_kv_blocks_ref(cache, slice(2, 6), slice(0, 4), blocks)))
    errs = [v for key, v in out.items() if key.endswith("rel_err")]
    out["max_rel_err"] = max(errs)
    out["pass"] = all(e < 1e-2 for e in errs) and out["kv_pack_exact"] and out["rotary_kv_write_v_exact"]
    return out


def section_attention(ctx: "Ctx") -> dict:
    """The paged decode kernel alone: batch 64, 4k context, Llama-3-8B heads, one layer."""
    import torch

    from splitserve.kernels import attention_triton as at

    dev = ctx.device
    b, hq, hk, d, bs, n = 64, 32, 8, 128, 16, 4096
    max_blocks = n // bs
    num_blocks = b * max_blocks
    g = torch.Generator(device=dev).manual_seed(1)
    kc = torch.randn(num_blocks, bs, hk, d, device=dev, generator=g).to(torch.bfloat16)
    vc = torch.randn(num_blocks, bs, hk, d, device=dev, generator=g).to(torch.bfloat16)
    tables = torch.randperm(num_blocks, device=dev, generator=g).view(b, max_blocks)
    lens = torch.full((b,), n, device=dev, dtype=torch.int64)
    q = torch.randn(b, hq, d, device=dev, generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    kv_bytes = 2 * b * n * hk * d * 2
    res: dict[str, Any] = {"kv_bytes": kv_bytes}
    best = None
    for splits in (None, 1, 2, 4, 8):
        t = bench_s(lambda: at.paged_decode_attention(q, kc, vc, tables, lens, d**-0.5, out=out, num_splits=splits),
                    dev, warmup=5, iters=50)
        frac = kv_bytes / t / ctx.copy_bw
        res[f"splits_{splits}_us"] = 1e6 * t
        res[f"splits_{splits}_frac_of_copy"] = frac
        if splits is None:
            res["default_frac_of_copy"] = frac
        best = max(best or 0.0, frac)
    res["best_frac_of_copy"] = best
    res["target"] = TARGETS["attention_frac_of_copy"]
    return res


def _llm_weight_bytes(llm) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.executor_for_tests.runner.model.parameters())


def _distinct_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    hi = max(200, vocab - 100)
    return [[rng.randrange(100, hi) for _ in range(length)] for _ in range(count)]


def decode_step_s(llm, batch: int, prompt_len: int, out_len: int, seed: int, vocab: int) -> float:
    """Median host time of the engine's pure decode steps (every prompt prefilled)."""
    from splitserve import SamplingParams

    engine = llm.engine
    for i, p in enumerate(_distinct_prompts(batch, prompt_len, vocab, seed)):
        engine.add_request(f"d{seed}-{i}", p, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        decoding = not engine.scheduler.waiting and all(s.num_uncomputed_tokens == 1 for s in engine.scheduler.running)
        t = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - t)
    times = sorted(times[2:]) or [float("nan")]
    return times[len(times) // 2]


def _set_kernels(mode: str) -> None:
    from splitserve.kernels import dispatch

    os.environ[dispatch.ENV_VAR] = mode
    dispatch.kernel_mode.cache_clear()


def distinct_experts_per_step(llm, batch: int, prompt_len: int, out_len: int, seed: int, vocab: int) -> list[int]:
    """Distinct experts each sparse layer's fused MoE call sees in the pure decode steps of
    ``batch`` sequences: an untimed pass, eager (a CUDA graph replay would not call Python)
    and synchronous, with `dispatch.fused_moe` wrapped to count ``ids.unique()``, then restored."""
    from splitserve import SamplingParams
    from splitserve.kernels import dispatch

    engine, runner = llm.engine, llm.engine.executor_for_tests.runner
    original, eager, lookahead = dispatch.fused_moe, runner.enforce_eager, engine.scheduler.lookahead
    counts: list[int] = []
    recording = [False]

    def counting(x, experts, weights, ids, *args, **kwargs):
        if recording[0]:
            counts.append(int(ids.unique().numel()))
        return original(x, experts, weights, ids, *args, **kwargs)

    dispatch.fused_moe = counting
    runner.enforce_eager, engine.scheduler.lookahead = True, False
    try:
        for i, p in enumerate(_distinct_prompts(batch, prompt_len, vocab, seed)):
            engine.add_request(f"x{seed}-{i}", p, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            recording[0] = (not engine.scheduler.waiting
                            and all(s.num_uncomputed_tokens == 1 for s in engine.scheduler.running))
            engine.step()
    finally:
        dispatch.fused_moe = original
        runner.enforce_eager, engine.scheduler.lookahead = eager, lookahead
    return counts


def section_decode(ctx: "Ctx") -> dict:
    """Decode steps vs their floors. Two floors: "all weights" (every parameter, the whole
    embedding table too: what the dense targets were set against) and "bytes read" (the issue 17
    definition: non-expert weights, one embedding row, the distinct experts the step touches:
    top_k per sparse layer at batch 1, the mean measured by `distinct_experts_per_step` at the
    big batch). ``*_vs_floor`` is against the dense model's all-weights floor or the MoE model's
    bytes-read floor (its targets' meaning); ``*_vs_read_floor`` always against bytes read."""
    llm, runner = ctx.llm, ctx.llm.engine.executor_for_tests.runner
    a, shape = ctx.args, ctx.shape
    weight_bytes = _llm_weight_bytes(llm)
    kv_token = shape.kv_bytes_per_token(ctx.elem_bytes)
    b1_len, b64_len = (16, 32) if a.tiny else (128, 1024)
    big = 4 if a.tiny else 64
    out_len = 8 if a.tiny else (24 if a.quick else 48)
    kv_b1, kv_big = (b1_len + out_len / 2) * kv_token, big * (b64_len + out_len / 2) * kv_token
    extra: dict[str, Any] = {}
    experts_big = 0.0
    if shape.is_moe:
        counts = distinct_experts_per_step(llm, big, b64_len, out_len, seed=4242, vocab=shape.vocab)
        experts_big = sum(counts) / len(counts) if counts else float("nan")
        extra |= {f"experts_per_layer_b{big}_mean": experts_big,
                  f"experts_per_layer_b{big}_min": min(counts, default=0),
                  f"experts_per_layer_b{big}_uniform": expected_distinct_experts(shape.num_experts, shape.top_k, big),
                  "experts_per_layer_b1": shape.top_k, "expert_calls_counted": len(counts)}
    read_b1 = shape.step_read_bytes(shape.top_k, ctx.elem_bytes, ctx.linear_bytes)
    read_big = shape.step_read_bytes(experts_big, ctx.elem_bytes, ctx.linear_bytes)
    read_floor_b1 = decode_floor_s(read_b1, kv_b1, ctx.copy_bw)
    read_floor_big = decode_floor_s(read_big, kv_big, ctx.copy_bw)
    if shape.is_moe:
        floor_b1, floor_big, kind = read_floor_b1, read_floor_big, "bytes read"
    else:
        floor_b1, kind = decode_floor_s(weight_bytes, kv_b1, ctx.copy_bw), "all weights"
        floor_big = decode_floor_s(weight_bytes, kv_big, ctx.copy_bw)
    extra |= {"floor_kind": kind, "read_GB_b1": read_b1 / 1e9, f"read_GB_b{big}": read_big / 1e9,
              "read_floor_b1_ms": 1e3 * read_floor_b1, f"read_floor_b{big}_ms": 1e3 * read_floor_big}
    res: dict[str, Any] = {"weight_GB": weight_bytes / 1e9, "floor_b1_ms": 1e3 * floor_b1,
                           f"floor_b{big}_ms": 1e3 * floor_big, "graphs_captured": runner.cuda_graphs is not None}
    # (name, kernels, eager, async scheduling): the first is what serving runs.
    variants = [("triton_graphs", "auto", False, True), ("triton_graphs_sync", "auto", False, False),
                ("triton_eager", "auto", True, True), ("torch_eager", "torch", True, True)]
    if ctx.device.type == "cpu":
        variants = [("torch_eager", "auto", True, False)]
    elif a.decode_variants:  # a short device budget: only the variants asked for
        variants = [v for v in variants if v[0] in a.decode_variants.split(",")]
    engine, default_async = llm.engine, llm.engine.async_scheduling
    for name, mode, eager, use_async in variants:
        if name.startswith("triton_graphs") and runner.cuda_graphs is None:
            res[name] = "no graphs captured"
            continue
        _set_kernels(mode)
        runner.enforce_eager = eager
        engine.scheduler.lookahead = use_async
        try:
            for batch, plen, key in ((1, b1_len, "b1"), (big, b64_len, f"b{big}")):
                log(f"decode {name} batch {batch}")
                t = decode_step_s(llm, batch, plen, out_len, seed=len(res) * 7 + batch, vocab=shape.vocab)
                res[f"{name}_{key}_ms"] = 1e3 * t
                res[f"{name}_{key}_vs_floor"] = t / (floor_b1 if batch == 1 else floor_big)
                extra[f"{name}_{key}_vs_read_floor"] = t / (read_floor_b1 if batch == 1 else read_floor_big)
        finally:
            _set_kernels("auto")
            runner.enforce_eager = runner.cuda_graphs is None
            engine.scheduler.lookahead = default_async
    res["async_scheduling"] = default_async
    res["targets"] = {"b1": ctx.targets["decode_b1_vs_floor"], "b64": ctx.targets["decode_b64_vs_floor"]}
    return res | extra


def section_prefill(ctx: "Ctx") -> dict:
    import torch

    from splitserve import SamplingParams

    a, engine = ctx.args, ctx.llm.engine
    n_seq, n_tok = (2, 64) if a.tiny else (8, 2048)
    flops = prefill_flops(ctx.shape, [n_tok] * n_seq)
    times = []
    for rep in range(2 if a.tiny else 3):
        for i, p in enumerate(_distinct_prompts(n_seq, n_tok, ctx.shape.vocab, seed=1000 + rep)):
            engine.add_request(f"p{rep}-{i}", p, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        sync(ctx.device)
        t = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        sync(ctx.device)
        times.append(time.perf_counter() - t)
    t = min(times[1:]) if len(times) > 1 else times[0]
    res = {"tokens": n_seq * n_tok, "steps": steps, "flops": flops, "s": t, "TFLOPs": flops / t / 1e12,
           "frac_of_matmul": flops / t / ctx.matmul_flops, "target": ctx.targets["prefill_frac_of_matmul"]}
    try:
        res |= _hf_prefill(ctx, n_seq, n_tok, flops)
    except Exception as exc:  # noqa: BLE001
        res["hf_error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        free_memory()
    return res


def _hf_model(ctx: "Ctx"):
    import torch
    from transformers import AutoModelForCausalLM

    from splitserve.workers.model_source import resolve_model

    if ctx.hf_model is None:
        if ctx.device.type == "cuda":
            # A second copy of the weights beside the engine's (Qwen3-30B-A3B: 61 GB twice) may
            # not fit: say so instead of an OOM in the middle of the section.
            free_memory()
            need, free = ctx.shape.total_params * ctx.elem_bytes, torch.cuda.mem_get_info(ctx.device)[0]
            if need * 1.1 > free:
                raise RuntimeError(f"skipped: transformers' copy needs {need / 1e9:.1f} GB, "
                                   f"{free / 1e9:.1f} GB free beside the engine")
        with torch.device(ctx.device):
            model = AutoModelForCausalLM.from_config(resolve_model(ctx.model_name).hf_config,
                                                     dtype=ctx.dtype, attn_implementation="sdpa")
        ctx.hf_model = model.eval()
    return ctx.hf_model


def _hf_prefill(ctx: "Ctx", n_seq: int, n_tok: int, flops: float) -> dict:
    import torch

    model = _hf_model(ctx)
    ids = torch.randint(100, ctx.shape.vocab - 100, (n_seq, n_tok), device=ctx.device)
    with torch.inference_mode():
        t = bench_s(lambda: model.model(input_ids=ids, use_cache=False), ctx.device, warmup=1,
                    iters=2 if ctx.args.tiny else 3)
    return {"hf_s": t, "hf_TFLOPs": flops / t / 1e12, "hf_frac_of_matmul": flops / t / ctx.matmul_flops,
            "hf_note": "base model forward (no lm_head), sdpa, same FLOP count"}


def section_offline(ctx: "Ctx") -> dict:
    """The offline workload on the model; with ``--compare-model`` the same workload on a
    second model after the first is released (same process, same ceilings): ``models`` is the
    table of both. A later section that needs an engine builds the first model's again."""
    res = _offline_one(ctx)
    compare = ctx.args.compare_model
    if not compare:
        return res
    primary = ctx.model_name
    rows = [_offline_row(ctx, res)]
    try:
        ctx.use_model(compare)
        other = _offline_one(ctx)
        rows.append(_offline_row(ctx, other))
    except Exception as exc:  # noqa: BLE001  the first model's figures still count
        other = {"error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-3000:]}
        rows.append({"model": compare, "error": other["error"]})
    finally:
        ctx.use_model(primary)
    return res | {"compare": other, "models": rows}


def _offline_row(ctx: "Ctx", res: dict) -> dict:
    shape = ctx.shape
    return {"model": ctx.model_name, "output_tok_s": res["output_tok_s"], "s": res["s"],
            "roofline_s": res["roofline"]["total_s"], "vs_roofline": res["vs_roofline"],
            "total_params_B": shape.total_params / 1e9,
            "active_params_B": (shape.active_linear_params + shape.vocab * shape.hidden) / 1e9}


def _offline_one(ctx: "Ctx") -> dict:
    from splitserve import SamplingParams

    a, llm = ctx.args, ctx.engine()
    n = a.num_requests
    in_len, out_len = (32, 8) if a.tiny else (1024, 128)
    prompts = _distinct_prompts(n, in_len, ctx.shape.vocab, seed=7)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    sync(ctx.device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(ctx.device)
    t = time.perf_counter() - t
    generated = sum(len(o.token_ids) for o in outs)
    # Dense: every weight each step (as before). MoE: the non-expert weights and one embedding
    # row; the roofline adds the experts each wave touches.
    weight_bytes = (ctx.shape.step_read_params(0) * ctx.elem_bytes if ctx.shape.is_moe else _llm_weight_bytes(llm))
    roof = offline_roofline_s(n, in_len, out_len, ctx.max_num_seqs, ctx.shape, weight_bytes, ctx.elem_bytes,
                              ctx.matmul_flops, ctx.copy_bw)
    res = {"model": ctx.model_name, "num_requests": n, "input_len": in_len, "output_len": out_len, "s": t,
           "output_tok_s": generated / t, "roofline": roof, "vs_roofline": t / roof["total_s"]}
    try:
        res |= _hf_generate(ctx, in_len, out_len)
    except Exception as exc:  # noqa: BLE001
        res["hf_error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        ctx.hf_model = None
        free_memory()
    return res


def _hf_generate(ctx: "Ctx", in_len: int, out_len: int) -> dict:
    import torch

    model = _hf_model(ctx)
    batch = 4 if ctx.args.tiny else 128
    ids = torch.randint(100, ctx.shape.vocab - 100, (batch, in_len), device=ctx.device)
    kw = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :16], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        sync(ctx.device)
        t = time.perf_counter()
        for _ in range(ctx.args.hf_batches):
            model.generate(ids, **kw)
        sync(ctx.device)
        t = time.perf_counter() - t
    return {"hf_batch": batch, "hf_batches": ctx.args.hf_batches,
            "hf_output_tok_s": batch * out_len * ctx.args.hf_batches / t}


def section_correctness(ctx: "Ctx") -> dict:
    """Greedy tokens vs transformers (the tiny random float32 shape of the model's family),
    bf16 logits vs float32."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from splitserve import LLM, SamplingParams
    from splitserve.workers.model_source import random_config
    from splitserve.workers.models.attention import AttentionMetadata, PrefillChunk

    dev = ctx.device
    prompts = [[5, 6, 7, 8], [9] * 40, list(range(3, 60))]
    res: dict[str, Any] = {"model": f"random:{ctx.tiny_name}"}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(random_config(ctx.tiny_name), dtype=torch.float32)
        hf.save_pretrained(folder)
        hf = hf.to(dev).eval()
        want = []
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p], device=dev)
                gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                  pad_token_id=0)
                want.append(gen[0, len(p):].tolist())
        with LLM(folder, device=dev.type, dtype="float32", show_progress=False) as llm:
            got = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))]
        res["greedy_match_hf"] = got == want
        res["greedy_rows_equal"] = sum(g == w[:len(g)] for g, w in zip(got, want))
        logits = {}
        for dtype in ("float32", "bfloat16"):
            with LLM(folder, device=dev.type, dtype=dtype, show_progress=False, enable_prefix_caching=False) as llm:
                runner = llm.engine.executor_for_tests.runner
                p = prompts[2]
                n, bs = len(p), runner.kv_cache.spec.block_size
                table = torch.arange(-(-n // bs), device=dev)
                meta = AttentionMetadata(slot_mapping=torch.arange(n, device=dev), num_decode=0,
                                         decode_block_tables=None, decode_context_lens=None,
                                         prefills=(PrefillChunk(0, n, n, table),))
                with torch.inference_mode():
                    hidden = runner.model(torch.tensor(p, device=dev), torch.arange(n, device=dev), runner.kv_layers,
                                          meta)
                    logits[dtype] = runner.model.compute_logits(hidden).float()
        res["bf16_logits_rel_err"] = rel_error(logits["bfloat16"], logits["float32"])
    res["pass"] = res["greedy_match_hf"] and res["bf16_logits_rel_err"] < 2e-2
    return res


# ---- driver -------------------------------------------------------------------------------


#: Issue 17's figures for a mixture-of-experts model (decode floors count the bytes read).
MOE_TARGETS = {**TARGETS, "decode_b1_vs_floor": 1.5, "decode_b64_vs_floor": 1.3, "prefill_frac_of_matmul": 0.45}
#: The tiny random shape the correctness section checks for a model family.
TINY_OF_FAMILY = {"llama": "tiny-llama", "mistral": "tiny-mistral", "qwen2": "tiny-qwen2", "qwen3": "tiny-qwen3",
                  "qwen3_moe": "tiny-qwen3-moe", "mixtral": "tiny-mixtral"}


class Ctx:
    def __init__(self, args):
        import torch

        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.elem_bytes = 4 if args.tiny else 2
        #: Bytes a projection weight takes (FP8 weights: 1; embeddings, lm_head, norms, routers stay).
        self.linear_bytes = 1 if args.quantization == "fp8" else self.elem_bytes
        self.max_num_seqs = 8 if args.tiny else 256
        # Set by section_ceilings; GPU.md's H100 figures until then (used only if it failed).
        self.copy_bw, self.matmul_flops = 3.0e12, 7.9e14
        self.llm = None
        self.hf_model = None
        self.use_model(args.model or ("random:tiny-llama" if args.tiny else "random:llama-3-8b"))

    def use_model(self, name: str) -> None:
        """Release the engine (if any) and make ``name`` the model the engine sections build."""
        from splitserve.workers.config import ModelConfig
        from splitserve.workers.model_source import resolve_model

        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        self.hf_model = None
        free_memory()
        self.model_name = name
        cfg = ModelConfig.from_hf(resolve_model(name).hf_config)
        self.shape = ModelShape.from_config(cfg)
        self.targets = MOE_TARGETS if cfg.is_moe else TARGETS
        body = name.removeprefix("random:").split("@")[0]
        self.tiny_name = body if body.startswith("tiny-") else TINY_OF_FAMILY.get(cfg.model_type, "tiny-llama")

    def engine(self):
        if self.llm is None:
            from splitserve import LLM

            os.environ.setdefault("SPLITSERVE_CUDA_GRAPH_MAX_BATCH", str(self.max_num_seqs))
            t = time.perf_counter()
            self.llm = LLM(self.model_name, device=self.args.device, dtype=str(self.dtype).removeprefix("torch."),
                           kv_cache_memory=(64 << 20) if self.args.tiny else (self.args.kv_gb << 30),
                           max_num_seqs=self.max_num_seqs, max_num_batched_tokens=256 if self.args.tiny else 16384,
                           show_progress=False, quantization=self.args.quantization)
            self.shape = ModelShape.from_config(self.llm.engine.executor_for_tests.runner.model_cfg)
            log(f"engine ready in {time.perf_counter() - t:.1f} s: {self.model_name}")
        return self.llm


SECTIONS: dict[str, Callable[[Ctx], dict]] = {
    "ceilings": section_ceilings, "kernels": section_kernels, "attention": section_attention,
    "decode": section_decode, "prefill": section_prefill, "offline": section_offline, "correctness": section_correctness,
}
NEEDS_ENGINE = {"decode", "prefill", "offline"}
NEEDS_CUDA = {"kernels", "attention"}


def run_sections(ctx: Ctx, names: list[str], report: dict) -> None:
    import torch

    for name in names:
        if name in NEEDS_CUDA and ctx.device.type != "cuda":
            report[name] = {"skipped": "needs CUDA"}
            continue
        log(f"section {name} ...")
        t = time.perf_counter()
        try:
            if name in NEEDS_ENGINE:
                ctx.engine()
            report[name] = SECTIONS[name](ctx)
        except torch.cuda.OutOfMemoryError as exc:
            report[name] = {"error": f"OOM: {str(exc)[:300]}"}
        except Exception as exc:  # noqa: BLE001  one section's failure must not lose the others
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-3000:]}
        report[name]["section_s"] = round(time.perf_counter() - t, 2)
        log(f"section {name} done in {report[name]['section_s']} s"
            + (f": ERROR {report[name]['error'][:200]}" if "error" in report[name] else ""))
        free_memory()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(report: dict) -> str:
    rows = [("section", "figure", "value")]
    keep = ("TBps", "TFLOPs", "rel_err", "_ms", "vs_floor", "frac", "tok_s", "vs_roofline", "pass", "match", "error",
            "_us", "_s", "_GB", "vs_read_floor", "experts_per_layer", "floor_kind", "model")
    for name in SECTIONS:
        sec = report.get(name)
        if not isinstance(sec, dict):
            continue
        for key, v in sec.items():
            if key in ("traceback",) or isinstance(v, (dict, list)):
                continue
            if any(k in key for k in keep):
                rows.append((name, key, _fmt(v)[:70]))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)
    models = report.get("offline", {}).get("models") if isinstance(report.get("offline"), dict) else None
    if models:
        text += "\n\n" + format_models(models)
    return text


def format_models(models: list[dict]) -> str:
    """The offline comparison: one row per model."""
    cols = ("model", "output_tok_s", "s", "roofline_s", "vs_roofline", "total_params_B", "active_params_B")
    rows = [cols] + [tuple(_fmt(m.get(c, m.get("error", "")) if c != "model" else m["model"])[:60] for c in cols)
                     for m in models]
    width = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)


def write_plot(path: Path, report: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    dec = report.get("decode", {})
    bars = {k.removesuffix("_vs_floor"): v for k, v in dec.items() if k.endswith("_vs_floor") and isinstance(v, float)}
    for key, label in (("prefill", "prefill frac of matmul"), ("attention", "attn frac of copy")):
        sec = report.get(key, {})
        val = sec.get("frac_of_matmul", sec.get("best_frac_of_copy"))
        if isinstance(val, float):
            bars[label] = val
    offline = report.get("offline", {})
    models = [m for m in offline.get("models", []) if "output_tok_s" in m] if isinstance(offline, dict) else []
    if not bars and not models:
        return
    fig, axes = plt.subplots(1, 1 + bool(models) if bars else 1, figsize=(13 if bars and models else 9, 4),
                             squeeze=False)
    axes = list(axes[0])
    if bars:
        ax = axes.pop(0)
        ax.bar(list(bars), list(bars.values()))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"{report.get('model', '')}: decode step / floor;\nprefill, attention: fraction of ceiling",
                     fontsize=9)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    if models:
        ax = axes.pop(0)
        names = [m["model"].removeprefix("random:") for m in models]
        ax.bar(names, [m["output_tok_s"] for m in models], color="tab:green")
        for i, m in enumerate(models):
            ax.annotate(f"{m['output_tok_s']:.0f} tok/s\n{m['vs_roofline']:.2f}x roofline", (i, m["output_tok_s"]),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"offline {offline.get('num_requests')} x ({offline.get('input_len')} in / "
                     f"{offline.get('output_len')} out)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=results_meta.RESULTS_DIR)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny float32 model and shapes (smoke test; CPU works)")
    p.add_argument("--model", default=None, help="model of the engine sections (default random:llama-3-8b, "
                   "--tiny random:tiny-llama): random:<shape> or a folder; e.g. random:qwen3-30b-a3b")
    p.add_argument("--compare-model", default=None,
                   help="offline section: the same workload on this model too, after the first is released")
    p.add_argument("--quick", action="store_true", help="fewer decode steps and repetitions")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="FP8 weights (projections and MoE experts; decode floors count them at 1 byte)")
    p.add_argument("--num-requests", type=int, default=None, help="offline section (default 1000, tiny 8)")
    p.add_argument("--hf-batches", type=int, default=1, help="transformers generate() batches of 128 to time")
    p.add_argument("--kv-gb", type=int, default=60, help="KV cache budget of the engine, GiB")
    p.add_argument("--decode-variants", default="",
                   help="decode section: comma list of triton_graphs,triton_graphs_sync,triton_eager,torch_eager "
                        "(default: all)")
    p.add_argument("--sections", default=",".join(["correctness", "ceilings", "kernels", "attention", "decode",
                                                     "prefill", "offline"]))
    args = p.parse_args(argv)
    for flag, name in (("--model", args.model), ("--compare-model", args.compare_model)):
        if args.tiny and name and not name.removeprefix("random:").startswith("tiny-"):
            p.error(f"--tiny runs tiny float32 shapes: {flag} must name one (random:tiny-...), got {name!r}")
    if args.num_requests is None:
        args.num_requests = 8 if args.tiny else 1000
    return args


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse_args(argv)
    now = datetime.now(timezone.utc)
    dev = torch.device(args.device)
    device_info = {"name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else results_meta.cpu_model(),
                   "torch": torch.__version__}
    try:
        import triton

        device_info["triton"] = triton.__version__
    except ImportError:
        pass
    import transformers

    device_info["transformers"] = transformers.__version__
    report = results_meta.report_header("gpu_perf", __file__, sys.argv[1:] if argv is None else argv, now, device_info)
    ctx = Ctx(args)
    report["model"] = ctx.model_name
    report["targets"] = ctx.targets
    t0 = time.perf_counter()
    try:
        run_sections(ctx, [s.strip() for s in args.sections.split(",") if s.strip()], report)
    finally:
        if ctx.llm is not None:
            ctx.llm.shutdown()
    report["total_s"] = round(time.perf_counter() - t0, 1)
    out = args.out / f"gpu_perf_{results_meta.slug(device_info['name'])}_{now:%Y-%m-%dT%H%M}.json"
    results_meta.save_report(out, report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
