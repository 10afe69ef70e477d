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


def test_overhead_is_path_minus_direct():
    o = ro.overhead({"p50_ms": 5.0, "p99_ms": 9.0, "mean_ms": 6.0}, {"p50_ms": 2.0, "p99_ms": 3.0, "mean_ms": 2.5})
    assert o == {"p50_ms": 3.0, "p99_ms": 6.0, "mean_ms": 3.5}


def test_split_shares_clients_and_requests():
    assert ro.split(64, 2) == [32, 32] and ro.split(7, 3) == [3, 2, 2] and sum(ro.split(5, 8)) == 5


def test_small_run_writes_a_report(ray_local, tmp_path):
    """Every path once: direct, the engine core through an EngineClient here, and gRPC through one
    front door from one spawned client process."""
    out = tmp_path / "r.json"
    report = ro.main(["--sequential", "10", "--requests", "40", "--concurrency", "8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    seq, sus = saved["sequential"], saved["sustained"]
    assert seq["direct"]["n"] == seq["core"]["n"] == seq["grpc"]["n"] == 10
    assert set(seq) >= {"core_overhead", "grpc_overhead"} and "router" not in seq and "router_req_s" not in sus
    assert report["sustained"]["core_req_s"] > 0 and sus["grpc_req_s"] > 0 and sus["direct_all_at_once_req_s"] > 0
    assert len(saved["latencies_ms"]["core_loaded"]) == 40 and len(saved["latencies_ms"]["grpc_loaded"]) == 40
    (variant,) = sus["grpc_variants"]
    assert variant["api_servers"] == 1 and variant["client_processes"] == 1 and variant["latency"]["n"] == 40
    assert variant["cpu_s"]["processes"].get("core", 0) > 0 and len(variant["cpu_s"]["each_client"]) == 1
    g = saved["issue14"]
    assert g["baseline_grpc_req_s"] == 361.0 and g["ratio"] == pytest.approx(sus["grpc_req_s"] / 361.0)
    assert g["grpc_added_p50_ms"] == pytest.approx(seq["grpc_overhead"]["p50_ms"])
