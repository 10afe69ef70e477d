"""benchmarks/disagg_goodput.py: the goodput math on synthetic runs, the time cap of the offline
backend, and the CPU smoke path end to end (both systems on random:tiny-llama, gloo between groups)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package
import disagg_goodput as dg  # noqa: E402
from serve_backends import CUT_OFF, NOT_SENT, OfflineBackend, disagg_config  # noqa: E402
from serve_metrics import SLO  # noqa: E402
from serve_workloads import Request  # noqa: E402


def run(rate: float, attainment: float, met_per_s: float = 1.0) -> dict:
    return {"request_rate": rate, "slo": {"attainment": attainment, "goodput_requests_per_s": met_per_s}}


# --- the goodput math ------------------------------------------------------------------------


def test_crossing_rate_interpolates_between_last_pass_and_first_fail():
    assert dg.crossing_rate([(2, 1.0), (4, 0.95), (8, 0.75)]) == pytest.approx(4 + 0.05 / 0.2 * 4)  # 5.0
    assert dg.crossing_rate([(8, 0.5), (2, 1.0), (4, 0.9)]) == pytest.approx(4.0)  # exactly at target
    assert dg.crossing_rate([(2, 1.0), (4, 0.95)]) == 4  # none fails: the highest rate (a lower bound)
    assert dg.crossing_rate([(2, 0.8), (4, 0.95)]) is None  # the lowest already misses
    # A pass above a failure is noise: the crossing is after the first failure's last pass.
    assert dg.crossing_rate([(2, 1.0), (4, 0.5), (8, 0.95)]) == pytest.approx(2 + 0.1 / 0.5 * 2)


def test_system_summary_and_ratio():
    runs = [run(2, 1.0, 1.9), run(4, 0.92, 3.5), run(8, 0.4, 2.0), {"request_rate": 16, "skipped": "below_stop"}]
    s = dg.system_summary(runs)
    assert s["goodput_rate"] == 4 and s["goodput_rate_interpolated"] == pytest.approx(4 + 0.02 / 0.52 * 4)
    assert s["max_slo_requests_per_s"] == 3.5 and s["complete"] and s["saturated_within_sweep"]

    budget = dg.system_summary([run(2, 1.0), {"request_rate": 4, "skipped": "budget"}])
    assert budget["goodput_rate"] == 2 and not budget["complete"]  # a lower bound
    assert dg.system_summary([run(2, 0.5)])["goodput_rate"] is None

    other = dg.system_summary([run(2, 1.0, 1.0), run(4, 0.6, 1.4)])
    ratios = dg.compare({"disagg": s, "aggregated": other})
    assert ratios["goodput_rate"] == 2.0 and ratios["max_slo_requests_per_s"] == pytest.approx(2.5)
    assert dg.compare({"disagg": s}) == {}
    assert dg.ratio(3.0, None) is None and dg.ratio(None, 2.0) is None


def test_time_cap_is_when_the_last_request_must_have_ended():
    slo = SLO(0.5, 0.05)
    reqs = [Request([1], 11, 0.0), Request([1], 1, 3.0), Request([1], 101, 2.0)]
    # 2.0 + 0.5 + 100 * 0.05 = 7.5, the latest; one second of slack; the hard cap wins when lower.
    assert dg.time_cap(reqs, slo, 60.0) == pytest.approx(7.5 + dg.CAP_SLACK_S)
    assert dg.time_cap(reqs, slo, 5.0) == 5.0


def test_prompts_per_rate_follow_the_window():
    assert [dg.prompts_for(r, 150, 12.0) for r in (0.05, 2, 12.5, 24)] == [1, 24, 150, 150]


def test_lengths_fit_the_model():
    spec = dg.length_spec(dg.parse_args(["--max-output", "100"]), "cuda")
    assert spec.kind == "chat" and spec.max_output == 100 and spec.input_len == 256
    assert dg.fit_spec(spec, 1024).max_input == 924 and dg.fit_spec(spec, 8192).max_input == spec.max_input
    with pytest.raises(SystemExit, match="no room"):
        dg.fit_spec(spec, 110)


def test_disagg_configs_place_groups_and_run_ranks_as_processes():
    from splitserve.workers.engine import EngineConfig

    cfg = EngineConfig(model="random:tiny-llama", device="cpu")
    agg = disagg_config("aggregated", cfg, num_decode=2)
    assert agg.prefill is None and agg.num_decode == 2 and agg.decode.rank_processes
    pd = disagg_config("disagg", cfg)
    assert pd.prefill == pd.decode == cfg and pd.num_prefill == pd.num_decode == 1 and pd.in_process is False
    with pytest.raises(ValueError):
        disagg_config("llm", cfg)


# --- the time cap on a real engine -----------------------------------------------------------


def test_time_cap_aborts_running_requests_and_never_sends_late_ones():
    from splitserve.workers.config import CacheConfig
    from splitserve.workers.engine import EngineConfig

    backend = OfflineBackend(EngineConfig(model="random:tiny-llama", device="cpu", show_progress=False,
                                          cache=CacheConfig(num_blocks=160)))
    try:
        # 1000 tokens of the tiny model take ~0.7 s here (500 once finished inside a 0.5 s cap).
        reqs = [Request(list(range(40, 52)), 2, 0.0), Request(list(range(60, 70)), 1000, 0.0),
                Request(list(range(80, 90)), 4, 30.0)]
        records, duration = backend.run(reqs, time_cap_s=0.25)
        assert not backend.engine.has_unfinished_requests()
        kv = backend.engine.kv_usage()
        assert kv.num_free_blocks == kv.num_blocks
    finally:
        backend.close()
    done, cut, unsent = records
    assert done.ok and done.num_tokens == 2
    assert cut.error == CUT_OFF and 0 < cut.num_tokens < 1000 and cut.end_s >= 0.25
    assert unsent.error == NOT_SENT and not unsent.deliveries
    assert 0.25 <= duration < 10  # did not wait for the request due at 30 s


# --- end to end on CPU -----------------------------------------------------------------------


def test_cpu_smoke_run_writes_report(tmp_path: Path):
    out = tmp_path / "goodput.json"
    report = dg.main(["--device", "cpu", "--model", "random:tiny-llama", "--rates", "4", "8", "--num-prompts", "6",
                      "--num-warmup", "1", "--stop-below", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == report and Path(saved["plot"]).exists()
    assert saved["benchmark"] == "disagg_goodput" and saved["device"]["type"] == "cpu"
    assert saved["workload"]["prompts_per_rate"] == [6, 6]
    for name in ("disagg", "aggregated"):
        system = saved["systems"][name]
        assert [r["request_rate"] for r in system["runs"]] == [4, 8]
        for r in system["runs"]:
            assert r["num_requests"] == 6 and len(r["requests"]) == 6
            assert r["num_completed"] + r["num_cut_off"] == 6 and r["num_wrong_length"] == 0
            assert 0 <= r["slo"]["attainment"] <= 1 and r["duration_s"] <= r["time_cap_s"] + 5
        assert {"goodput_rate", "goodput_rate_interpolated", "max_slo_requests_per_s", "complete"} <= set(system)
    groups = {n: [(g["role"], g["name"]) for g in saved["systems"][n]["backend"]["groups"]]
              for n in ("disagg", "aggregated")}
    assert groups == {"disagg": [("prefill", "prefill-0"), ("decode", "decode-0")],
                      "aggregated": [("worker", "worker-0"), ("worker", "worker-1")]}
    disagg_runs = saved["systems"]["disagg"]["runs"]
    assert sum(r["kv_transfers"]["num_transfers"] for r in disagg_runs) >= sum(r["num_completed"] for r in disagg_runs)
    assert set(saved["disagg_over_aggregated"]) == {"goodput_rate", "goodput_rate_interpolated",
                                                    "max_slo_requests_per_s"}
