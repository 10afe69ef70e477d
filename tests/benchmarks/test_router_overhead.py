"""benchmarks/router_overhead.py: its statistics, and one small real run (local Ray, tiny model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package
import router_overhead as ro  # noqa: E402


def test_percentile_interpolates_and_summary_reports_ms():
    assert ro.percentile([3.0], 99) == 3.0
    assert ro.percentile([0.0, 1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert ro.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    s = ro.summary([0.001, 0.002, 0.003])
    assert s["n"] == 3 and s["p50_ms"] == pytest.approx(2.0) and s["mean_ms"] == pytest.approx(2.0)


def test_overhead_is_router_minus_direct():
    o = ro.overhead({"p50_ms": 5.0, "p99_ms": 9.0, "mean_ms": 6.0}, {"p50_ms": 2.0, "p99_ms": 3.0, "mean_ms": 2.5})
    assert o == {"p50_ms": 3.0, "p99_ms": 6.0, "mean_ms": 3.5}


def test_small_run_writes_a_report(ray_local, tmp_path):
    out = tmp_path / "r.json"
    report = ro.main(["--sequential", "10", "--requests", "40", "--concurrency", "8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    assert saved["sequential"]["router"]["n"] == 10 and saved["sequential"]["direct"]["n"] == 10
    assert report["sustained"]["router_req_s"] > 0 and len(saved["latencies_ms"]["router_loaded"]) == 40
    assert saved["sequential"]["grpc"]["n"] == 10 and len(saved["latencies_ms"]["grpc_loaded"]) == 40
