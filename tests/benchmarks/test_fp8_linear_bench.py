"""benchmarks/fp8_linear_bench.py on CPU: its byte arithmetic, and the whole script end to end
with ``--smoke`` (tiny float32 shapes, Triton interpreted, in a subprocess so the interpreter is
on before triton is imported): every path dispatch takes is run and checked against its oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench_modules import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fp8_linear_bench.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("fp8_linear_bench")


def test_weight_only_bytes_are_one_per_weight(bench):
    # Llama-3-8B down_proj at batch 1: 4096 x 14336 e4m3 bytes, per-channel scales, bf16 x and out.
    assert bench.weight_only_bytes(4096, 14336, 1, 4096 * 4) == 4096 * 14336 + 4096 * 4 + 14336 * 2 + 4096 * 2


def test_smoke_run_end_to_end(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("matplotlib")
    out = tmp_path / "fp8.json"
    env = {**os.environ, "SPLITSERVE_GIT_COMMIT": "test"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--rows", "3", "40", "65"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["git_commit"] == "test" and "Triton interpreter" in report["device"]["name"]
    paths = {(r["scheme"], r["m"]): r["path"] for r in report["rows"] if r["shape"] == "ragged"}
    assert paths == {("channel", 3): "weight_only", ("channel", 40): "skinny_w8a8", ("channel", 65): "scaled_mm",
                     ("block", 3): "weight_only", ("block", 40): "block_w8a8", ("block", 65): "block_w8a8"}
    for r in report["rows"]:
        assert r["ok"] and r["fp8_s"] > 0 and r["bf16_s"] > 0, r
        if r["path"] == "weight_only":
            assert set(r["split_k_s"]) == {"1", "2", "4", "8"} and r["bytes"] > r["n"] * r["k"]
    assert report["all_ok"] and Path(report["plot"]).exists()
