"""The FP8 reference (kernels/fp8.py): quantize/dequantize round trips within e4m3's error
bound for each scheme, scale shapes, partial blocks, zeros, and the reference linears against
float32 matmuls of the dequantized operands. Also dispatch's CPU choice (the reference)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch
from splitserve.kernels.fp8 import (
    FP8_DTYPE, FP8_MAX, Fp8Scheme, Fp8Weight, dequantize, fp8_linear_ref, fp8_weight_only_ref, quantize,
    quantize_per_token, quantize_per_token_group,
)

#: e4m3 keeps 3 mantissa bits: round to nearest is within 2^-4 of the value, relative.
E4M3_REL = 2.0**-4


def _w(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows 10^5 apart, past e4m3's range: per-tensor scaling flushes the small ones, others not.
    return torch.randn(n, k, generator=g) * torch.logspace(-5, 0, n).unsqueeze(1)


@pytest.mark.parametrize("scheme,scale_shape", [(Fp8Scheme.TENSOR, (1,)), (Fp8Scheme.CHANNEL, (200, 1)),
                                                (Fp8Scheme.BLOCK, (2, 3))])
def test_round_trip_is_within_e4m3_rounding_of_each_scale_group(scheme, scale_shape):
    w = _w(200, 300)  # partial last blocks both ways (200 = 128 + 72, 300 = 2 * 128 + 44)
    q = quantize(w, scheme)
    assert q.data.dtype == FP8_DTYPE and q.scale.dtype == torch.float32 and tuple(q.scale.shape) == scale_shape
    back = dequantize(q)
    # Normal numbers: relative error; the smallest values of a group sit in e4m3's subnormals,
    # where the step is the scale times 2^-9.
    step = q.scale.max() if scheme is Fp8Scheme.TENSOR else None
    err = (back - w).abs()
    if scheme is Fp8Scheme.CHANNEL:
        bound = w.abs() * E4M3_REL + q.scale * 2.0**-9
    elif scheme is Fp8Scheme.BLOCK:
        from splitserve.kernels.fp8 import expand_block_scale

        bound = w.abs() * E4M3_REL + expand_block_scale(q.scale, 200, 300, q.block) * 2.0**-9
    else:
        bound = w.abs() * E4M3_REL + step * 2.0**-9
    assert (err <= bound + 1e-12).all()
    assert q.data.float().abs().max() == FP8_MAX  # amax scaling uses the whole range


def test_finer_scales_are_more_accurate_on_uneven_rows():
    w = _w(256, 256)
    # Each row's error relative to its own size: per tensor, the small rows lose most bits.
    errs = {s: ((dequantize(quantize(w, s)) - w).abs().sum(1) / w.abs().sum(1)).mean().item() for s in Fp8Scheme}
    assert errs[Fp8Scheme.CHANNEL] < errs[Fp8Scheme.TENSOR] / 2
    assert errs[Fp8Scheme.CHANNEL] <= errs[Fp8Scheme.BLOCK] < errs[Fp8Scheme.TENSOR]


def test_zero_rows_quantize_to_zero_without_nan():
    w = torch.zeros(4, 8)
    w[1] = 1.0
    for scheme in Fp8Scheme:
        back = dequantize(quantize(w, scheme))
        assert not back.isnan().any() and torch.equal(back, w)


def test_activation_quantization_scales_per_token_and_per_group():
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(1))
    x[1] *= 100
    q, s = quantize_per_token(x)
    assert s.shape == (3, 1) and torch.allclose(s.squeeze(1), x.abs().amax(1) / FP8_MAX)
    assert ((q.float() * s - x).abs() <= x.abs() * E4M3_REL + s * 2.0**-9).all()
    qg, sg = quantize_per_token_group(x)
    assert sg.shape == (3, 3)
    assert torch.allclose(sg[:, 2], x[:, 256:].abs().amax(1) / FP8_MAX)


@pytest.mark.parametrize("scheme", list(Fp8Scheme))
def test_linear_ref_is_the_float32_product_of_the_dequantized_operands(scheme):
    w = quantize(_w(64, 256, 2), scheme)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(64)
    y = fp8_linear_ref(x, w, bias)
    if scheme is Fp8Scheme.BLOCK:
        xq, xs = quantize_per_token_group(x)
        xd = xq.float() * xs.repeat_interleave(128, 1)
    else:
        xq, xs = quantize_per_token(x)
        xd = xq.float() * xs
    torch.testing.assert_close(y, xd @ dequantize(w).t() + bias, rtol=1e-5, atol=1e-5)
    # ... which is near the unquantized product, and differs from the weight-only path.
    exact = x @ dequantize(w).t() + bias
    assert (y - exact).abs().max() < 0.1 * exact.abs().max()
    assert not torch.equal(y, fp8_weight_only_ref(x, w, bias))
    torch.testing.assert_close(fp8_weight_only_ref(x, w, bias), exact, rtol=1e-5, atol=1e-5)


def test_linear_keeps_leading_dims_and_dtype():
    w = quantize(_w(16, 32), Fp8Scheme.CHANNEL)
    x = torch.randn(2, 3, 32).to(torch.bfloat16)
    assert fp8_linear_ref(x, w).shape == (2, 3, 16) and fp8_linear_ref(x, w).dtype == torch.bfloat16


def test_dispatch_on_cpu_is_the_reference():
    w = quantize(_w(16, 32), Fp8Scheme.BLOCK)
    assert isinstance(w, Fp8Weight) and w.block == (128, 128)
    x = torch.randn(40, 32)
    assert torch.equal(dispatch.fp8_linear(x, w), fp8_linear_ref(x, w))
