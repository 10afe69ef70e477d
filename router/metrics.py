"""The service's Prometheus metrics (vLLM-style names under ``splitserve:``).

Lifecycle: the engine core owns one `RouterMetrics` (its own registry, so two cores in one
process never share counters). Per request it records arrival, each token's time and the
end (`RequestTimer`, on the engine's thread as each step's outputs go out); a scrape reads
group states and transfer counts between steps (`observe_groups`, `observe_transfers`) and
renders the text format (`render`).

The front doors count every request they answer, by API, method and final status
(`FrontDoorMetrics`: also those refused before reaching the core, such as a bad API key or
a malformed body); the gRPC and HTTP servers of one door process share one
(`front_door_metrics`). Each door hands its counts to the core with its beats (`drain`); the
core sums them, so ``/metrics`` on any door is the whole service's text.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from splitserve.kvtransfer.messages import TransferMetrics
from splitserve.router.messages import GroupStatus

P = "splitserve:"
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0, 160.0)


class RouterMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        group = ["group", "role"]
        self.running = Gauge(P + "num_requests_running", "Requests running on a group.", group, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting in a group's scheduler.", group, registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_perc", "KV-cache usage of a group (1 = full).", group, registry=r)
        self.healthy = Gauge(P + "group_healthy", "1 while a group serves, 0 while failed or restarting.", group,
                             registry=r)
        self.inflight = Gauge(P + "num_requests_inflight", "Requests admitted by the router and not finished.",
                              registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", registry=r)
        self.prefix_queries = Counter(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter(P + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self.success = Counter(P + "request_success", "Finished requests by finish reason.", ["finished_reason"],
                               registry=r)
        self.errors = Counter(P + "request_errors", "Requests refused or failed, by status code.", ["code"],
                              registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between tokens of a request.",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token.", buckets=_LATENCY,
                             registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds", "Arrival to the first token's step starting "
                               "(waiting for admission and scheduling).", buckets=_LATENCY, registry=r)
        self.transfer_latency = Histogram(P + "kv_transfer_latency_seconds", "KV transfer, first to last byte.",
                                          buckets=_LATENCY, registry=r)
        self.transfer_bytes = Counter(P + "kv_transfer_bytes", "KV bytes moved prefill -> decode.", registry=r)
        self.transfer_failures = Counter(P + "kv_transfer_failures", "KV transfers failed or timed out.", registry=r)
        self._transfers_seen = 0
        self._bytes_seen = 0
        self._failures_seen = 0

    def observe_groups(self, statuses: list[GroupStatus]) -> None:
        for s in statuses:
            labels = (s.name, s.role)
            self.running.labels(*labels).set(s.num_running)
            self.waiting.labels(*labels).set(s.num_waiting)
            self.kv_usage.labels(*labels).set(s.kv_usage)
            self.healthy.labels(*labels).set(1 if s.state == "ready" else 0)

    def observe_transfers(self, metrics: TransferMetrics) -> None:
        """New completed transfers since the last call (the engine keeps the recent ones)."""
        new = metrics.num_transfers - self._transfers_seen
        if new > 0:  # latencies of those still kept; bytes from the total, which counts all
            for _, seconds in list(metrics.per_transfer)[-new:]:
                self.transfer_latency.observe(seconds)
            self.transfer_bytes.inc(metrics.num_bytes - self._bytes_seen)
            self._transfers_seen, self._bytes_seen = metrics.num_transfers, metrics.num_bytes
        failures = metrics.num_failures - self._failures_seen
        if failures > 0:
            self.transfer_failures.inc(failures)
            self._failures_seen = metrics.num_failures

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class RequestTimer:
    """One request's timeline, as the router saw its chunks arrive."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None

    def on_tokens(self, metrics: RouterMetrics, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            metrics.ttft.observe(now - self.arrival)
        elif self.last_token is not None:
            # Tokens that arrive together (a multi-token chunk) share the gap.
            gap = (now - self.last_token) / num_tokens
            for _ in range(num_tokens):
                metrics.itl.observe(gap)
        self.last_token = now
        metrics.generation_tokens.inc(num_tokens)

    def on_finish(self, metrics: RouterMetrics, reason: str | None, prompt_tokens: int, cached_tokens: int) -> None:
        metrics.e2e.observe(time.monotonic() - self.arrival)
        metrics.success.labels(reason or "unknown").inc()
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.prefix_queries.inc(prompt_tokens)
        metrics.prefix_hits.inc(cached_tokens)


class FrontDoorMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(P + "api_requests", "Requests answered by a front door, by API (grpc, http), "
                                "method and final status (OK or the gRPC status name; HTTP maps to the same).",
                                ["api", "method", "code"], registry=r)
        #: Counts not yet handed on (`drain`): a front-door process sends them to the engine
        #: core, which sums every door's, so one scrape of any door sees them all.
        self._undrained: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()

    def count(self, api: str, method: str, code: str) -> None:
        self.requests.labels(api, method, code).inc()
        with self._lock:
            key = (api, method, code)
            self._undrained[key] = self._undrained.get(key, 0) + 1

    def drain(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            out, self._undrained = self._undrained, {}
        return out

    def render(self) -> bytes:
        return generate_latest(self.registry)


_FRONT_DOORS: "weakref.WeakKeyDictionary[object, FrontDoorMetrics]" = weakref.WeakKeyDictionary()


def front_door_metrics(router: object) -> FrontDoorMetrics:
    """The counters of ``router``'s front doors (one set per router handle, shared by its
    gRPC and HTTP servers; two routers in one process keep theirs apart). A router that
    carries its own (``door_metrics``: the engine client, which sends them to the core)
    gives those."""
    own = getattr(router, "door_metrics", None)
    if own is not None:
        return own
    if router not in _FRONT_DOORS:
        _FRONT_DOORS[router] = FrontDoorMetrics()
    return _FRONT_DOORS[router]
