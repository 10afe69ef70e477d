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


# ---- Qwen3's per-head q/k RMSNorm in the same launch ---------------------------------------------


def _norm_case(spec, hq, hk, tokens, dtype, blocks=6, bs=4, seed=11):
    """q, k as strided views of a q|k|v projection output (what the model passes), v, caches,
    scattered slots and a `QKNorm` of weights in ``dtype``; q and k scaled so the norm matters."""
    from splitserve.kernels.norm import QKNorm

    g = torch.Generator().manual_seed(seed)
    d = spec.head_dim
    qkv = (torch.randn(tokens, (hq + 2 * hk) * d, generator=g) * 3.0).to(dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(tokens, hq, d), k.view(tokens, hk, d), v.view(tokens, hk, d)
    cos, sin = rope_cos_sin(spec, 64)
    pos = torch.randint(0, 64, (tokens,), generator=g)
    norm = QKNorm((1 + 0.5 * torch.randn(d, generator=g)).to(dtype), (1 + 0.5 * torch.randn(d, generator=g)).to(dtype),
                  1e-6)
    slots = torch.randperm(blocks * bs, generator=g)[:tokens]
    return q, k, v, cos[pos], sin[pos], slots, norm


def _reference(q, k, v, cos, sin, caches, slots, norm, scales=(None, None)):
    """The three references in turn: what the CPU path runs."""
    from splitserve.kernels.attention import write_kv_ref
    from splitserve.kernels.norm import qk_norm_ref

    if norm is not None:
        q, k = qk_norm_ref(q, k, norm)
    q, k = apply_rotary_ref(q, k, cos, sin)
    write_kv_ref(*caches, k, v, slots, *scales)
    return q, k


@pytest.mark.parametrize("name", ["default", "odd_half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [True, False])
def test_qk_norm_rotary_and_cache_write_match_the_references(name, dtype, with_norm):
    from splitserve.kernels.rotary_triton import apply_rotary_and_write_kv

    spec, hq, hk, tokens = SPECS[name], 4, 2, 5
    q, k, v, cos, sin, slots, norm = _norm_case(spec, hq, hk, tokens, dtype)
    norm = norm if with_norm else None
    caches = [torch.randn(6, 4, hk, spec.head_dim, generator=torch.Generator().manual_seed(i)).to(dtype)
              for i in range(2)]
    want_caches = [c.clone() for c in caches]
    want_q, want_k = _reference(q, k, v, cos, sin, want_caches, slots, norm)
    got_q, got_k = apply_rotary_and_write_kv(q, k, v, cos, sin, *caches, slots, qk_norm=norm)
    # float32: only the sum of squares' order differs; bf16: a value may round one unit away.
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 1.6e-2}
    for got, want in ((got_q, want_q), (got_k, want_k), *zip(caches, want_caches)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
    if with_norm:  # the norm really ran: without it the outputs are far off
        plain_q, _ = apply_rotary_ref(q, k, cos, sin)
        assert (plain_q.float() - got_q.float()).abs().max() > 0.5


def test_qk_norm_in_bf16_differs_from_the_references_by_at_most_one_rounding():
    """Bit-exact but for a rare unit in the last place (the sum of squares' order): nearly
    every bf16 value equals the reference's."""
    from splitserve.kernels.rotary_triton import apply_rotary_and_write_kv

    spec, hq, hk, tokens = SPECS["default"], 8, 2, 16
    q, k, v, cos, sin, slots, norm = _norm_case(spec, hq, hk, tokens, torch.bfloat16, blocks=8, seed=13)
    caches = [torch.zeros(8, 4, hk, spec.head_dim, dtype=torch.bfloat16) for _ in range(2)]
    want_caches = [c.clone() for c in caches]
    want_q, want_k = _reference(q, k, v, cos, sin, want_caches, slots, norm)
    got_q, got_k = apply_rotary_and_write_kv(q, k, v, cos, sin, *caches, slots, qk_norm=norm)
    for got, want in ((got_q, want_q), (got_k, want_k), (caches[0], want_caches[0])):
        assert (got == want).float().mean() > 0.99
    assert torch.equal(caches[1], want_caches[1])  # v: stored as it is


def test_qk_norm_with_mismatched_weights_is_refused():
    from splitserve.kernels.norm import QKNorm
    from splitserve.kernels.rotary_triton import apply_rotary_and_write_kv

    spec = SPECS["default"]
    q, k, v, cos, sin, slots, norm = _norm_case(spec, 4, 2, 3, torch.bfloat16)
    caches = [torch.zeros(6, 4, 2, spec.head_dim, dtype=torch.bfloat16) for _ in range(2)]
    for bad in (QKNorm(norm.q_weight.float(), norm.k_weight, 1e-6),  # the reference would promote to float32
                QKNorm(norm.q_weight, norm.k_weight[:-2], 1e-6)):
        with pytest.raises(ValueError, match="QKNorm"):
            apply_rotary_and_write_kv(q, k, v, cos, sin, *caches, slots, qk_norm=bad)


def test_dispatch_passes_the_norm_to_the_fused_kernel_and_the_cpu_path_is_the_references(monkeypatch):
    """``SPLITSERVE_KERNELS=torch`` runs exactly the three references (bit-equal); ``triton``
    the one launch, within rounding of them."""
    from splitserve.kernels import dispatch

    spec = SPECS["default"]
    q, k, v, cos, sin, slots, norm = _norm_case(spec, 4, 2, 5, torch.float32)
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv(dispatch.ENV_VAR, mode)
        dispatch.kernel_mode.cache_clear()
        try:
            caches = [torch.zeros(6, 4, 2, spec.head_dim) for _ in range(2)]
            results[mode] = (*dispatch.apply_rotary_and_write_kv(q, k, v, cos, sin, *caches, slots, qk_norm=norm),
                             *caches)
        finally:
            dispatch.kernel_mode.cache_clear()
    want_caches = [torch.zeros(6, 4, 2, spec.head_dim) for _ in range(2)]
    want = (*_reference(q, k, v, cos, sin, want_caches, slots, norm), *want_caches)
    assert all(torch.equal(a, b) for a, b in zip(results["torch"], want))
    for a, b in zip(results["triton"], want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
