"""A replica's load, read from the text its server exports on ``/metrics`` (docs/serving.md): pure, so
the autoscaler's input is tested without a server.

In-flight requests are a gauge read as is. Requests per second come from a counter: the difference to
the previous scrape of the same replica over the time between them; a counter that went down (the
server restarted) gives no value for that scrape rather than a negative one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from largo.api.v1alpha1 import RuntimeType, ScalingMetric

# What each runtime exports; a custom server speaks largo's names.
IN_FLIGHT = {
    RuntimeType.LARGO: ("largo_serve_requests_in_flight",),
    RuntimeType.CUSTOM: ("largo_serve_requests_in_flight",),
    # vLLM: admitted and not finished = running + waiting.
    RuntimeType.VLLM: ("vllm:num_requests_running", "vllm:num_requests_waiting"),
}
FINISHED = {
    RuntimeType.LARGO: "largo_serve_requests_total",
    RuntimeType.CUSTOM: "largo_serve_requests_total",
    RuntimeType.VLLM: "vllm:request_success_total",
}


@dataclass(frozen=True, slots=True)
class Counter:
    """A replica's finished-requests counter at one scrape."""

    time: float
    total: float


def _sums(text: str, names: Iterable[str]) -> dict[str, float]:
    """Each named series summed over its labels; a name absent from the text is absent here. ValueError
    for a sample that is no count (NaN, infinite or negative: a custom server's bug), as for text that
    cannot be parsed: summed, it would stall every later decision on that window."""
    wanted = set(names)
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                value = float(sample.value)
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"{sample.name} is {value}, not a count")
                sums[sample.name] = sums.get(sample.name, 0.0) + value
    if not all(map(math.isfinite, sums.values())):
        raise ValueError("a sum of the series is not finite")
    return sums


def replica_load(
    text: str, metric: ScalingMetric, runtime: RuntimeType, now: float, previous: Counter | None
) -> tuple[float | None, Counter | None]:
    """(the load to sample, the counter to keep for the next scrape). The load is None when the text
    lacks the series, cannot be parsed, or (requests per second) there is no earlier scrape yet."""
    if metric is ScalingMetric.IN_FLIGHT:
        try:
            sums = _sums(text, IN_FLIGHT[runtime])
        except ValueError:
            return None, previous
        total = sum(sums.values())
        if not sums or not math.isfinite(total):
            return None, previous
        return total, previous
    counter = finished_counter(text, runtime, now)
    if counter is None:
        return None, previous
    if previous is None or now <= previous.time or counter.total < previous.total:
        return None, counter
    rate = (counter.total - previous.total) / (now - previous.time)
    return (rate if math.isfinite(rate) else None), counter


def finished_counter(text: str, runtime: RuntimeType, now: float) -> Counter | None:
    """The replica's finished-requests counter now, if its text has one. Beside an in-flight load
    sampled every period, it tells whether requests came and went between two samples (short ones at
    a low rate are seldom in flight when scraped): a service that served any is not idle."""
    name = FINISHED[runtime]
    try:
        sums = _sums(text, (name,))
    except ValueError:
        return None
    if name in sums:
        return Counter(now, sums[name])
    # Declared without a sample: a labelled counter (by code, as docs/serving.md asks of a custom
    # server) shows none before its first request. It counts 0: read as no counter, an idle replica
    # gave no sample and held the service at its size for good.
    return Counter(now, 0.0) if _declares(text, name) else None


def _declares(text: str, sample_name: str) -> bool:
    """Whether ``text`` declares the counter whose samples are named ``sample_name``."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return False
    names = {family.name for family in families if family.type == "counter"}
    return sample_name in names or sample_name.removesuffix("_total") in names


# The router's count of requests waiting for a first ready replica (largo.router.agent).
HELD = "largo_router_requests_held"


def held_requests(text: str) -> float | None:
    """Requests a router holds for want of a ready replica: demand that no replica can report."""
    try:
        return _sums(text, (HELD,)).get(HELD)
    except ValueError:
        return None
