"""Programmatic dependent launch (kernels/pdl.py): off where it cannot work, and the skinny
kernel's PDL paths (wait first; first W tile loaded before the wait) computing the same product.
The two grid-dependency instructions have no interpreter, so the test stands a recorder in for
them: it checks that the kernel waits once per program and triggers its dependents."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import pdl


def test_pdl_is_off_on_the_cpu_and_when_turned_off(monkeypatch):
    assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setenv(pdl.ENV, "0")
    assert not pdl.enabled(torch.device("cuda", 0))  # decided before asking the device anything
    assert pdl.launch_kwargs(0) == {} and pdl.launch_kwargs(2) == {"launch_pdl": True}


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("swap_ab,split_k,gated", [(False, 1, False), (True, 3, False), (True, 2, True)])
def test_the_skinny_kernel_under_pdl_waits_once_a_program_and_computes_the_same(monkeypatch, mode, swap_ab,
                                                                                  split_k, gated):
    from splitserve.kernels import linear_triton as lt
    from splitserve.kernels.activation import silu_and_mul_ref

    events = []
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    monkeypatch.setattr(pdl, "launch_kwargs", lambda m: {})  # the interpreter takes no launch attribute
    monkeypatch.setattr(lt, "gdc_wait", lambda: events.append("wait"))
    monkeypatch.setattr(lt, "gdc_launch_dependents", lambda: events.append("trigger"))
    g = torch.Generator().manual_seed(mode)
    x, w = torch.randn(3, 320, generator=g), torch.randn(64, 320, generator=g)
    cfg = lt.SkinnyConfig(block_n=16, block_k=64, split_k=split_k, swap_ab=swap_ab, pdl=mode)
    got = lt.skinny_linear(x, w, config=cfg, gated=gated)
    want = F.linear(x, w)
    torch.testing.assert_close(got, silu_and_mul_ref(want) if gated else want, rtol=1e-5, atol=1e-4)
    programs = (32 if gated else 64) // 16 * split_k
    assert events.count("wait") == programs and events.count("trigger") == programs


@pytest.mark.usefixtures("triton_interpreter")
def test_the_norm_silu_and_attention_kernels_in_chain_mode_wait_first_and_compute_the_same(monkeypatch):
    from splitserve.kernels import activation_triton, attention_triton, norm_triton
    from splitserve.kernels.activation import silu_and_mul_ref
    from splitserve.kernels.attention import paged_decode_attention_ref
    from splitserve.kernels.norm import add_rms_norm_ref

    events = []
    monkeypatch.setenv(pdl.ENV, "2")
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    monkeypatch.setattr(pdl, "launch_kwargs", lambda m: {})
    for module in (activation_triton, attention_triton, norm_triton):
        name = module.__name__.rsplit(".", 1)[1]
        monkeypatch.setattr(module, "gdc_wait", lambda n=name: events.append((n, "wait")))
        monkeypatch.setattr(module, "gdc_launch_dependents", lambda n=name: events.append((n, "trigger")))
    assert pdl.mode(torch.device("cpu")) == 2
    g = torch.Generator().manual_seed(3)
    x, res, w = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g), torch.randn(64, generator=g)
    for got, want in zip(norm_triton.add_rms_norm(x, res, w, 1e-6), add_rms_norm_ref(x, res, w, 1e-6)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(activation_triton.silu_and_mul(x), silu_and_mul_ref(x))
    k_cache, v_cache = torch.randn(4, 4, 2, 32, generator=g), torch.randn(4, 4, 2, 32, generator=g)
    q, tables, lens = torch.randn(1, 4, 32, generator=g), torch.tensor([[2, 0, 3, 1]]), torch.tensor([13])
    cfg = attention_triton.DecodeConfig(block_n=4, min_partition=4)
    got = attention_triton.paged_decode_attention(q, k_cache, v_cache, tables, lens, 32**-0.5, num_splits=2, cfg=cfg)
    torch.testing.assert_close(got, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 32**-0.5),
                               rtol=1e-5, atol=2e-6)
    # a wait and a trigger in every program: norm 2 rows; SiLU 2 rows x 1 block; attention
    # 2 KV heads x 2 splits, then 4 query heads merged
    for name, programs in (("norm_triton", 2), ("activation_triton", 2), ("attention_triton", 4 + 4)):
        assert events.count((name, "wait")) == events.count((name, "trigger")) == programs, name
