"""The FP8 (e4m3) KV cache's kernels: the references' quantized write and dequantized reads
against plain float attention, and the Triton write (fused with rotary), decode and prefill
kernels against those references, in Triton's interpreter (`triton_interpreter`) at tiny
shapes. Scales are per KV head and deliberately not powers of two (a checkpoint's may not be),
so a kernel that applied the wrong head's scale, or none, is off by far more than the
tolerance."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.attention import (
    FP8_MAX, dequantize_fp8, paged_decode_attention_ref, paged_prefill_attention_ref, quantize_fp8, write_kv_ref,
)
from splitserve.kernels.rotary import RopeSpec, apply_rotary_ref, rope_cos_sin

FP8 = torch.float8_e4m3fn
D, HK, HQ, BS, NUM_BLOCKS = 16, 2, 4, 4, 12
#: e4m3 keeps 3 mantissa bits: one rounding is within 2**-4 relative.
FP8_REL = 2.0 ** -4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def case():
    """A written FP8 cache and the float values it holds: 3 sequences of 5, 9 and 2 tokens."""
    g = gen(0)
    lens = [5, 9, 2]
    tables = [[3, 7], [0, 11, 5], [9]]
    k_scale = torch.tensor([0.013, 0.031])  # per head, not powers of two
    v_scale = torch.tensor([0.021, 0.0071])
    k = torch.randn(sum(lens), HK, D, generator=g) * torch.tensor([1.0, 3.0])[:, None]
    v = torch.randn(sum(lens), HK, D, generator=g) * torch.tensor([2.0, 0.5])[:, None]
    slots = torch.tensor([t[i // BS] * BS + i % BS for t, n in zip(tables, lens) for i in range(n)])
    caches = [torch.zeros(NUM_BLOCKS, BS, HK, D, dtype=FP8) for _ in range(2)]
    write_kv_ref(*caches, k, v, slots, k_scale, v_scale)
    float_caches = [torch.zeros(NUM_BLOCKS, BS, HK, D) for _ in range(2)]
    write_kv_ref(*float_caches, k, v, slots)
    return dict(lens=lens, tables=tables, k=k, v=v, slots=slots, caches=caches, float_caches=float_caches,
                k_scale=k_scale, v_scale=v_scale, q=torch.randn(len(lens), HQ, D, generator=g))


def padded_tables(tables):
    width = max(map(len, tables))
    return torch.tensor([t + [1] * (width - len(t)) for t in tables])


def test_quantize_roundtrip_within_fp8_error():
    x = torch.randn(64, HK, D, generator=gen(1)) * 5
    scale = torch.tensor([0.07, 0.1])  # |x| / scale stays under 448: no saturation
    q = quantize_fp8(x, scale, FP8)
    assert q.dtype == FP8
    back = dequantize_fp8(q, scale, 1, torch.float32)
    assert ((back - x).abs() <= FP8_REL * x.abs() + 2.0 ** -9 * scale[:, None]).all()
    # Saturates instead of overflowing to NaN.
    big = quantize_fp8(torch.full((1, HK, D), 1e6), scale, FP8)
    assert torch.isfinite(big.float()).all() and (big.float() == FP8_MAX).all()


def test_reference_reads_dequantize(case):
    lens = torch.tensor(case["lens"])
    tables = padded_tables(case["tables"])
    got = paged_decode_attention_ref(case["q"], *case["caches"], tables, lens, D ** -0.5,
                                     k_scale=case["k_scale"], v_scale=case["v_scale"])
    want = paged_decode_attention_ref(case["q"], *case["float_caches"], tables, lens, D ** -0.5)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < 0.05  # quantized (not bit-identical), yet within e4m3 error
    # Without the scales the stored FP8 values alone are far off: the scales are applied.
    wrong = paged_decode_attention_ref(case["q"], *case["caches"], tables, lens, D ** -0.5,
                                       k_scale=torch.ones(HK), v_scale=torch.ones(HK))
    assert ((wrong - want).norm() / want.norm()).item() > 0.5
    # Prefill over a cached prefix: sequence 1's last 3 tokens.
    q = torch.randn(3, HQ, D, generator=gen(2))
    table = torch.tensor(case["tables"][1])
    got = paged_prefill_attention_ref(q, *case["caches"], table, 9, D ** -0.5,
                                      k_scale=case["k_scale"], v_scale=case["v_scale"])
    want = paged_prefill_attention_ref(q, *case["float_caches"], table, 9, D ** -0.5)
    assert ((got - want).norm() / want.norm()).item() < 0.05


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rotary_write_matches_reference(dtype):
    from splitserve.kernels import rotary_triton

    g = gen(3)
    t = 6
    q = torch.randn(t, HQ, D, generator=g).to(dtype)
    k = (torch.randn(t, HK, D, generator=g) * 2).to(dtype)  # some saturate at 448, most not
    v = (torch.randn(t, HK, D, generator=g) * 2).to(dtype)
    cos, sin = rope_cos_sin(RopeSpec(D, 10000.0), 32)
    pos = torch.tensor([0, 3, 9, 17, 30, 1])
    slots = torch.tensor([0, 5, 6, 13, 40, 47])
    k_scale, v_scale = torch.tensor([0.013, 0.031]), torch.tensor([0.021, 0.0071])
    ref = [torch.zeros(NUM_BLOCKS, BS, HK, D, dtype=FP8) for _ in range(2)]
    got = [torch.zeros(NUM_BLOCKS, BS, HK, D, dtype=FP8) for _ in range(2)]
    rq, rk = apply_rotary_ref(q, k, cos[pos], sin[pos])
    write_kv_ref(*ref, rk, v, slots, k_scale, v_scale)
    tq, tk = rotary_triton.apply_rotary_and_write_kv(q, k, v, cos[pos], sin[pos], *got, slots, k_scale, v_scale)
    assert torch.equal(tq, rq) and torch.equal(tk, rk)
    for r, o in zip(ref, got):  # the same e4m3 bytes (both round to nearest even)
        assert torch.equal(o.view(torch.uint8), r.view(torch.uint8))
    assert got[0].view(torch.uint8).any()


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_qk_norm_rotary_write_matches_the_references(dtype):
    """Qwen3's per-head q/k RMSNorm in the same launch as the rotary and the quantizing write:
    the references in turn (`qk_norm_ref`, `apply_rotary_ref`, `write_kv_ref`)."""
    from splitserve.kernels import rotary_triton
    from splitserve.kernels.norm import QKNorm, qk_norm_ref

    g = gen(7)
    t = 6
    q = (torch.randn(t, HQ, D, generator=g) * 3).to(dtype)
    k = (torch.randn(t, HK, D, generator=g) * 3).to(dtype)
    v = (torch.randn(t, HK, D, generator=g) * 2).to(dtype)
    norm = QKNorm((1 + 0.5 * torch.randn(D, generator=g)).to(dtype), (4 * torch.rand(D, generator=g)).to(dtype), 1e-6)
    cos, sin = rope_cos_sin(RopeSpec(D, 10000.0), 32)
    pos = torch.tensor([0, 3, 9, 17, 30, 1])
    slots = torch.tensor([0, 5, 6, 13, 40, 47])
    k_scale, v_scale = torch.tensor([0.013, 0.031]), torch.tensor([0.021, 0.0071])  # normed k saturates some
    ref = [torch.zeros(NUM_BLOCKS, BS, HK, D, dtype=FP8) for _ in range(2)]
    got = [torch.zeros(NUM_BLOCKS, BS, HK, D, dtype=FP8) for _ in range(2)]
    rq, rk = qk_norm_ref(q, k, norm)
    rq, rk = apply_rotary_ref(rq, rk, cos[pos], sin[pos])
    write_kv_ref(*ref, rk, v, slots, k_scale, v_scale)
    tq, tk = rotary_triton.apply_rotary_and_write_kv(q, k, v, cos[pos], sin[pos], *got, slots, k_scale, v_scale,
                                                     qk_norm=norm)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # the sum of squares' order: one rounding at most
    torch.testing.assert_close(tq, rq, rtol=tol, atol=tol)
    torch.testing.assert_close(tk, rk, rtol=tol, atol=tol)
    assert torch.equal(got[1].view(torch.uint8), ref[1].view(torch.uint8))  # v is not normalised
    # e4m3 bytes: equal but where k landed a rounding away (then one e4m3 step at most).
    deq = [dequantize_fp8(c, k_scale, 2, torch.float32) for c in (got[0], ref[0])]
    torch.testing.assert_close(deq[0], deq[1], rtol=FP8_REL, atol=0)
    assert (got[0].view(torch.uint8) == ref[0].view(torch.uint8)).float().mean() > 0.99
    assert (deq[1].abs() == FP8_MAX * k_scale[:, None]).any()  # the saturating branch ran


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize(("splits", "dtype", "swap"), [(1, torch.float32, 0), (3, torch.float32, 0),
                                                     (3, torch.bfloat16, 0), (3, torch.float32, 1),
                                                     (1, torch.bfloat16, 1), (3, torch.bfloat16, None)])
def test_triton_decode_matches_reference(case, splits, dtype, swap):
    """``swap`` None: the FP8 default launch shape (`DECODE_FP8`, its short-share warps)."""
    from splitserve.kernels import attention_triton
    from splitserve.kernels.attention_triton import DecodeConfig

    lens = torch.tensor(case["lens"])
    tables = padded_tables(case["tables"])
    kw = dict(k_scale=case["k_scale"], v_scale=case["v_scale"])
    q = case["q"].to(dtype)  # the model's dtype; the cache stays FP8
    want = paged_decode_attention_ref(q, *case["caches"], tables, lens, D ** -0.5, **kw)
    got = attention_triton.paged_decode_attention(q, *case["caches"], tables, lens, D ** -0.5,
                                                  num_splits=splits,
                                                  cfg=None if swap is None else DecodeConfig(block_n=16 if swap else 4,
                                                                                             swap=swap),
                                                  **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the reference rounds K/V to bf16 after scaling
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.usefixtures("triton_interpreter")
def test_triton_prefill_matches_reference(case):
    from splitserve.kernels import attention_triton

    # Sequence 1's last 3 tokens over its cached prefix, and sequence 0 whole (no prefix).
    g = gen(4)
    q = torch.randn(8, HQ, D, generator=g)
    kw = dict(k_scale=case["k_scale"], v_scale=case["v_scale"])
    chunks = [attention_triton._Chunk(0, 3, 9, torch.tensor(case["tables"][1])),
              attention_triton._Chunk(3, 5, 5, torch.tensor(case["tables"][0]))]
    batch = attention_triton.RaggedPrefill.from_chunks(chunks)
    got = attention_triton.paged_prefill_attention_ragged(q, *case["caches"], batch, D ** -0.5,
                                                          cfg=attention_triton.PrefillConfig(4, 4, 1, 1), **kw)
    for c in chunks:
        rows = slice(c.start, c.start + c.num_tokens)
        want = paged_prefill_attention_ref(q[rows], *case["caches"], c.block_table, c.context_len, D ** -0.5, **kw)
        torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("triton_interpreter")
def test_triton_pack_moves_fp8_blocks_as_bytes():
    # The transfer service packs an FP8 cache through its uint8 view (KVCache.transfer_data).
    from splitserve.kernels.kv_pack import pack_kv_blocks_ref, unpack_kv_blocks_ref
    from splitserve.kernels.kv_pack_triton import pack_kv_blocks, unpack_kv_blocks

    data = (torch.randn(3, 2, 10, BS, HK, D, generator=gen(5)) * 50).to(FP8)
    raw = data.view(torch.uint8)
    blocks = torch.tensor([7, 2, 5])
    got = pack_kv_blocks(raw, slice(1, 3), slice(1, 2), blocks)
    assert torch.equal(got, pack_kv_blocks_ref(raw, slice(1, 3), slice(1, 2), blocks))
    dst, ref = torch.zeros_like(raw), torch.zeros_like(raw)
    unpack_kv_blocks(dst, slice(1, 3), slice(1, 2), torch.tensor([0, 9, 4]), got)
    unpack_kv_blocks_ref(ref, slice(1, 3), slice(1, 2), torch.tensor([0, 9, 4]), got)
    assert torch.equal(dst, ref)
    assert torch.equal(dst.view(FP8)[1:3, :, 9, :, 1:2].float(), data[1:3, :, 2, :, 1:2].float())
