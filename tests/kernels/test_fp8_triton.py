"""The FP8 GPU paths (kernels/fp8_triton.py) against kernels/fp8.py, on CPU: the Triton kernels
in Triton's interpreter at tiny shapes (ragged N, K and M, partial scale blocks, split-K), and
the torch._scaled_mm path (which CPU torch runs too), then dispatch's choice by M and scheme."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import dispatch
from splitserve.kernels.fp8 import Fp8Scheme, fp8_linear_ref, fp8_weight_only_ref, quantize

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _case(m: int, n: int, k: int, scheme: Fp8Scheme, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = quantize(torch.randn(n, k, generator=g) * 0.05, scheme)
    x = torch.randn(m, k, generator=g).to(dtype)
    return x, w


@pytest.mark.parametrize("m,k,dtype", [(3, 300, torch.float32), (2, 2048, torch.bfloat16), (0, 128, torch.float32)])
def test_activation_quantization_kernels_give_the_references_bits(m, k, dtype):
    from splitserve.kernels import fp8, fp8_triton

    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)
    if m:
        x[0] = 0  # an all-zero row: the smallest scale, zeros out
        x[-1, :5] *= 1000  # one group far larger than the rest
    for triton_fn, ref_fn in [(fp8_triton.quantize_per_token, fp8.quantize_per_token),
                              (fp8_triton.quantize_per_token_group, fp8.quantize_per_token_group)]:
        (q, s), (want_q, want_s) = triton_fn(x), ref_fn(x)
        assert q.dtype == want_q.dtype and s.shape == want_s.shape
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)


def _weight_only_config(n, k, w, split_k=None, dot_f16=False):
    import dataclasses

    from splitserve.kernels.linear_triton import fp8_skinny_config

    block = w.block if w.scheme is Fp8Scheme.BLOCK else None
    cfg = fp8_skinny_config(n, k, 4, block)
    return dataclasses.replace(cfg, split_k=split_k or cfg.split_k, dot_f16=dot_f16), block


@pytest.mark.parametrize("scheme", list(Fp8Scheme))
@pytest.mark.parametrize("m,n,k,split_k", [(1, 72, 200, 1), (5, 130, 256, 2), (16, 64, 384, 3)])
def test_the_weight_only_decode_path_matches_the_reference(scheme, m, n, k, split_k):
    from splitserve.kernels.linear_triton import skinny_linear

    x, w = _case(m, n, k, scheme)
    cfg, block = _weight_only_config(n, k, w, split_k)
    got = skinny_linear(x, w.data, config=cfg, scale=w.scale, scale_block=block)
    assert got.shape == (m, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, fp8_weight_only_ref(x, w), rtol=1e-5, atol=1e-5)


def test_the_weight_only_decode_path_in_float16_rounds_once_at_the_end():
    from splitserve.kernels.linear_triton import skinny_linear

    x, w = _case(3, 64, 256, Fp8Scheme.BLOCK, torch.bfloat16)
    cfg, block = _weight_only_config(64, 256, w, dot_f16=True)
    got = skinny_linear(x, w.data, config=cfg, scale=w.scale, scale_block=block)
    want = fp8_weight_only_ref(x.to(torch.float16), w)  # float32 sums of float16 x and exact e4m3
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("m,n,k", [(3, 128, 256), (40, 200, 300)])
def test_block_w8a8_kernel_matches_the_reference(m, n, k):
    from splitserve.kernels.fp8_triton import fp8_block_linear

    x, w = _case(m, n, k, Fp8Scheme.BLOCK, seed=1)
    got = fp8_block_linear(x, w, block_m=16, block_n=64)
    torch.testing.assert_close(got, fp8_linear_ref(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", [Fp8Scheme.TENSOR, Fp8Scheme.CHANNEL])
def test_scaled_mm_path_matches_the_reference(scheme):
    from splitserve.kernels.fp8_triton import fp8_scaled_mm_linear

    x, w = _case(37, 48, 64, scheme, seed=2)  # 37 rows: padded to 48 for _scaled_mm, cut back
    got = fp8_scaled_mm_linear(x, w)
    assert got.shape == (37, 48)
    want = fp8_linear_ref(x, w)
    # _scaled_mm writes bf16 (rowwise scaling's output type): one bf16 rounding apart.
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)


def test_block_scales_are_refused_where_a_path_cannot_take_them():
    from splitserve.kernels.fp8_triton import fp8_block_linear, fp8_scaled_mm_linear

    x, w = _case(4, 16, 32, Fp8Scheme.BLOCK)
    with pytest.raises(ValueError, match="block"):
        fp8_scaled_mm_linear(x, w)
    _, wc = _case(4, 16, 32, Fp8Scheme.CHANNEL)
    with pytest.raises(ValueError, match="block scales"):
        fp8_block_linear(x, wc)


@pytest.mark.parametrize("m,scheme,path", [
    (4, Fp8Scheme.BLOCK, "skinny_linear"),
    (dispatch.FP8_WEIGHT_ONLY_MAX_M, Fp8Scheme.CHANNEL, "skinny_linear"),
    (dispatch.FP8_WEIGHT_ONLY_MAX_M + 1, Fp8Scheme.BLOCK, "fp8_block_linear"),
    (dispatch.FP8_WEIGHT_ONLY_MAX_M + 1, Fp8Scheme.CHANNEL, "skinny_w8a8"),
    (dispatch.FP8_SKINNY_W8A8_MAX_M + 1, Fp8Scheme.CHANNEL, "fp8_scaled_mm_linear"),
])
def test_dispatch_picks_the_path_by_rows_and_scheme(monkeypatch, m, scheme, path):
    from splitserve.kernels import fp8_triton, linear_triton

    calls = []
    for module, name in ((linear_triton, "skinny_linear"), (fp8_triton, "fp8_block_linear"),
                         (fp8_triton, "fp8_scaled_mm_linear")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real, **kw: calls.append(
            "skinny_w8a8" if kw.get("x_scale") is not None else _n) or _f(*a, **kw))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    try:
        x, w = _case(m, 32, 128, scheme)
        bias = torch.randn(32)
        y = dispatch.fp8_linear(x.reshape(1, m, 128), w, bias)
        assert dispatch.fp8_linear(x[:0], w).shape == (0, 32)  # an empty batch launches nothing
    finally:
        dispatch.kernel_mode.cache_clear()
    assert calls == [path] and y.shape == (1, m, 32)
    oracle = fp8_weight_only_ref if path == "skinny_linear" else fp8_linear_ref
    want = oracle(x, w, bias)  # _scaled_mm rounds to bf16 before the bias: one bf16 step of |y|
    torch.testing.assert_close(y[0], want, rtol=0, atol=2**-8 * want.abs().max().item())


@pytest.mark.parametrize("scheme", list(Fp8Scheme))
def test_swapped_operands_and_gate_up_read_e4m3_with_their_scales(scheme):
    import dataclasses

    from splitserve.kernels.activation import silu_and_mul_ref
    from splitserve.kernels.linear_triton import skinny_linear

    m, n, k = 3, 256, 384
    x, w = _case(m, n, k, scheme, seed=41)
    for split_k in (1, 3):
        cfg, block = _weight_only_config(n, k, w, split_k)
        cfg = dataclasses.replace(cfg, swap_ab=True)
        want = fp8_weight_only_ref(x, w)
        got = skinny_linear(x, w.data, config=cfg, scale=w.scale, scale_block=block)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got = skinny_linear(x, w.data, config=cfg, scale=w.scale, scale_block=block, gated=True)
        torch.testing.assert_close(got, silu_and_mul_ref(want), rtol=1e-5, atol=1e-5)


def test_swapped_w8a8_matches_its_reference():
    from splitserve.kernels import fp8 as fp8_ref
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    x, w = _case(20, 64, 256, Fp8Scheme.CHANNEL, seed=43)
    xq, xs = fp8_ref.quantize_per_token(x)
    for split_k in (1, 2):
        got = skinny_linear(xq, w.data, config=SkinnyConfig(block_n=16, block_k=64, split_k=split_k, swap_ab=True),
                            scale=w.scale, x_scale=xs.reshape(-1), out_dtype=torch.float32)
        torch.testing.assert_close(got, F.linear(xq.float() * xs, w.data.float() * w.scale), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,scheme,gated_launch", [
    (1, Fp8Scheme.CHANNEL, False),  # weight-only: no table says the gated launch pays
    (dispatch.FP8_WEIGHT_ONLY_MAX_M + 1, Fp8Scheme.CHANNEL, True),  # W8A8, gated
    (4, Fp8Scheme.BLOCK, False),  # the up half starts inside a 128-row scale block: two calls
    (dispatch.FP8_SKINNY_W8A8_MAX_M + 1, Fp8Scheme.CHANNEL, False),
])
def test_dispatch_gate_up_with_silu_is_one_launch_for_decode_rows(monkeypatch, m, scheme, gated_launch):
    from splitserve.kernels import linear_triton
    from splitserve.kernels.activation import silu_and_mul_ref

    calls = []
    real = linear_triton.skinny_linear
    monkeypatch.setattr(linear_triton, "skinny_linear",
                        lambda *a, **kw: calls.append(kw.get("gated", False)) or real(*a, **kw))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    try:
        x, w = _case(m, 2 * 96, 128, scheme, seed=m)
        y = dispatch.fp8_silu_and_mul_linear(x.reshape(1, m, 128), w)
    finally:
        dispatch.kernel_mode.cache_clear()
    assert y.shape == (1, m, 96) and (calls == [True]) == gated_launch
    oracle = fp8_weight_only_ref if m <= dispatch.FP8_WEIGHT_ONLY_MAX_M else fp8_linear_ref
    want = silu_and_mul_ref(oracle(x, w))  # _scaled_mm rounds gate | up to bf16 before the SiLU
    torch.testing.assert_close(y[0], want, rtol=0, atol=2**-7 * want.abs().max().item())


def test_a_tuned_table_picks_the_launch_shape_and_whether_gating_pays(tmp_path, monkeypatch):
    import json

    from splitserve.kernels import linear_triton as lt

    swap = lt.SkinnyConfig(block_n=64, block_k=128, split_k=2, swap_ab=True, dot_f16=True)
    table = {lt.tuned_key(lt.SkinnyMode.WEIGHT_ONLY, 256, 512, 1): {"config": swap.__dict__},
             lt.tuned_key(lt.SkinnyMode.WEIGHT_ONLY_GATED, 256, 512, 16): {"config": swap.__dict__, "fused": True},
             lt.tuned_key(lt.SkinnyMode.W8A8_GATED, 256, 512, 64): {"config": swap.__dict__, "fused": False}}
    path = tmp_path / "skinny.json"
    path.write_text(json.dumps({"configs": table}))
    monkeypatch.setenv(lt.TUNED_ENV, str(path))
    lt.tuned_configs.cache_clear()
    try:
        assert lt.fp8_skinny_config(256, 512, 132, rows=1, device="GPU") == swap
        assert lt.fp8_skinny_config(256, 512, 132, rows=4, device="GPU") != swap  # rows 2-16: not measured
        assert lt.fp8_skinny_config(256, 512, 132, block=(32, 128), rows=1, device="GPU") != swap  # 64 rows > block
        assert lt.gated_pays(256, 512, 9, False, "GPU") and not lt.gated_pays(256, 512, 64, True, "GPU")
        assert not lt.gated_pays(256, 512, 1, False, "GPU")  # not in the table: the default (W8A8 only)
        assert not lt.weight_only_pays(256, 512, 64, False, "GPU")  # no times measured: W8A8 as before
    finally:
        lt.tuned_configs.cache_clear()


@pytest.mark.parametrize("wo_us,path", [(30.0, "skinny_linear"), (40.0, "skinny_w8a8")])
def test_past_16_rows_weight_only_runs_where_the_table_measured_it_faster(tmp_path, monkeypatch, wo_us, path):
    """Weight-only past 16 rows (no quantization launch) only where this GPU's table timed it
    under W8A8 (whose time includes that launch); gated entries weigh the SiLU's launch too."""
    import json

    from splitserve.kernels import fp8_triton
    from splitserve.kernels import linear_triton as lt

    cfg = lt.SkinnyConfig(block_n=16, block_k=64, split_k=1).__dict__
    table = {lt.tuned_key(lt.SkinnyMode.WEIGHT_ONLY, 32, 128, 64): {"config": cfg, "us": wo_us},
             lt.tuned_key(lt.SkinnyMode.W8A8, 32, 128, 64): {"config": cfg, "us": 35.0},
             lt.tuned_key(lt.SkinnyMode.WEIGHT_ONLY_GATED, 32, 128, 64): {"config": cfg, "us": 20.0, "fused": False,
                                                                          "plain_then_silu_us": 50.0},
             lt.tuned_key(lt.SkinnyMode.W8A8_GATED, 32, 128, 64): {"config": cfg, "us": 45.0}}
    file = tmp_path / "skinny.json"
    file.write_text(json.dumps({"configs": table}))
    monkeypatch.setenv(lt.TUNED_ENV, str(file))
    calls = []
    real = lt.skinny_linear
    monkeypatch.setattr(lt, "skinny_linear", lambda *a, **kw: calls.append(
        "skinny_w8a8" if kw.get("x_scale") is not None else "skinny_linear") or real(*a, **kw))
    real_q = fp8_triton.quantize_per_token
    monkeypatch.setattr(fp8_triton, "quantize_per_token", lambda *a: calls.append("quantize") or real_q(*a))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    lt.tuned_configs.cache_clear()
    try:
        assert not lt.weight_only_pays(32, 128, 16, False, "cpu")  # up to 16 rows it is the path anyway
        assert not lt.weight_only_pays(32, 128, 64, True, "cpu")  # gated: 50 (not fused) against 45
        m = 24
        x, w = _case(m, 32, 128, Fp8Scheme.CHANNEL, seed=3)
        y = dispatch.fp8_linear(x, w)
    finally:
        dispatch.kernel_mode.cache_clear()
        lt.tuned_configs.cache_clear()
    assert calls == ([path] if path == "skinny_linear" else ["quantize", path])
    oracle = fp8_weight_only_ref if path == "skinny_linear" else fp8_linear_ref
    want = oracle(x, w)
    torch.testing.assert_close(y, want, rtol=0, atol=2**-8 * want.abs().max().item())


