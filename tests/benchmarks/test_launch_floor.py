"""benchmarks/launch_floor.py on CPU: the fit, the bound and the kernel counts taken from profiles;
its two Triton kernels in the interpreter (a subprocess, so the interpreter is on before triton
is imported); the plot and table from a made-up report."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench_modules import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "launch_floor.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("launch_floor")


def test_the_fit_recovers_fixed_cost_and_rate(bench):
    points = [(x, 2.5e-6 + x / 4.0e12) for x in (1 << 20, 1 << 22, 1 << 24, 1 << 26)]
    fit = bench.fit_line(points)
    assert fit.fixed_s == pytest.approx(2.5e-6) and fit.bytes_per_s == pytest.approx(4.0e12)
    with pytest.raises(ValueError, match="two sizes"):
        bench.fit_line(points[:1])
    with pytest.raises(ValueError, match="does not grow"):
        bench.fit_line([(1, 2.0), (2, 1.0)])


def test_the_bound_adds_every_kernels_fixed_cost_to_the_floor(bench):
    case = bench.Case("x", kernels_per_step=500, layers=50, read_gb=4.0, step_ms=3.0, target_vs_floor=1.5, source="")
    row = bench.bound(case, fixed_s=2e-6, copy_bytes_per_s=4e12)
    assert row["floor_ms"] == pytest.approx(1.0)
    assert row["bound_ms"] == pytest.approx(2.0) and row["bound_vs_floor"] == pytest.approx(2.0)
    assert not row["target_reachable_with_these_kernels"]
    # 1.5x a 1 ms floor leaves 0.5 ms of fixed cost: 250 kernels, 5 a layer.
    assert row["max_kernels_per_step_for_target"] == pytest.approx(250)
    assert row["max_kernels_per_layer_for_target"] == pytest.approx(5)
    assert bench.bound(replace(case, kernels_per_step=200), 2e-6, 4e12)["target_reachable_with_these_kernels"]
    # Read at the kernels' own (faster) rate, the bound's bytes cost less than the floor's.
    assert bench.bound(case, 2e-6, 4e12, 5e12)["bound_ms"] == pytest.approx(0.8 + 1.0)
    # A target that is a time: its multiple is of this run's floor (2.5 ms over a 1 ms floor).
    timed = bench.bound(replace(case, target_step_ms=2.5), 2e-6, 4e12)
    assert timed["target_vs_floor"] == pytest.approx(2.5) and timed["target_reachable_with_these_kernels"]


def test_profiles_recount_the_matching_cases_kernels(bench):
    profiles = [{"model": "random:llama-3-8b", "quantization": "fp8", "batch": 1, "kernels_per_step": 301,
                 "git_commit": "abc"},
                {"model": "random:llama-3-8b", "quantization": "fp8", "batch": 64, "kernels_per_step": 999}]
    cases = bench.with_profiles(bench.CASES, profiles)
    fp8 = [c for c in cases if c.profile_key == ("random:llama-3-8b", "fp8", 1)]
    assert fp8 and all(c.kernels_per_step == 301 and "abc" in c.source for c in fp8)
    def others(cs):
        return [c for c in cs if c.profile_key != ("random:llama-3-8b", "fp8", 1)]
    assert others(cases) == others(bench.CASES) != []


def test_the_plot_and_table_from_a_report(bench, tmp_path):
    runs = [{"chain": chain.value, "empty_kernel_us": 1.1, "fit_fixed_us": 2.0, "fit_GBps": 4000.0, "copy_GBps": 4100.0,
             "read": [{"bytes": x, "us": 2.0 + x / 4e6, "GBps": x / (2.0 + x / 4e6) / 1e3} for x in bench.READ_SIZES]}
            for chain in bench.Chain]
    cases = [bench.bound(c, fixed, 4.1e12) | {"chain": chain.value} for c in bench.CASES
             for chain, fixed in zip(bench.Chain, (2e-6, 1.2e-6, 5e-7))]
    report = {"device": {"name": "test"}, "runs": runs, "cases": cases}
    bench.plot(tmp_path / "p.png", report)
    assert (tmp_path / "p.png").stat().st_size > 0
    text = bench.table(report)
    assert "NOT reachable" in text and "qwen3-30b-a3b" in text and ", pdl_loads_first (0.50 us a kernel)" in text


KERNELS = """
import torch, triton
sys_path = {bench_dir!r}
import sys; sys.path.insert(0, sys_path)
import launch_floor
tick, read = launch_floor._tick, launch_floor._read
out = torch.zeros(8, dtype=torch.int32)
tick[(3,)](out, PDL=0)
assert out.tolist() == [1, 1, 1, 0, 0, 0, 0, 0], out
x = torch.arange(10_000, dtype=torch.int32)
out.zero_()
read[(3,)](x, out, x.numel(), BLOCK=512, PDL=0)
assert int(out.sum()) == int(x.sum()), (out, x.sum())
print("OK")
"""


def test_the_kernels_store_what_they_read_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNELS.format(bench_dir=str(SCRIPT.parent))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_a_report_recomputes_from_earlier_measurements_without_a_gpu(tmp_path):
    """``--report-from``: the runs of an earlier result, the cases recounted from a profile."""
    import json

    bench = load_benchmark("launch_floor")
    runs = [{"pdl": False, "empty_kernel_us": 1.0, "fit_fixed_us": 2.0, "fit_GBps": 4000.0, "copy_GBps": 4000.0,
             "read": [{"bytes": x, "us": 2.0 + x / 4e6, "GBps": 1.0} for x in bench.READ_SIZES]}]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"device": {"name": "NVIDIA H200"}, "date": "2026-12-04", "runs": runs}))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"model": "random:qwen3-30b-a3b", "quantization": None, "batch": 1,
                                   "kernels_per_step": 100, "git_commit": "abc"}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--report-from", str(earlier), "--profile", str(profile),
                           "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    qwen = report["cases"][0]
    assert qwen["chain"] == "none" and qwen["kernels_per_step"] == 100 and qwen["bound_ms"] == pytest.approx(qwen["floor_ms"] + 0.2)
    assert report["device"]["measured_in"] == "earlier.json" and (tmp_path / "r.png").exists()


def test_the_kernels_compile_for_sm90_with_and_without_pdl(bench):
    """What the H200 runs: both kernels, both PDL branches (the interpreter never sees PDL's)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for pdl in (0, 1, 2):
        for fn, sig, consts in ((bench._tick, {"out_ptr": "*i32", "PDL": "constexpr"}, {"PDL": pdl}),
                                (bench._read, {"x_ptr": "*i32", "out_ptr": "*i32", "n": "i32", "BLOCK": "constexpr",
                                               "PDL": "constexpr"}, {"BLOCK": 2048, "PDL": pdl})):
            names = list(sig)
            src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            assert ("griddepcontrol" in kernel.asm["ptx"]) is (pdl != 0)
