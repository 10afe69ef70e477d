"""benchmarks/moe_kernel_bench.py on CPU: its byte and error arithmetic, and the whole script
end to end with ``--smoke`` (tiny float32 shapes, Triton interpreted, in a subprocess so the
interpreter is on before triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench_modules import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_kernel_bench.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("moe_kernel_bench")


def test_qwen3_layer_bytes_and_floor(bench):
    shape = bench.QWEN3_30B_A3B
    assert shape.expert_bytes == 3 * 2048 * 768 * 2  # gate, up, down in bf16: 9.4 MB
    # One token: its 8 experts once, plus x read and out written.
    assert shape.bytes_read(1, 8) == 8 * 9_437_184 + 2 * 2048 * 2
    assert shape.bytes_read(1, 8, weight_bytes=1) == 8 * 9_437_184 // 2 + 2 * 2048 * 2  # FP8 experts
    # At the copy rate (read + written per second), as gpu_perf's decode floor.
    assert bench.floor_seconds(4.25e12, 4.25e12) == pytest.approx(1.0)
    assert shape.flops(1) == 2 * 8 * 3 * 2048 * 768


def test_error_bound_follows_the_bf16_reference(bench):
    assert bench.error_ok(3e-3, 4e-3)
    assert not bench.error_ok(5e-2, 4e-3)
    assert bench.error_ok(5e-3, 0.0)  # float32 smoke runs: the absolute floor
    import torch

    want = torch.tensor([1.0, -2.0, 4.0])
    assert bench.max_rel_error(want + torch.tensor([0.0, 0.4, 0.0]), want) == pytest.approx(0.1)


def test_smoke_run_end_to_end(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("matplotlib")
    out = tmp_path / "moe.json"
    env = {**os.environ, "SPLITSERVE_GIT_COMMIT": "test"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--tokens", "1", "7",
                           "--configs", "block_m=32,n1=16,k1=16,n2=16,k2=32", "--fp8", "channel"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["git_commit"] == "test" and "--smoke" in report["command"] and report["date"]
    assert "Triton interpreter" in report["device"]["name"]
    # Per T: float32 (built-in, extra config), then FP8 (built-in widened to float16, to x's
    # dtype, W8A8, the extra config; weight-only at these sizes).
    assert [(r["tokens"], r["weights"], r["default"], r["dot_f16"], r["w8a8"]) for r in report["rows"]] == [
        (t, *v) for t in (1, 7) for v in (("float32", True, None, None), ("float32", False, None, None),
                                          ("fp8-channel", True, True, False), ("fp8-channel", False, False, False),
                                          ("fp8-channel", False, None, True), ("fp8-channel", False, None, False))]
    for r in report["rows"]:
        # float16-widened x is rounded to float16: near, not exact.
        assert r["ok"] and r["rel_err"] < (1e-3 if r["dot_f16"] else 1e-5), r
        assert r["triton_us"] > 0 and r["one_by_one_us"] > 0 and r["floor_us"] > 0
    assert report["all_ok"] and Path(report["plot"]).exists()
