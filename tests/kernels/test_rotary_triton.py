"""Rotary embedding in Triton (kernels/rotary_triton.py) against `apply_rotary_ref`, on CPU in
Triton's interpreter (`triton_interpreter`), with the real cos/sin tables (default and
Llama 3 scaling) indexed by scattered positions."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.rotary import RopeSpec, apply_rotary_ref, rope_cos_sin

pytestmark = pytest.mark.usefixtures("triton_interpreter")

SPECS = {
    "default": RopeSpec(head_dim=16, theta=10000.0),
    "llama3": RopeSpec(head_dim=16, theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                       high_freq_factor=4.0, original_max_position=64),
    "odd_half": RopeSpec(head_dim=12, theta=10000.0),  # half = 6: a masked tail
}


def _case(spec, hq, hk, tokens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos, sin = rope_cos_sin(spec, 512)
    positions = torch.randint(0, 512, (tokens,), generator=g)
    q = torch.randn(tokens, hq, spec.head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, hk, spec.head_dim, generator=g).to(dtype)
    return q, k, cos[positions], sin[positions]


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("hq,hk", [(4, 2), (3, 3), (8, 1)])
def test_float32_matches_reference(name, hq, hk):
    from splitserve.kernels.rotary_triton import apply_rotary

    q, k, cos, sin = _case(SPECS[name], hq, hk, 9, torch.float32, seed=hq)
    q0, k0 = q.clone(), k.clone()
    got_q, got_k = apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_ref(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_strided_views_from_a_fused_projection():
    """q and k as views of one qkv projection output (what the model passes)."""
    from splitserve.kernels.rotary_triton import apply_rotary

    spec = SPECS["default"]
    g = torch.Generator().manual_seed(3)
    tokens, hq, hk, d = 5, 4, 2, spec.head_dim
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(tokens, hq, d), k.view(tokens, hk, d)
    cos, sin = rope_cos_sin(spec, 64)
    pos = torch.tensor([0, 3, 63, 7, 1])
    got = apply_rotary(q, k, cos[pos], sin[pos])
    want = apply_rotary_ref(q, k, cos[pos], sin[pos])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bfloat16_close_to_reference():
    from splitserve.kernels.rotary_triton import apply_rotary

    q, k, cos, sin = _case(SPECS["default"], 4, 2, 11, torch.bfloat16, seed=5)
    got_q, got_k = apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_ref(q, k, cos, sin)
    assert got_q.dtype == torch.bfloat16
    torch.testing.assert_close(got_q, want_q, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got_k, want_k, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["default", "odd_half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_cache_write_match_the_two_references(name, dtype):
    """One launch rotates q and k and stores k and v (a strided view, as the fused qkv
    projection gives it) at scattered slots; the rest of the cache is untouched."""
    from splitserve.kernels.attention import write_kv_ref
    from splitserve.kernels.rotary_triton import apply_rotary_and_write_kv

    spec, hq, hk, tokens, blocks, bs = SPECS[name], 4, 2, 7, 6, 4
    q, k, cos, sin = _case(spec, hq, hk, tokens, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    qkv_v = torch.randn(tokens, 3 * hk, spec.head_dim, generator=g).to(dtype)[:, hk:2 * hk]  # strided rows
    k_cache = torch.randn(blocks, bs, hk, spec.head_dim, generator=g).to(dtype)
    v_cache = torch.randn(blocks, bs, hk, spec.head_dim, generator=g).to(dtype)
    slots = torch.randperm(blocks * bs, generator=g)[:tokens]
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    want_q, want_k = apply_rotary_ref(q, k, cos, sin)
    write_kv_ref(want_kc, want_vc, want_k, qkv_v, slots)
    got_q, got_k = apply_rotary_and_write_kv(q, k, qkv_v, cos, sin, k_cache, v_cache, slots)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(got_k, want_k, **tol)
    torch.testing.assert_close(k_cache, want_kc, **tol)
    assert torch.equal(v_cache, want_vc)  # v is copied, not computed
