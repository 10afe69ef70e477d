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


def _launch_variant(n: int, top_k: int) -> tuple:
    """What the launches of an n-token step depend on, from the thresholds the kernels choose
    by: the skinny linears' path, tuned-row bucket and row padding, and Triton's
    specialization of their row count (1, or a multiple of 16; the kernels past 64 rows take
    theirs unspecialized); the MoE call's launch shape, W8A8, direct path and alignment."""
    from splitserve.kernels import dispatch, linear_triton, moe_route_triton, moe_triton

    skinny = n <= dispatch.FP8_SKINNY_W8A8_MAX_M
    key = (n <= dispatch.SKINNY_MAX_ROWS, n <= dispatch.FP8_WEIGHT_ONLY_MAX_M, skinny,
           n <= moe_route_triton.MAX_ROWS,
           next((r for r in linear_triton.TUNED_ROWS if n <= r), None),
           max(16, 1 << (n - 1).bit_length()) if skinny else None, n == 1, n % 16 == 0 if skinny else None)
    if top_k:
        pairs = n * top_k
        w8a8 = pairs >= moe_triton.W8A8_MIN_PAIRS
        key += (moe_triton.moe_config(pairs, w8a8), w8a8, n <= moe_triton.DIRECT_MAX_TOKENS,
                pairs <= moe_triton.ALIGN_TRITON_MAX_PAIRS, moe_triton.align_chunk(pairs))
    return key


@pytest.mark.parametrize("top_k", [0, 1, 2, 6, 8])
@pytest.mark.parametrize("max_tokens", [1, 5, 100, 2048, 5000])
def test_warm_up_sizes_reach_every_launch_variant_of_the_step_budget(top_k, max_tokens):
    """Start-up runs one forward per size of `warm_up_token_counts`: between them they must
    take every launch variant that a step of 1 to max_tokens tokens can (so none compiles
    mid-serving), and stay within the budget."""
    from splitserve.kernels import dispatch

    counts = dispatch.warm_up_token_counts(max_tokens, top_k)
    assert counts == sorted(set(counts)) and counts[0] >= 1 and counts[-1] == max_tokens
    every = {_launch_variant(n, top_k) for n in range(1, max_tokens + 1)}
    assert {_launch_variant(n, top_k) for n in counts} == every
    assert len(counts) <= 4 * max_tokens.bit_length() + 16  # a few dozen forwards, not the budget
