"""SiLU-and-multiply in Triton (kernels/activation_triton.py) against the reference, on CPU in
Triton's interpreter (`triton_interpreter`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels.activation import silu_and_mul_ref

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def test_reference_is_the_gated_mlp():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(silu_and_mul_ref(x), F.silu(x[:, :4]) * x[:, 4:])


# 1100 columns: more than one program per row, and a masked tail.
@pytest.mark.parametrize("n", [16, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(n, dtype):
    from splitserve.kernels.activation_triton import silu_and_mul

    x = (torch.randn(5, 2 * n, generator=torch.Generator().manual_seed(n)) * 4).to(dtype)
    got = silu_and_mul(x)
    assert got.shape == (5, n) and got.dtype == dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1.6e-2}
    torch.testing.assert_close(got, silu_and_mul_ref(x), **tol)


def test_strided_rows_and_odd_width():
    from splitserve.kernels.activation_triton import silu_and_mul

    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))[::2]
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x.contiguous()), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 5))
