"""The load generator's arithmetic: percentiles by nearest rank, and what a summary says."""

from __future__ import annotations

from collections import Counter

from largo.dev.load import Results


def test_percentiles_are_nearest_rank_of_answered_requests() -> None:
    results = Results(latencies=[float(v) for v in range(1, 101)])
    assert results.percentile(0.5) == 50.0
    assert results.percentile(0.99) == 99.0
    assert results.percentile(1.0) == 100.0
    assert Results().percentile(0.5) == 0.0


def test_the_summary_counts_failures_by_reason() -> None:
    results = Results(latencies=[0.1, 0.3], failures=Counter({"HTTP 503": 2, "ClientConnectorError": 1}))
    assert results.answered == 2
    assert results.failed == 3
    assert results.summary() == (
        "2 answered, 3 failed (HTTP 503: 2, ClientConnectorError: 1); latency p50 0.10s, p99 0.30s"
    )