@pytest.mark.parametrize("m", [dispatch.FP8_WEIGHT_ONLY_MAX_M + 1, dispatch.FP8_SKINNY_W8A8_MAX_M + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_that_quantizes_for_the_linear_saves_its_launch_and_changes_no_bit(monkeypatch, m, dtype):
    """RMSNorm with ``quantize``: its output with `quantize_per_token`'s very bits of it; the FP8
    linear's W8A8 paths (the skinny kernel, ``_scaled_mm``) and the gated gate | up take them
    without a quantization launch of their own, and give what the plain rows give, bit for bit."""
    from splitserve.kernels import fp8_triton, linear_triton, norm_triton
    from splitserve.kernels.fp8 import QuantizedRows

    x, w = _case(m, 2 * 96, 128, Fp8Scheme.CHANNEL, dtype=dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    res, norm_w = torch.randn(m, 128, generator=g).to(dtype), torch.randn(128, generator=g).to(dtype)
    plain, summed = norm_triton.add_rms_norm(x, res, norm_w, 1e-6)
    rows, summed_too = norm_triton.add_rms_norm(x, res, norm_w, 1e-6, quantize=True)
    assert isinstance(rows, QuantizedRows) and torch.equal(rows.x, plain) and torch.equal(summed_too, summed)
    q, s = fp8_triton.quantize_per_token(plain)
    assert torch.equal(rows.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(rows.scale, s)
    alone = norm_triton.rms_norm(x, norm_w, 1e-6, quantize=True)
    q, s = fp8_triton.quantize_per_token(norm_triton.rms_norm(x, norm_w, 1e-6))
    assert torch.equal(alone.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(alone.scale, s)

    assert not dispatch.norm_quantizes_for(plain, w)  # this process's kernels: the torch references
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    quantized = []
    real = fp8_triton.quantize_per_token
    monkeypatch.setattr(fp8_triton, "quantize_per_token", lambda *a: quantized.append(1) or real(*a))
    try:
        assert dispatch.norm_quantizes_for(plain, w) and not dispatch.norm_quantizes_for(plain[:16], w)
        assert not dispatch.norm_quantizes_for(plain, quantize(torch.randn(192, 128), Fp8Scheme.BLOCK))
        # One choice serves both: where a tuned table keeps these rows weight-only, the linear
        # reads them as they are, and the norm does not quantize them for nothing.
        skinny = m <= dispatch.FP8_SKINNY_W8A8_MAX_M
        with monkeypatch.context() as table:
            table.setattr(linear_triton, "weight_only_pays", lambda *a: True)
            assert dispatch.fp8_path(m, w, plain) is (
                dispatch.Fp8Path.SKINNY_WEIGHT_ONLY if skinny else dispatch.Fp8Path.SCALED_MM)
            assert dispatch.norm_quantizes_for(plain, w) is not skinny
            assert dispatch.norm_quantizes_for(plain, w, gated=True) is not skinny
        assert dispatch.fp8_path(m, w, plain) is (dispatch.Fp8Path.SKINNY_W8A8 if skinny else dispatch.Fp8Path.SCALED_MM)
        assert (dispatch.fp8_path(m, w, plain, gated=True) is None) is not skinny  # past 64: a GEMM, then the SiLU
        for linear in (dispatch.fp8_linear, dispatch.fp8_silu_and_mul_linear):
            want, launches = linear(plain, w), len(quantized)
            got = linear(rows, w)
            assert launches == len(quantized) and torch.equal(got, want), linear.__name__
    finally:
        dispatch.kernel_mode.cache_clear()
    assert quantized  # the plain rows were quantized by the linear itself
