"""kvtransfer/messages.py: the service's counters stay bounded in a long-running server."""

from __future__ import annotations

from splitserve.kvtransfer.messages import PER_TRANSFER_KEPT, TransferMetrics


def test_per_transfer_keeps_the_latest_and_the_totals_count_all():
    from prometheus_client.parser import text_string_to_metric_families

    from splitserve.router.metrics import RouterMetrics

    metrics, scraped = TransferMetrics(), RouterMetrics()
    n = PER_TRANSFER_KEPT + 1000
    for i in range(n):
        metrics.record(10, 0.001)
    assert len(metrics.per_transfer) == PER_TRANSFER_KEPT and metrics.num_transfers == n
    scraped.observe_transfers(metrics)
    samples = {s.name: s.value for f in text_string_to_metric_families(scraped.render().decode()) for s in f.samples}
    assert samples["splitserve:kv_transfer_bytes_total"] == 10 * n  # every byte, though not every latency
    assert samples["splitserve:kv_transfer_latency_seconds_count"] == PER_TRANSFER_KEPT
