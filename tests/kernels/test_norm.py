"""RMSNorm references (kernels/norm.py) against transformers' LlamaRMSNorm, bit for bit."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from splitserve.kernels.norm import add_rms_norm_ref, rms_norm_ref

HIDDEN = 32
EPS = 1e-5


def hf_norm(weight, eps=EPS):
    norm = LlamaRMSNorm(weight.shape[0], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm.to(weight.dtype)


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("shape", [(5, HIDDEN), (2, 3, HIDDEN)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm_equals_llama_rms_norm_float32(shape, eps):
    x, w = rand(*shape, seed=1, scale=3.0), rand(HIDDEN, seed=2)
    with torch.no_grad():
        want = hf_norm(w, eps)(x)
    got = rms_norm_ref(x, w, eps)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_rms_norm_equals_llama_rms_norm_bfloat16():
    x, w = rand(4, HIDDEN, seed=3, dtype=torch.bfloat16), rand(HIDDEN, seed=4, dtype=torch.bfloat16)
    with torch.no_grad():
        want = hf_norm(w)(x)
    got = rms_norm_ref(x, w, EPS)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_eps_keeps_zero_rows_finite():
    got = rms_norm_ref(torch.zeros(2, HIDDEN), torch.ones(HIDDEN), EPS)
    assert torch.equal(got, torch.zeros(2, HIDDEN))


def test_add_rms_norm_returns_norm_of_sum_and_the_sum():
    x, r, w = rand(3, HIDDEN, seed=5), rand(3, HIDDEN, seed=6), rand(HIDDEN, seed=7)
    x0, r0 = x.clone(), r.clone()
    normed, summed = add_rms_norm_ref(x, r, w, EPS)
    assert torch.equal(summed, x0 + r0)
    with torch.no_grad():
        assert torch.equal(normed, hf_norm(w)(x0 + r0))
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched
