"""RMSNorm and fused residual + RMSNorm in Triton (kernels/norm_triton.py) against the
references, on CPU in Triton's interpreter (`triton_interpreter`)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.norm import add_rms_norm_ref, rms_norm_ref

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("hidden", [32, 48])  # 48: a row that is not a power of two (masked tail)
@pytest.mark.parametrize("shape", [(5,), (2, 3)])
def test_rms_norm_float32(hidden, shape):
    from splitserve.kernels.norm_triton import rms_norm

    x, w = rand(*shape, hidden, seed=1, scale=3.0), rand(hidden, seed=2)
    got = rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, rms_norm_ref(x, w, 1e-5), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hidden", [32, 48])
def test_add_rms_norm_float32_leaves_inputs_alone(hidden):
    from splitserve.kernels.norm_triton import add_rms_norm

    x, res, w = rand(6, hidden, seed=3), rand(6, hidden, seed=4), rand(hidden, seed=5)
    x0, res0 = x.clone(), res.clone()
    normed, summed = add_rms_norm(x, res, w, 1e-6)
    want_normed, want_summed = add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(summed, want_summed)
    torch.testing.assert_close(normed, want_normed, atol=1e-6, rtol=1e-6)
    assert torch.equal(x, x0) and torch.equal(res, res0)


def test_strided_rows():
    """A non-contiguous view (every other row) normalises like its contiguous copy."""
    from splitserve.kernels.norm_triton import add_rms_norm, rms_norm

    x, res, w = rand(8, 32, seed=6)[::2], rand(8, 32, seed=7)[::2], rand(32, seed=8)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x.contiguous(), w, 1e-5), atol=1e-6, rtol=1e-6)
    normed, summed = add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(normed, add_rms_norm_ref(x, res, w, 1e-5)[0], atol=1e-6, rtol=1e-6)


def test_bfloat16_within_one_ulp():
    from splitserve.kernels.norm_triton import add_rms_norm, rms_norm

    x, res = rand(7, 64, seed=9, dtype=torch.bfloat16, scale=4.0), rand(7, 64, seed=10, dtype=torch.bfloat16)
    w = rand(64, seed=11, dtype=torch.bfloat16)
    got = rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, rms_norm_ref(x, w, 1e-5), atol=0, rtol=1.6e-2)
    normed, summed = add_rms_norm(x, res, w, 1e-5)
    want_normed, want_summed = add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(summed, want_summed)
    torch.testing.assert_close(normed, want_normed, atol=0, rtol=1.6e-2)


def test_empty_batch():
    from splitserve.kernels.norm_triton import rms_norm

    assert rms_norm(torch.empty(0, 32), torch.ones(32), 1e-5).shape == (0, 32)
