"""The server's histograms reach as far as requests go: a quantile above the last finite bucket reads
as that bucket (Prometheus' histogram_quantile), so a minutes-long generation would show as 30 s."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from largo.api.v1alpha1 import RuntimeType, ScalingMetric
from largo.policy.load import replica_load
from largo.runtime.serve import Metrics, serve_metrics
from prometheus_client import CollectorRegistry, generate_latest


def _bucket(registry: CollectorRegistry, name: str, le: str) -> float | None:
    return registry.get_sample_value(f"{name}_bucket", {"le": le})


@pytest.mark.parametrize(
    ("histogram", "name", "observed", "below", "at"),
    [
        ("latency", "largo_serve_request_seconds", 200.0, "120.0", "300.0"),
        ("latency", "largo_serve_request_seconds", 590.0, "300.0", "600.0"),
        ("first_token", "largo_serve_time_to_first_token_seconds", 20.0, "10.0", "30.0"),
        ("batch_size", "largo_serve_batch_size", 100, "64.0", "128.0"),
    ],
)
def test_a_long_observation_lands_in_a_finite_bucket(
    histogram: str, name: str, observed: float, below: str, at: str
) -> None:
    registry = CollectorRegistry()
    getattr(Metrics(registry), histogram).observe(observed)
    assert _bucket(registry, name, below) == 0
    assert _bucket(registry, name, at) == 1


def test_a_server_that_has_not_answered_yet_has_a_rate_of_zero() -> None:
    """The requestsPerSecond autoscaler reads the finished-requests counter: before a first answer it
    must be there at 0, or the leader has no rate and counts as busy at the target."""
    registry = CollectorRegistry()
    Metrics(registry)
    text = generate_latest(registry).decode()
    rate, counter = replica_load(text, ScalingMetric.REQUESTS_PER_SECOND, RuntimeType.LARGO, 10.0, None)
    assert rate is None  # a first scrape has nothing to take a rate against
    assert counter is not None
    assert replica_load(text, ScalingMetric.REQUESTS_PER_SECOND, RuntimeType.LARGO, 12.0, counter)[0] == 0.0


def test_a_custom_server_s_labelled_counter_without_a_sample_yet_counts_zero() -> None:
    """docs/serving.md asks a custom server for largo_serve_requests_total by `code`: prometheus_client
    shows such a counter's HELP and TYPE only until its first request. Read as no counter, an idle
    replica gave no sample, and the service kept its size for good."""
    from prometheus_client import Counter as Requests

    registry = CollectorRegistry()
    Requests("largo_serve_requests", "Requests answered.", ["code"], registry=registry)
    text = generate_latest(registry).decode()
    assert "largo_serve_requests_total{" not in text  # no sample at all
    rate, counter = replica_load(text, ScalingMetric.REQUESTS_PER_SECOND, RuntimeType.CUSTOM, 10.0, None)
    assert rate is None
    assert counter is not None
    assert counter.total == 0
    rate_of = ScalingMetric.REQUESTS_PER_SECOND
    assert replica_load(text, rate_of, RuntimeType.CUSTOM, 12.0, counter)[0] == 0.0
    assert replica_load("# TYPE other counter\n", rate_of, RuntimeType.CUSTOM, 1.0, None) == (None, None)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_the_metrics_page_answers_on_ipv4_and_on_ipv6() -> None:
    """The operator scrapes the pod's IP, an IPv6 one in an IPv6 cluster: the page listens on both."""
    registry = CollectorRegistry()
    Metrics(registry)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve_metrics(port, registry)
    hosts = ["127.0.0.1", *(["[::1]"] if _ipv6_loopback() else [])]
    for host in hosts:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as page:
            assert b"largo_serve_requests_in_flight" in page.read()
