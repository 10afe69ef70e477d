"""Serving metrics from per-request timelines: latencies, throughput, SLO attainment.

A backend records one `RequestRecord` per request: when it was due, when it entered the
system, and each streamed delivery of tokens (time, how many). Everything else is derived:

    request_metrics(record)      # TTFT, TPOT, ITL gaps, end-to-end latency of one request
    summarize(records, ...)      # mean / percentiles, throughput, SLO attainment and goodput
    max_rate_meeting_slo(...)    # over a sweep of request rates

Definitions (all times in seconds, on one clock, measured from the request's ``start_s``):

- TTFT: first delivery carrying a token - start.
- E2E: end of the request (its last token, or the end of its stream) - start.
- TPOT: (E2E - TTFT) / (output tokens - 1): the mean time per token after the first;
  undefined (None) for one-token outputs, which then meet any TPOT objective.
- ITL: the gap before each delivery after the first. A delivery carrying k tokens is one gap,
  not one gap and k-1 zeros: zeros would pull the median to 0 and hide the stall a reader
  sees. TPOT stays the per-token average; ``mean_tokens_per_delivery`` tells how they relate.
- Percentiles interpolate linearly between the two nearest ranks (numpy's default).
- SLO attainment: requests with TTFT <= slo.ttft_s and TPOT <= slo.tpot_s, over ALL requests
  sent (a failed request misses its objectives). Goodput: those requests per second.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

#: A sweep's rate "meets the SLO" when at least this fraction of its requests meet both objectives.
SLO_TARGET_FRACTION = 0.9


@dataclass
class RequestRecord:
    input_len: int
    #: Output tokens asked for (max_tokens with ignore_eos).
    output_len: int
    #: When the workload schedules the request (seconds after the run's start).
    arrival_s: float
    #: When it entered the system: latencies are measured from here (>= arrival_s).
    start_s: float
    #: (time, number of tokens) of each streamed delivery that carried tokens, in order.
    deliveries: list[tuple[float, int]] = field(default_factory=list)
    #: When the request ended (last token or end of stream); None while unfinished.
    end_s: float | None = None
    #: Output tokens received; None: the sum over ``deliveries``. Set when the server's own
    #: count (usage) is the better one, e.g. a server that streams text without token ids.
    num_output_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.deliveries) and self.end_s is not None

    @property
    def num_tokens(self) -> int:
        if self.num_output_tokens is not None:
            return self.num_output_tokens
        return sum(n for _, n in self.deliveries)


@dataclass(frozen=True)
class RequestMetrics:
    ttft_s: float
    e2e_s: float
    #: None for a one-token output.
    tpot_s: float | None
    itl_s: list[float]
    num_output_tokens: int


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLOs must be positive, got ttft {self.ttft_s} s and tpot {self.tpot_s} s")

    def met_by(self, m: RequestMetrics) -> bool:
        return m.ttft_s <= self.ttft_s and (m.tpot_s is None or m.tpot_s <= self.tpot_s)


def request_metrics(record: RequestRecord) -> RequestMetrics:
    """The latencies of one completed request (see the module docstring)."""
    if not record.ok:
        raise ValueError(f"request did not complete: {record.error or 'no tokens'}")
    times = [t for t, _ in record.deliveries]
    ttft = times[0] - record.start_s
    e2e = max(record.end_s, times[-1]) - record.start_s
    n = record.num_tokens
    tpot = (e2e - ttft) / (n - 1) if n > 1 else None
    itl = [b - a for a, b in itertools.pairwise(times)]
    return RequestMetrics(ttft, e2e, tpot, itl, n)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100), linear between the two nearest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    h = (len(xs) - 1) * p / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def describe(values: list[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 and max (None when there are no values)."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {"count": len(values), "mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99), "max": max(values)}


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO) -> dict[str, Any]:
    """Aggregate one run: ``duration_s`` is from the run's start until its last request ended."""
    done = [r for r in records if r.ok]
    metrics = [request_metrics(r) for r in done]
    num_met = sum(slo.met_by(m) for m in metrics)
    out_tokens = sum(m.num_output_tokens for m in metrics)
    in_tokens = sum(r.input_len for r in done)
    num_deliveries = sum(len(r.deliveries) for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        #: Completed with a different number of tokens than asked (ignore_eos should prevent it).
        "num_wrong_length": sum(m.num_output_tokens != r.output_len for r, m in zip(done, metrics)),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration_s,
        "throughput": {"requests_per_s": per_s(len(done)), "output_tokens_per_s": per_s(out_tokens),
                       "total_tokens_per_s": per_s(in_tokens + out_tokens)},
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_s": describe([m.ttft_s for m in metrics]),
        "tpot_s": describe([m.tpot_s for m in metrics if m.tpot_s is not None]),
        "itl_s": describe([gap for m in metrics for gap in m.itl_s]),
        "e2e_s": describe([m.e2e_s for m in metrics]),
        "mean_tokens_per_delivery": out_tokens / num_deliveries if num_deliveries else None,
        "max_start_lag_s": max((r.start_s - r.arrival_s for r in records), default=0.0),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "num_met": num_met,
                "attainment": num_met / len(records) if records else 0.0,
                "goodput_requests_per_s": per_s(num_met)},
    }


def max_rate_meeting_slo(points: list[tuple[float, float]],
                         target: float = SLO_TARGET_FRACTION) -> float | None:
    """The highest rate whose attainment is >= ``target`` with every lower rate tested also
    meeting it; ``points`` are (rate, attainment). None when the lowest rate already misses.

    A rate that passes above one that failed is noise, not capacity: it is not reported.
    """
    best = None
    for rate, attainment in sorted(points):
        if attainment < target:
            break
        best = rate
    return best
