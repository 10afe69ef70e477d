"""benchmarks/gpu_perf.py on CPU: its pure functions (FLOP counts, floors, roofline) and a
``--device cpu --tiny`` smoke run of the sections that need no GPU."""

from __future__ import annotations

import json
import math

import pytest

from bench_modules import load_benchmark


@pytest.fixture(scope="module")
def gp():
    return load_benchmark("gpu_perf")


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
    # dense: the target floor still counts every weight; the bytes-read floor is reported beside it
    dec = report["decode"]
    assert dec["floor_kind"] == "all weights" and dec["read_GB_b1"] < dec["weight_GB"]
    assert dec["torch_eager_b1_vs_read_floor"] > dec["torch_eager_b1_vs_floor"]
    files = list(tmp_path.glob("gpu_perf_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["benchmark"] == "gpu_perf"


# ---- mixture of experts (issue 17) --------------------------------------------------------


def shape_of(gp, name):
    from splitserve.workers.config import ModelConfig
    from splitserve.workers.model_source import random_config

    return gp.ModelShape.from_config(ModelConfig.from_hf(random_config(name)))


def test_qwen3_30b_a3b_total_active_and_read_params(gp):
    shape = shape_of(gp, "qwen3-30b-a3b")
    assert (shape.num_experts, shape.top_k, shape.moe_layers, shape.moe_intermediate) == (128, 8, 48, 768)
    assert abs(shape.total_params / 1e9 - 30.53) < 0.01  # the model card's 30.5 B
    # 3.3 B activated = the layers' active matmuls + lm_head + embedding table (norms are ~0.2 M)
    assert abs((shape.active_linear_params + 2 * shape.vocab * shape.hidden) / 1e9 - 3.35) < 0.01
    # a decode step at batch 1 reads one embedding row, not the table: 3.04 B parameters
    read = shape.step_read_params(8)
    assert read == shape.total_params - shape.vocab * shape.hidden + shape.hidden - 48 * 120 * shape.expert_params
    assert abs(read / 1e9 - 3.04) < 0.01
    # a dense model: its active parameters are all of them, as before
    dense = llama3_8b(gp)
    assert dense.active_linear_params == dense.layers * dense.layer_linear_params
    assert dense.step_read_params(0) == dense.total_params - dense.vocab * dense.hidden + dense.hidden


def test_fp8_read_bytes_count_projections_and_experts_at_one_byte(gp):
    shape = shape_of(gp, "qwen3-30b-a3b")
    bf16, fp8 = shape.step_read_bytes(8, 2), shape.step_read_bytes(8, 2, linear_bytes=1)
    assert bf16 == 2 * shape.step_read_params(8)
    projections = 48 * (shape.attention_params + 8 * shape.expert_params)
    assert bf16 - fp8 == projections  # one byte saved per projection weight; router, lm_head stay bf16


def test_moe_prefill_flops_count_router_and_top_k_experts(gp):
    shape = gp.ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10,
                          num_experts=4, top_k=2, moe_intermediate=6, moe_layers=1)
    attn = 8 * 8 + 2 * 8 * 4 + 8 * 8
    per_token = 2 * attn + 3 * 8 * 16 + (4 * 8 + 2 * 3 * 8 * 6)  # one dense layer, one sparse
    assert gp.prefill_flops(shape, [3]) == 2 * 3 * per_token + 4 * 6 * 2 * 4 * 2


def test_expected_distinct_experts(gp):
    assert gp.expected_distinct_experts(128, 8, 1) == pytest.approx(8)
    assert gp.expected_distinct_experts(128, 8, 64) == pytest.approx(128 * (1 - (120 / 128) ** 64))
    assert 125 < gp.expected_distinct_experts(128, 8, 64) < 128
    assert gp.expected_distinct_experts(0, 0, 64) == 0


def test_moe_offline_roofline_adds_the_experts_each_wave_touches(gp):
    shape = shape_of(gp, "qwen3-30b-a3b")
    base = 6e9
    one = gp.offline_roofline_s(1, 1024, 128, 256, shape, base, 2, 8e14, 4e12)
    kv = sum((1024 + s) * shape.kv_bytes_per_token(2) for s in range(1, 128))
    assert one["decode_s"] == pytest.approx((127 * (base + 48 * 8 * shape.expert_params * 2) + kv) / 4e12)


def test_distinct_experts_per_step_counts_and_restores(gp):
    from splitserve import LLM
    from splitserve.kernels import dispatch

    original = dispatch.fused_moe
    with LLM("random:tiny-qwen3-moe", device="cpu", dtype="float32", show_progress=False) as llm:
        one = gp.distinct_experts_per_step(llm, 1, 8, 4, seed=1, vocab=256)
        four = gp.distinct_experts_per_step(llm, 4, 8, 4, seed=2, vocab=256)
    assert dispatch.fused_moe is original
    # 2 sparse layers (layer 1 is dense) x 3 pure decode steps (the first token comes from prefill)
    assert one == [2] * 6
    assert len(four) == 6 and all(2 <= c <= 8 for c in four) and max(four) > 2


def test_tiny_rejects_a_full_size_model(gp):
    with pytest.raises(SystemExit):
        gp.parse_args(["--tiny", "--model", "random:qwen3-30b-a3b"])


def test_cpu_tiny_moe_smoke_with_compare(gp, tmp_path):
    report = gp.main(["--device", "cpu", "--tiny", "--model", "random:tiny-qwen3-moe", "--compare-model",
                      "random:tiny-qwen3", "--out", str(tmp_path), "--sections", "correctness,decode,prefill,offline"])
    for name in ("correctness", "decode", "prefill", "offline"):
        assert "error" not in report[name], report[name]
    assert report["targets"]["decode_b1_vs_floor"] == 1.5
    assert report["correctness"]["model"] == "random:tiny-qwen3-moe" and report["correctness"]["greedy_match_hf"]
    dec = report["decode"]
    shape = shape_of(gp, "tiny-qwen3-moe")
    assert dec["weight_GB"] * 1e9 == pytest.approx(shape.total_params * 4)  # the shape counts every parameter
    assert dec["floor_kind"] == "bytes read" and 2 <= dec["experts_per_layer_b4_mean"] <= 8
    assert dec["read_GB_b1"] < dec["read_GB_b4"] < dec["weight_GB"]
    assert dec["torch_eager_b1_vs_floor"] == dec["torch_eager_b1_vs_read_floor"]
    rows = report["offline"]["models"]
    assert [r["model"] for r in rows] == ["random:tiny-qwen3-moe", "random:tiny-qwen3"]
    assert all(r["output_tok_s"] > 0 and r["vs_roofline"] > 0 for r in rows)
    assert report["offline"]["compare"]["model"] == "random:tiny-qwen3"
    table = gp.format_table(report).splitlines()
    assert any(line.startswith("random:tiny-qwen3 ") for line in table), table
