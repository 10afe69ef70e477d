"""benchmarks/serve_metrics.py on hand-built timelines, with the expected numbers worked out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package
from serve_metrics import (SLO, RequestRecord, describe, max_rate_meeting_slo, percentile,  # noqa: E402
                           request_metrics, summarize)


def record(start: float, deliveries: list[tuple[float, int]], input_len: int = 10, output_len: int | None = None,
           **kwargs) -> RequestRecord:
    n = sum(k for _, k in deliveries)
    end = deliveries[-1][0] if deliveries else None
    return RequestRecord(input_len, n if output_len is None else output_len, start, start, list(deliveries),
                         end, **kwargs)


def test_request_metrics_of_one_timeline():
    # Sent at 1.0; first token 1.5; then one token, two tokens in one delivery, one more.
    m = request_metrics(record(1.0, [(1.5, 1), (1.6, 1), (1.8, 2), (2.1, 1)]))
    assert m.ttft_s == pytest.approx(0.5)
    assert m.e2e_s == pytest.approx(1.1)
    assert m.num_output_tokens == 5
    assert m.tpot_s == pytest.approx((1.1 - 0.5) / 4)  # 0.15
    # One gap per delivery after the first: the 2-token delivery is one gap of 0.2, not 0.2 + 0.
    assert m.itl_s == pytest.approx([0.1, 0.2, 0.3])


def test_latencies_count_from_start_not_arrival():
    rec = RequestRecord(4, 2, arrival_s=1.0, start_s=1.25, deliveries=[(1.5, 1), (1.75, 1)], end_s=2.0)
    m = request_metrics(rec)
    assert (m.ttft_s, m.e2e_s, m.tpot_s) == pytest.approx((0.25, 0.75, 0.5))


def test_one_token_output_has_no_tpot_and_usage_count_wins():
    assert request_metrics(record(0.0, [(0.3, 1)])).tpot_s is None
    # A text-only stream: 3 deliveries counted, the server's usage says 6 tokens.
    m = request_metrics(record(0.0, [(0.2, 1), (0.4, 1), (1.2, 1)], num_output_tokens=6))
    assert m.num_output_tokens == 6 and m.tpot_s == pytest.approx(1.0 / 5)


def test_unfinished_request_has_no_metrics():
    with pytest.raises(ValueError, match="did not complete"):
        request_metrics(record(0.0, [], error="HTTP 500"))


def test_percentile_interpolates_between_ranks():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)  # h = 1.5
    assert percentile(xs, 90) == pytest.approx(3.7)  # h = 2.7
    assert percentile(xs, 99) == pytest.approx(3.97)  # h = 2.97
    assert percentile([7.0], 99) == 7.0
    assert describe([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    assert describe(xs) == pytest.approx({"count": 4, "mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97, "max": 4.0})


def test_summarize_a_run():
    records = [
        record(0.0, [(0.5, 1), (0.6, 1), (0.8, 2), (1.1, 1)], input_len=10),  # ttft .5, tpot .15: meets
        record(1.0, [(1.3, 1)], input_len=20),                               # one token, ttft .3: meets
        record(2.0, [(2.6, 1), (2.7, 1)], input_len=30),                     # ttft .6: misses TTFT
        record(2.0, [(2.1, 1), (2.5, 1), (2.9, 1)], input_len=40, output_len=4),  # tpot .4: misses TPOT
        record(3.0, [], input_len=50, error="HTTP 500: boom"),               # failed: misses both
    ]
    s = summarize(records, duration_s=4.0, slo=SLO(ttft_s=0.5, tpot_s=0.2))
    assert (s["num_requests"], s["num_completed"], s["num_failed"]) == (5, 4, 1)
    assert s["num_wrong_length"] == 1  # asked 4 tokens, got 3
    assert s["errors"] == ["HTTP 500: boom"]
    assert (s["input_tokens"], s["output_tokens"]) == (100, 11)
    assert s["throughput"] == pytest.approx({"requests_per_s": 1.0, "output_tokens_per_s": 11 / 4,
                                             "total_tokens_per_s": 111 / 4})
    assert s["ttft_s"]["mean"] == pytest.approx((0.5 + 0.3 + 0.6 + 0.1) / 4)
    assert s["ttft_s"]["p50"] == pytest.approx(0.4)  # sorted .1 .3 .5 .6, h = 1.5
    assert s["ttft_s"]["p99"] == pytest.approx(0.5 + 0.97 * 0.1)  # h = 2.97
    # TPOT: 0.15, 0.1, 0.4 (the one-token request has none).
    assert s["tpot_s"]["count"] == 3 and s["tpot_s"]["p50"] == pytest.approx(0.15)
    assert s["tpot_s"]["mean"] == pytest.approx((0.15 + 0.1 + 0.4) / 3)
    # ITL gaps: .1 .2 .3 | - | .1 | .4 .4
    assert s["itl_s"]["count"] == 6 and s["itl_s"]["mean"] == pytest.approx(1.5 / 6)
    assert s["itl_s"]["p50"] == pytest.approx(0.25)
    assert s["e2e_s"]["max"] == pytest.approx(1.1)
    assert s["mean_tokens_per_delivery"] == pytest.approx(11 / 10)
    assert s["slo"] == pytest.approx({"ttft_s": 0.5, "tpot_s": 0.2, "num_met": 2, "attainment": 2 / 5,
                                      "goodput_requests_per_s": 0.5})


def test_slo_boundaries_are_inclusive():
    m = request_metrics(record(0.0, [(0.5, 1), (0.75, 1)]))  # ttft 0.5, tpot 0.25 exactly
    assert SLO(0.5, 0.25).met_by(m) and not SLO(0.49, 0.25).met_by(m) and not SLO(0.5, 0.24).met_by(m)
    with pytest.raises(ValueError):
        SLO(0.0, 0.1)


@pytest.mark.parametrize("points, expected", [
    ([(1, 0.95), (2, 0.92), (4, 0.85), (8, 0.95)], 2),  # 8 passing after 4 failed is noise
    ([(8, 0.95), (1, 1.0), (4, 0.9), (2, 0.99)], 8),  # any order; exactly 90% passes
    ([(1, 0.89), (2, 1.0)], None),
    ([(1, 1.0), (float("inf"), 0.91)], float("inf")),
    ([], None),
])
def test_max_rate_meeting_slo(points, expected):
    assert max_rate_meeting_slo(points) == expected


def test_max_rate_meeting_slo_other_target():
    assert max_rate_meeting_slo([(1, 0.99), (2, 0.97), (3, 0.95)], target=0.96) == 2
