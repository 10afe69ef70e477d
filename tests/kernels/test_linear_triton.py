"""The skinny linear kernel (kernels/linear_triton.py) against ``F.linear``, on CPU in Triton's
interpreter: a decode batch's rows (1 to 16), ragged N and K, a bias, K split in shares
(reduced by the kernel, or handed to the router kernel as partial sums), float32 and bfloat16;
the router's dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import dispatch
from splitserve.kernels.moe import route

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _inputs(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype),
            torch.randn(n, generator=g).to(dtype))


@pytest.mark.parametrize("m,n,k,split_k", [(1, 40, 96, 1), (3, 64, 300, 2), (16, 24, 64, 1), (5, 33, 512, 4)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_matches_f_linear_in_float32(m, n, k, split_k, with_bias):
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    x, w, b = _inputs(m, n, k, torch.float32, seed=m + n)
    cfg = SkinnyConfig(block_n=16, block_k=64, split_k=split_k)
    got = skinny_linear(x, w, b if with_bias else None, cfg)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w, b if with_bias else None), rtol=1e-5, atol=1e-4)


def test_bfloat16_rounds_once_like_a_float32_accumulation():
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    x, w, b = _inputs(2, 48, 256, torch.bfloat16, seed=7)
    want = F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
    for split_k in (1, 2):
        got = skinny_linear(x, w, b, SkinnyConfig(block_n=16, block_k=64, split_k=split_k))
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-2)


def test_partials_add_up_to_the_product_and_route_like_the_reference():
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_partials
    from splitserve.kernels.moe_route_triton import route_triton

    x, w, _ = _inputs(3, 32, 256, torch.float32, seed=3)
    parts = skinny_partials(x, w, SkinnyConfig(block_n=16, block_k=64, split_k=4))
    assert parts.shape == (4, 3, 32) and parts.dtype == torch.float32
    logits = F.linear(x, w)
    torch.testing.assert_close(parts.sum(0), logits, rtol=1e-5, atol=1e-4)
    weights, ids = route_triton(parts, 4, True)
    want_w, want_ids = route(logits, 4, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-6)


def test_the_default_config_fills_the_sms_and_splits_only_long_rows():
    from splitserve.kernels.linear_triton import skinny_config

    assert skinny_config(5120, 2048, 132).split_k == 1  # 160 programs of 32 rows: enough alone
    o = skinny_config(2048, 4096, 132)
    assert o.block_n == 16 and o.split_k == 2  # 128 programs of 16 rows, not enough alone
    router = skinny_config(128, 2048, 132)
    assert router.block_n == 16 and router.split_k == 8  # the router: shares of 256 columns


def test_too_many_rows_and_mismatched_shapes_are_refused():
    from splitserve.kernels.linear_triton import skinny_linear

    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.zeros(65, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="disagree"):
        skinny_linear(torch.zeros(1, 8), torch.zeros(4, 9))


def test_dispatch_routes_few_rows_through_the_skinny_kernel_only(monkeypatch):
    from splitserve.kernels import linear_triton

    calls = []
    real = linear_triton.skinny_partials
    monkeypatch.setattr(linear_triton, "skinny_partials", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.kernel_mode.cache_clear()
    try:
        x, w, _ = _inputs(17, 16, 32, torch.float32)
        got = [dispatch.router(x[:rows], w, 2, False, dispatch.RouterPath.SKINNY_THEN_ROUTE) for rows in (2, 17)]
    finally:
        dispatch.kernel_mode.cache_clear()
    assert calls == [(2, 32)]
    for rows, (weights, ids) in zip((2, 17), got):
        want_w, want_ids = route(F.linear(x[:rows], w), 2, False)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-6)


# ---- e4m3 weights -------------------------------------------------------------------------------


def _e4m3(scheme, n, k, w):
    """(e4m3 weight, scale, scale block or None, the dequantized weight) of ``scheme``."""
    w8 = (w * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(5)
    block = None
    if scheme == "tensor":
        scale = torch.tensor([0.03])
        dequant = w8.float() * scale
    elif scheme == "channel":
        scale = torch.rand(n, 1, generator=g) / 20
        dequant = w8.float() * scale
    else:
        block = (32, 64)
        scale = torch.rand(n // 32, k // 64, generator=g) / 20
        dequant = w8.float() * scale.repeat_interleave(32, 0).repeat_interleave(64, 1)
    return w8, scale, block, dequant


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
@pytest.mark.parametrize("w_nk", [False, True])
def test_skinny_reads_e4m3_weights_with_their_scales_either_tile_orientation(scheme, w_nk):
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    m, n, k = 20, 64, 256
    x, w, b = _inputs(m, n, k, torch.float32, seed=13)
    w8, scale, block, dequant = _e4m3(scheme, n, k, w)
    for split_k in (1, 2):
        got = skinny_linear(x, w8, b, SkinnyConfig(block_n=16, block_k=64, split_k=split_k, w_nk=w_nk),
                            scale=scale, scale_block=block)
        torch.testing.assert_close(got, F.linear(x, dequant, b), rtol=1e-5, atol=1e-4)


def test_skinny_in_float16_and_as_w8a8_match_their_references():
    from splitserve.kernels import fp8 as fp8_ref
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    m, n, k = 3, 64, 256
    x, w, _ = _inputs(m, n, k, torch.float32, seed=17)
    w8, scale, _, dequant = _e4m3("channel", n, k, w)
    xb = x.to(torch.bfloat16)
    got = skinny_linear(xb, w8, config=SkinnyConfig(block_n=16, block_k=64, dot_f16=True), scale=scale)
    want = F.linear(xb.to(torch.float16).float(), dequant)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    xq, xs = fp8_ref.quantize_per_token(x)
    got = skinny_linear(xq, w8, config=SkinnyConfig(block_n=16, block_k=64, split_k=2), scale=scale,
                        x_scale=xs.reshape(-1), out_dtype=torch.float32)
    torch.testing.assert_close(got, F.linear(xq.float() * xs, dequant), rtol=1e-5, atol=1e-4)


def test_the_router_rounds_summed_partials_like_a_bf16_gemm():
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_partials
    from splitserve.kernels.moe_route_triton import route_triton

    x, w, _ = _inputs(2, 32, 256, torch.bfloat16, seed=23)
    parts = skinny_partials(x, w, SkinnyConfig(block_n=16, block_k=64, split_k=4))
    weights, ids = route_triton(parts, 4, True, logits_dtype=torch.bfloat16)
    want_w, want_ids = route(parts.sum(0).to(torch.bfloat16), 4, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)


def test_skinny_refuses_inconsistent_w8a8_and_float16_arguments():
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    x, w, _ = _inputs(2, 32, 64, torch.float32)
    w8 = w.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="out_dtype"):
        skinny_linear(x.to(torch.float8_e4m3fn), w8, x_scale=torch.ones(2))
    with pytest.raises(ValueError, match="x_scale"):
        skinny_linear(x.to(torch.float8_e4m3fn), w8, x_scale=torch.ones(3), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="dot_f16"):
        skinny_linear(x, w, config=SkinnyConfig(dot_f16=True))
    with pytest.raises(ValueError, match="per-row"):
        skinny_linear(x, w8, scale=torch.ones(1, 32))


def test_float16_products_saturate_instead_of_overflowing():
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 0] = 1e6  # past float16's 65504
    w8 = torch.ones(16, 64).to(torch.float8_e4m3fn)
    got = skinny_linear(x, w8, config=SkinnyConfig(block_n=16, block_k=64, dot_f16=True), scale=torch.ones(1))
    assert torch.isfinite(got.float()).all()
    assert got[0, 0] == torch.tensor(65504.0).to(torch.bfloat16)  # the saturated product, rounded to bf16


# ---- W as the left operand, split K reduced in the kernel, gate | up with SiLU ----------------


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("reduce_in_kernel", [False, True])
def test_swapped_operands_and_both_reductions_match_f_linear(swap_ab, reduce_in_kernel):
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    for m, n, k, split_k in [(1, 40, 96, 1), (5, 33, 512, 4), (16, 48, 300, 3)]:
        x, w, b = _inputs(m, n, k, torch.float32, seed=m * n)
        cfg = SkinnyConfig(block_n=16, block_k=64, split_k=split_k, swap_ab=swap_ab, reduce_in_kernel=reduce_in_kernel)
        torch.testing.assert_close(skinny_linear(x, w, b, cfg), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_the_in_kernel_reduction_leaves_its_counts_at_zero_for_the_next_call():
    from splitserve.kernels import linear_triton as lt

    x, w, _ = _inputs(3, 64, 256, torch.float32, seed=29)
    cfg = lt.SkinnyConfig(block_n=16, block_k=64, split_k=4)
    locks = torch.zeros(8, dtype=torch.int32)
    out = torch.empty(3, 64)
    parts = torch.empty(4, 3, 64)
    for _ in range(2):  # the second call finds the counts the first left
        out.zero_()
        lt._launch(x, w, None, out, parts, cfg, lt._Scale.of(None, None, 16, 64), locks=locks)
        assert torch.equal(locks, torch.zeros(8, dtype=torch.int32))
        torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-4)


def _silu_mul(y: torch.Tensor) -> torch.Tensor:
    from splitserve.kernels.activation import silu_and_mul_ref

    return silu_and_mul_ref(y)


@pytest.mark.parametrize("split_k,reduce_in_kernel", [(1, True), (2, True), (3, False)])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_gated_gives_silu_of_gate_times_up(split_k, reduce_in_kernel, swap_ab):
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    x, w, _ = _inputs(3, 2 * 40, 320, torch.float32, seed=31)
    cfg = SkinnyConfig(block_n=16, block_k=64, split_k=split_k, swap_ab=swap_ab, reduce_in_kernel=reduce_in_kernel)
    got = skinny_linear(x, w, config=cfg, gated=True)
    assert got.shape == (3, 40)
    # Against float64: silu(g) * u scales the float32 sums' rounding (summation order: the
    # interpreter's numpy against torch's BLAS) by |u| ~ 20, past a fixed 1e-5.
    want = _silu_mul(F.linear(x.double(), w.double()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_gated_in_bfloat16_rounds_where_the_two_launches_round():
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    x, w, _ = _inputs(2, 64, 256, torch.bfloat16, seed=37)
    for split_k in (1, 2):
        cfg = SkinnyConfig(block_n=16, block_k=64, split_k=split_k)
        got = skinny_linear(x, w, config=cfg, gated=True)
        want = _silu_mul(skinny_linear(x, w, config=cfg))  # gate | up stored as bf16, then SiLU
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def test_gated_refuses_an_odd_weight_a_bias_and_a_split_scale_block():
    from splitserve.kernels.linear_triton import SkinnyConfig, skinny_linear

    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match="gate | up"):
        skinny_linear(x, torch.zeros(33, 64), gated=True)
    with pytest.raises(ValueError, match="gate | up"):
        skinny_linear(x, torch.zeros(32, 64), torch.zeros(32), gated=True)
    w8 = torch.zeros(96, 64).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale block"):
        skinny_linear(x, w8, config=SkinnyConfig(block_n=16, block_k=64), scale=torch.ones(3, 1),
                      scale_block=(32, 64), gated=True)


def test_the_shipped_tuned_tables_load_and_name_real_modes():
    import json

    from splitserve.kernels import linear_triton as lt

    files = sorted(lt.TUNED_DIR.glob("skinny_*.json"))
    assert files, "kernels/configs ships at least the H200's table"
    for path in files:
        device = json.loads(path.read_text())["device"]["name"]
        assert lt.tuned_file(device) == path
        lt.tuned_configs.cache_clear()
        table = lt.tuned_configs(device)
        assert table
        for key, entry in table.items():
            mode, shape, rows = key.split(":")
            lt.SkinnyMode(mode)
            assert int(rows.removeprefix("m")) in lt.TUNED_ROWS and "x" in shape
            assert entry.config.pdl in (0, 1, 2)
    lt.tuned_configs.cache_clear()


def test_bf16_linear_takes_the_skinny_kernel_only_where_the_table_measured_it_faster(monkeypatch, tmp_path):
    import json

    from splitserve.kernels import linear_triton as lt

    # A table for the interpreter's "cpu" device: the skinny kernel faster than cuBLAS for a
    # 64 x 96 weight at one row, slower for 48 x 96; no entry for 16 rows.
    cfg = {"block_n": 16, "block_k": 32, "split_k": 2, "swap_ab": True}
    table = {lt.tuned_key(lt.SkinnyMode.BF16, 64, 96, 1): {"config": cfg, "us": 5.0, "cublas_us": 7.0},
             lt.tuned_key(lt.SkinnyMode.BF16, 48, 96, 1): {"config": cfg, "us": 8.0, "cublas_us": 7.0}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"configs": table}))
    monkeypatch.setenv(lt.TUNED_ENV, str(path))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    lt.tuned_configs.cache_clear()
    dispatch.kernel_mode.cache_clear()
    calls = []
    real = lt.skinny_linear
    monkeypatch.setattr(lt, "skinny_linear", lambda x, w, b, c: calls.append((tuple(w.shape), c)) or real(x, w, b, c))
    try:
        x, w, b = _inputs(16, 64, 96, torch.bfloat16)
        y = dispatch.linear(x[:1], w, b)
        assert calls == [((64, 96), lt.SkinnyConfig(**cfg))]
        # the kernel's float32 sums rounded once, as a float32 product rounded to bf16
        assert torch.equal(y, F.linear(x[:1].float(), w.float(), b.float()).to(torch.bfloat16))
        for args in ((x[:1], w[:48]), (x, w), (x[:1].float(), w.float())):  # slower; 16 rows; float32
            torch.testing.assert_close(dispatch.linear(*args), F.linear(*args))
        assert len(calls) == 1
    finally:
        lt.tuned_configs.cache_clear()
        dispatch.kernel_mode.cache_clear()
