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
