"""benchmarks/gpu_perf.py on CPU: its pure functions (FLOP counts, floors, roofline) and a
``--device cpu --tiny`` smoke run of the sections that need no GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_perf.py"


@pytest.fixture(scope="module")
def gp():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_perf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_perf"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def llama3_8b(gp):
    return gp.ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)


def test_llama3_8b_param_count_and_kv_bytes(gp):
    shape = llama3_8b(gp)
    layers = shape.layers * shape.layer_linear_params
    # 8.03 B params = layers' matmuls + 2 norms per layer + embedding + lm_head + final norm
    total = layers + 2 * shape.vocab * shape.hidden + (2 * shape.layers + 1) * shape.hidden
    assert abs(total / 1e9 - 8.03) < 0.01
    assert shape.kv_bytes_per_token(2) == 128 * 1024  # 32 layers x K,V x 8 heads x 128 x bf16


def test_prefill_flops_counts_linear_and_causal_attention(gp):
    shape = gp.ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)
    per_layer = 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16
    assert shape.layer_linear_params == per_layer
    # one prompt of 3 tokens: 6 visible (query, key) pairs
    assert gp.prefill_flops(shape, [3]) == 2 * 3 * 2 * per_layer + 4 * 6 * 2 * 4 * 2
    # a cached prefix of 5 adds 3 * 5 pairs
    assert gp.prefill_flops(shape, [3], [5]) == gp.prefill_flops(shape, [3]) + 4 * 15 * 2 * 4 * 2


def test_decode_floor_matches_gpu_md(gp):
    # GPU.md: 8.03 B params in bf16 over 3.01 TB/s -> 5.33 ms per step at batch 1
    assert gp.decode_floor_s(8.03e9 * 2, 0, 3.01e12) * 1e3 == pytest.approx(5.33, abs=0.01)
    assert gp.decode_floor_s(1e9, 1e9, 1e12) == pytest.approx(2e-3)


def test_offline_roofline_waves(gp):
    shape = llama3_8b(gp)
    one = gp.offline_roofline_s(256, 1024, 128, 256, shape, 16e9, 2, 8e14, 3e12)
    two = gp.offline_roofline_s(512, 1024, 128, 256, shape, 16e9, 2, 8e14, 3e12)
    assert two["prefill_s"] == pytest.approx(2 * one["prefill_s"])
    assert two["decode_s"] == pytest.approx(2 * one["decode_s"])
    # a wave of 256: 127 steps each reading 16 GB of weights + 256 x ~1.1k tokens of KV
    kv = sum(256 * (1024 + s) * 128 * 1024 for s in range(1, 128))
    assert one["decode_s"] == pytest.approx((127 * 16e9 + kv) / 3e12)
    partial = gp.offline_roofline_s(300, 1024, 128, 256, shape, 16e9, 2, 8e14, 3e12)
    assert one["decode_s"] < partial["decode_s"] < two["decode_s"]


def test_rel_error_flags_nan(gp):
    import torch

    assert gp.rel_error(torch.ones(3), torch.ones(3)) == 0
    assert math.isnan(gp.rel_error(torch.tensor([1.0, float("nan")]), torch.ones(2)))


def test_cpu_tiny_smoke(gp, tmp_path):
    report = gp.main(["--device", "cpu", "--tiny", "--out", str(tmp_path),
                      "--sections", "correctness,ceilings,kernels,decode,prefill,offline"])
    assert report["kernels"] == {"skipped": "needs CUDA"}
    assert report["correctness"]["greedy_match_hf"], report["correctness"]
    for name in ("ceilings", "decode", "prefill", "offline"):
        assert "error" not in report[name], report[name]
    assert report["offline"]["output_tok_s"] > 0
    files = list(tmp_path.glob("gpu_perf_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["benchmark"] == "gpu_perf"
