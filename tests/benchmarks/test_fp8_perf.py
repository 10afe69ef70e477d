"""benchmarks/fp8_perf.py and benchmarks/fp8_accuracy.py on CPU: tiny smoke runs of every section
(the FP8 paths are the CPU references there), the step's read bytes, and the perplexity loop's
independence from its chunk size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench_modules import load_benchmark


@pytest.fixture(scope="module")
def perf():
    return load_benchmark("fp8_perf")


@pytest.fixture(scope="module")
def accuracy():
    return load_benchmark("fp8_accuracy")


def test_tiny_run_measures_every_section_and_writes_json_and_plot(perf, tmp_path):
    report = perf.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--num-requests", "4"])
    for name in ("ceilings", "weights", "kv", "offline"):
        assert "error" not in report[name], report[name].get("traceback")
    w = report["weights"]
    assert w["fp8_step_read_GB"] < w["bf16_step_read_GB"]  # e4m3 linears: fewer bytes to read
    assert w["fp8_decode_b1_floor_ms"] < w["bf16_decode_b1_floor_ms"]
    assert report["kv"]["kv_blocks_ratio"] == pytest.approx(4, rel=1e-3)  # float32 on the CPU: 4x the blocks
    assert report["offline"]["fp8_weights_fp8_kv_output_tok_s"] > 0
    saved = json.loads(next(tmp_path.glob("fp8_perf_*.json")).read_text())
    assert saved["targets"]["decode_b1_speedup"] == 1.8 and Path(saved["plot"]).exists()


def test_step_read_bytes_count_one_embedding_row(perf):
    from splitserve import LLM

    with LLM("random:tiny-llama", device="cpu", show_progress=False) as llm:
        model = llm.engine.executor_for_tests.runner.model
        every = sum(p.numel() * p.element_size() for p in model.parameters())
        table = model.embed_tokens.weight
        want = every - table.numel() * table.element_size() + table.shape[1] * table.element_size()
        assert perf.step_read_bytes(llm) == want


def test_perplexity_does_not_depend_on_the_chunk_size(accuracy):
    from splitserve import LLM

    with LLM("random:tiny-llama", device="cpu", show_progress=False) as llm:
        ids = accuracy.text_tokens(None, 80, llm.engine.executor_for_tests.runner.model_cfg.vocab_size)
        whole, argmax_whole = accuracy.teacher_forced_logprobs(llm, ids, 128)
        chunked, argmax_chunked = accuracy.teacher_forced_logprobs(llm, ids, 16)
    assert whole.shape == (79,)
    assert (whole <= 0).all() and math.isfinite(float(whole.sum()))
    assert abs(float(whole.sum() - chunked.sum())) < 1e-3 * abs(float(whole.sum()))
    assert (argmax_whole == argmax_chunked).all()


def test_accuracy_smoke_compares_every_variant_with_bf16(accuracy, tmp_path):
    rows = accuracy.main(["--model", "random:tiny-llama", "--device", "cpu", "--max-tokens", "64", "--chunk", "24",
                          "--gen-tokens", "6", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["bf16", "fp8_weights", "fp8_kv", "fp8_both"]
    assert all(0 <= r["argmax_agreement"] <= 1 and r["perplexity"] > 0 for r in rows)
    # FP8 is applied: every FP8 variant's likelihood moves off bf16's (here float32's on the CPU)
    assert all(r["ppl_increase"] != 0 for r in rows[1:]), rows
    assert next(tmp_path.glob("fp8_accuracy_*.png")).exists()


def test_the_activation_experiment_swaps_the_reference_linear(accuracy, monkeypatch):
    """``--activations``: weight-only is `fp8_weight_only_ref`; group-N quantizes each token's
    N-column groups on their own scale (closer to the float x than one scale a token)."""
    import torch

    from splitserve.kernels import fp8

    monkeypatch.setattr(fp8, "fp8_linear_ref", fp8.fp8_linear_ref)  # restored after the test
    per_token = fp8.fp8_linear_ref
    g = torch.Generator().manual_seed(0)
    # Columns over six decades, past e4m3's range (448 down to 2**-9): one scale a token flushes the
    # small ones to zero, a scale per 16 columns keeps them.
    x = torch.randn(5, 64, generator=g) * torch.logspace(-4, 2, 64)
    w = fp8.quantize(torch.randn(24, 64, generator=g), fp8.Fp8Scheme.CHANNEL)
    exact = x @ fp8.dequantize(w).t()
    accuracy.use_activation_quantization("token")
    assert fp8.fp8_linear_ref is per_token
    accuracy.use_activation_quantization("group-16")
    grouped = fp8.fp8_linear_ref(x, w)
    small = x.abs() < 1e-2
    assert (fp8.quantize_per_token(x)[0].float()[small] == 0).any()
    assert (grouped - exact).abs().mean() < (per_token(x, w) - exact).abs().mean()
    accuracy.use_activation_quantization("none")
    assert torch.equal(fp8.fp8_linear_ref(x, w), fp8.fp8_weight_only_ref(x, w))
    with pytest.raises(SystemExit, match="group-N"):
        accuracy.use_activation_quantization("group-")
