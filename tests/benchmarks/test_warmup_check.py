"""benchmarks/warmup_check.py on CPU: the seeded workload and the per-mode summary (the compiles
it counts happen on a GPU only)."""

from __future__ import annotations

from bench_modules import load_benchmark


def test_workload_is_seeded_and_within_bounds():
    bench = load_benchmark("warmup_check")
    waves = bench.workload(3, 20, 3000, 1000)
    assert waves == bench.workload(3, 20, 3000, 1000) and waves != bench.workload(4, 20, 3000, 1000)
    lengths = [len(p) for wave in waves for p in wave]
    assert all(1 <= len(wave) <= 4 for wave in waves)
    assert min(lengths) >= 1 and max(lengths) <= 3000 and max(lengths) > 2048  # some prompts get chunked
    assert all(100 <= t < 999 for wave in waves for p in wave for t in p)


def test_summary_counts_the_workloads_compiles():
    bench = load_benchmark("warmup_check")
    record = {"startup_s": 3.0, "startup_compiles": 40, "waves": [
        {"seconds": 0.1, "compiles": 0, "kernels": []},
        {"seconds": 2.5, "compiles": 3, "kernels": ["_down_kernel", "_gate_up_kernel"]},
        {"seconds": 0.2, "compiles": 1, "kernels": ["_down_kernel"]}]}
    s = bench.summarize(record)
    assert (s["workload_compiles"], s["waves_with_compiles"], s["max_wave_s"]) == (4, 2, 2.5)
    assert s["kernels_compiled_in_workload"] == ["_down_kernel", "_gate_up_kernel"]
    assert s["median_wave_s"] == 0.2
