"""Kernel dispatch (kernels/dispatch.py): on CPU with SPLITSERVE_KERNELS=auto the engine runs
the references and never imports a Triton kernel module."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import sys
from splitserve import LLM, SamplingParams
with LLM("random:tiny-llama", device="cpu", dtype="float32", show_progress=False) as llm:
    out = llm.generate([[5, 6, 7], [9] * 20], SamplingParams(max_tokens=4, temperature=0.0))
assert all(len(o.token_ids) == 4 for o in out)
loaded = sorted(m for m in sys.modules if m.startswith("splitserve.kernels.") and m.endswith("_triton"))
print("TRITON_MODULES", loaded)
"""


def test_cpu_auto_engine_never_imports_triton_kernels():
    env = {**os.environ, "SPLITSERVE_KERNELS": "auto"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TRITON_MODULES []" in done.stdout, done.stdout


@pytest.mark.parametrize("mode,want", [("auto", False), ("torch", False), ("", False)])
def test_use_triton_is_false_on_cpu(monkeypatch, mode, want):
    from splitserve.kernels import dispatch

    monkeypatch.setenv(dispatch.ENV_VAR, mode)
    dispatch.kernel_mode.cache_clear()
    try:
        assert dispatch.use_triton(torch.zeros(1)) is want
    finally:
        dispatch.kernel_mode.cache_clear()


def test_bad_mode_is_a_clear_error(monkeypatch):
    from splitserve.kernels import dispatch

    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    dispatch.kernel_mode.cache_clear()
    try:
        with pytest.raises(ValueError, match="SPLITSERVE_KERNELS"):
            dispatch.use_triton(torch.zeros(1))
    finally:
        dispatch.kernel_mode.cache_clear()
