"""The autoscaler's input and loop: a replica's load read from real Prometheus text (largo's and
vLLM's names, a counter's rate and its reset), and the loop's glue with a fake API and fake scrapes:
ready leaders only, a silent leader counted busy, a write only when the replicas change, the reason
and load handed to the status through the annotation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
from largo.api.v1alpha1 import InferenceServiceSpec, RuntimeType, ScalingMetric
from largo.controllers.autoscaler import (
    ANNOTATION_SCALING,
    Autoscaler,
    metrics_url,
    ready_leaders,
    router_metrics_url,
    runtime_of,
)
from largo.controllers.kube import ConflictError
from largo.controllers.state import service_entry
from largo.policy.load import Counter, held_requests, replica_load

LARGO_TEXT = """# HELP largo_serve_requests_in_flight Requests admitted and not finished.
# TYPE largo_serve_requests_in_flight gauge
largo_serve_requests_in_flight 3.0
# HELP largo_serve_requests_total Finished requests.
# TYPE largo_serve_requests_total counter
largo_serve_requests_total{code="200"} 90.0
largo_serve_requests_total{code="429"} 10.0
"""
VLLM_TEXT = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 5.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="m"} 40.0
vllm:request_success_total{finished_reason="length",model_name="m"} 2.0
"""


@pytest.mark.parametrize(
    ("text", "runtime", "expected"),
    [
        (LARGO_TEXT, RuntimeType.LARGO, 3.0),
        (LARGO_TEXT, RuntimeType.CUSTOM, 3.0),
        (VLLM_TEXT, RuntimeType.VLLM, 7.0),
    ],
)
def test_in_flight_is_the_gauge_or_running_plus_waiting(
    text: str, runtime: RuntimeType, expected: float
) -> None:
    assert replica_load(text, ScalingMetric.IN_FLIGHT, runtime, 10.0, None) == (expected, None)


def test_requests_per_second_is_the_counter_rate_over_its_labels() -> None:
    metric = ScalingMetric.REQUESTS_PER_SECOND
    first, counter = replica_load(LARGO_TEXT, metric, RuntimeType.LARGO, 10.0, None)
    assert first is None  # a rate needs two scrapes
    assert counter == Counter(10.0, 100.0)
    later = LARGO_TEXT.replace("90.0", "110.0")
    rate, counter = replica_load(later, metric, RuntimeType.LARGO, 12.0, counter)
    assert rate == pytest.approx(10.0)  # 20 more over 2 s
    assert replica_load(VLLM_TEXT, metric, RuntimeType.VLLM, 1.0, None)[1] == Counter(1.0, 42.0)


def test_a_reset_counter_or_missing_series_gives_no_value() -> None:
    metric = ScalingMetric.REQUESTS_PER_SECOND
    value, counter = replica_load(LARGO_TEXT, metric, RuntimeType.LARGO, 20.0, Counter(10.0, 500.0))
    assert value is None
    assert counter == Counter(20.0, 100.0)  # the next scrape rates from here
    assert replica_load("other_metric 1\n", ScalingMetric.IN_FLIGHT, RuntimeType.LARGO, 1.0, None) == (
        None,
        None,
    )
    assert replica_load("{{ not prometheus", ScalingMetric.IN_FLIGHT, RuntimeType.LARGO, 1.0, None)[0] is None


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-1"])
def test_a_sample_that_is_no_count_gives_no_value(value: str) -> None:
    """A custom server's NaN summed into the window would stall every later decision on it."""
    text = f"largo_serve_requests_in_flight {value}\n"
    assert replica_load(text, ScalingMetric.IN_FLIGHT, RuntimeType.LARGO, 1.0, None) == (None, None)
    assert held_requests(f"largo_router_requests_held {value}\n") is None


def _pod(
    name: str, member: str = "0", ready: bool = True, ip: str | None = "10.0.0.1", **meta: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"largo.dev/member": member}, **meta},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_only_ready_serving_leaders_are_scraped() -> None:
    pods = [
        _pod("a-r0-node-0"),
        _pod("a-r0-node-1", member="1"),
        _pod("a-r1-node-0", ready=False),
        _pod("a-r2-node-0", deletionTimestamp="2030-01-01T00:00:00Z"),
    ]
    assert list(ready_leaders(pods)) == ["a-r0-node-0"]


class FakeKube:
    def __init__(self) -> None:
        self.writes: list[tuple[str, str, int, Mapping[str, str]]] = []
        self.conflict = False

    async def scale_service(
        self, namespace: str, name: str, version: str | None, replicas: int, annotations: Mapping[str, str]
    ) -> dict[str, Any]:
        if self.conflict:
            raise ConflictError("changed")
        self.writes.append((namespace, name, replicas, annotations))
        return {}


def _service(replicas: int, **autoscaling: Any) -> Any:
    return service_entry(
        {
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u", "resourceVersion": "7"},
            "spec": {
                "model": {"claimName": "w"},
                "replicas": replicas,
                "autoscaling": {"maxReplicas": 5, "target": 2, "stableWindowSeconds": 10, **autoscaling},
            },
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _autoscaler(
    entry: Any, pods: list[dict[str, Any]], loads: dict[str, float | None]
) -> tuple[Autoscaler, FakeKube, Clock]:
    kube = FakeKube()
    clock = Clock()

    async def scrape(url: str) -> str:
        value = loads[url]
        if value is None:
            raise OSError("connection refused")
        return f"largo_serve_requests_in_flight {value}\n"

    scaler = Autoscaler(
        kube=kube,  # type: ignore[arg-type]
        services={entry.key: [entry]},
        pods={entry.key: pods},
        clock=clock,
        scrape=scrape,
    )
    return scaler, kube, clock


def test_load_above_target_scales_up_with_the_reason_and_load_in_the_annotation() -> None:
    entry = _service(1)
    scaler, kube, clock = _autoscaler(entry, [_pod("chat-r0-node-0")], {"http://10.0.0.1:9400/metrics": 8.0})
    for _ in range(6):
        asyncio.run(scaler.tick())
        clock.now += 1
    (namespace, name, replicas, annotations) = kube.writes[0]
    assert (namespace, name, replicas) == ("ns", "chat", 4)  # 8 in flight / target 2
    note = json.loads(annotations[ANNOTATION_SCALING])
    assert note["to"] == 4
    assert note["metricValue"] == pytest.approx(8.0)
    assert "8.0" in note["reason"]


def test_steady_load_writes_nothing_and_a_conflict_is_left_to_the_next_period() -> None:
    entry = _service(4)
    scaler, kube, clock = _autoscaler(entry, [_pod("chat-r0-node-0")], {"http://10.0.0.1:9400/metrics": 8.0})
    for _ in range(5):
        asyncio.run(scaler.tick())
        clock.now += 1
    assert kube.writes == []
    scaler, kube, clock = _autoscaler(
        _service(1), [_pod("chat-r0-node-0")], {"http://10.0.0.1:9400/metrics": 8.0}
    )
    kube.conflict = True
    asyncio.run(scaler.tick())  # must not raise
    assert kube.writes == []


def test_a_silent_leader_counts_busy_and_never_causes_a_scale_down() -> None:
    entry = _service(3)
    pods = [
        _pod("chat-r0-node-0"),
        _pod("chat-r1-node-0", ip="10.0.0.2"),
        _pod("chat-r2-node-0", ip="10.0.0.3"),
    ]
    loads: dict[str, float | None] = {
        "http://10.0.0.1:9400/metrics": 0.0,
        "http://10.0.0.2:9400/metrics": None,
        "http://10.0.0.3:9400/metrics": None,
    }
    scaler, kube, clock = _autoscaler(entry, pods, loads)
    for _ in range(30):
        asyncio.run(scaler.tick())
        clock.now += 1
    # Two silent replicas at the target (2 each) = 4 in flight = 2 replicas at least: never below.
    assert all(replicas >= 2 for _, _, replicas, _ in kube.writes)


def _vllm_on_8080() -> InferenceServiceSpec:
    entry = service_entry(
        {
            "metadata": {"name": "v", "namespace": "ns"},
            "spec": {
                "model": {"claimName": "w"},
                "runtime": {"type": "vllm", "port": 8080},
                "resourcesPerNode": {"nvidia.com/gpu": 1},
            },
        }
    )
    assert entry.service is not None
    return entry.service.spec


def test_metrics_are_read_from_vllm_s_http_port() -> None:
    spec = _vllm_on_8080()
    assert metrics_url(_pod("v-r0-node-0"), spec) == "http://10.0.0.1:8080/metrics"
    assert metrics_url(_pod("v-r0-node-0", ip=None), spec) is None
    # An IPv6 cluster's pod IP: in brackets, or no scrape ever parses and the service never scales.
    assert metrics_url(_pod("v-r0-node-0", ip="fd00::5"), spec) == "http://[fd00::5]:8080/metrics"
    assert router_metrics_url(_pod("v-router-0", ip="fd00::6")) == "http://[fd00::6]:9400/metrics"


def test_each_leader_is_read_where_and_as_its_own_runtime_serves() -> None:
    """A rollout from largo to vLLM on port 8080: the old leaders still serve largo's names on
    `metrics`. Read as the spec says, they answered nothing, counted busy, and an idle service grew."""
    spec = _vllm_on_8080()
    old = _pod("v-r0-node-0", ip="10.0.0.1")
    old["metadata"]["labels"]["largo.dev/runtime"] = "largo"
    new = _pod("v-r1-node-0", ip="10.0.0.2")
    new["metadata"]["labels"]["largo.dev/runtime"] = "vllm"
    new["spec"] = {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": 8000}]}]}
    assert (runtime_of(old, spec), runtime_of(new, spec)) == (RuntimeType.LARGO, RuntimeType.VLLM)
    assert metrics_url(old, spec) == "http://10.0.0.1:9400/metrics"
    assert metrics_url(new, spec) == "http://10.0.0.2:8000/metrics"  # its own port, not the spec's next
    assert runtime_of(_pod("v-r2-node-0"), spec) is RuntimeType.VLLM  # unlabelled: the spec's


def test_requests_held_by_the_router_bring_a_service_back_from_zero() -> None:
    entry = _service(0, scaleToZero=True)
    router = _pod("chat-router-5d9f-x2k", ip="10.0.0.9")
    kube = FakeKube()
    clock = Clock()
    held = {"value": 0.0}
    scraped: list[str] = []

    async def scrape(url: str) -> str:
        scraped.append(url)
        return f"largo_router_requests_held {held['value']}\n"

    scaler = Autoscaler(
        kube=kube,  # type: ignore[arg-type]
        services={entry.key: [entry]},
        pods={entry.key: []},
        routers={entry.key: [router]},
        clock=clock,
        scrape=scrape,
    )
    asyncio.run(scaler.tick())
    assert kube.writes == []  # nothing held: it stays at zero
    assert scraped == ["http://10.0.0.9:9400/metrics"]
    held["value"] = 5.0  # target 2: five waiting requests want three replicas
    clock.now += 1
    asyncio.run(scaler.tick())
    ((_, _, replicas, annotations),) = kube.writes
    assert replicas == 3
    decision = json.loads(annotations[ANNOTATION_SCALING])
    # The second of five held requests against the second of none before it: the short window acts.
    assert decision["reason"] == "panic: load 5.0 over 1s needs 3 (ready 0)"
    assert decision["metricValue"] == 2.5


def test_routers_are_not_scraped_while_a_leader_serves() -> None:
    entry = _service(1)
    scraped: list[str] = []

    async def scrape(url: str) -> str:
        scraped.append(url)
        return "largo_serve_requests_in_flight 1\nlargo_router_requests_held 0\n"

    scaler = Autoscaler(
        kube=FakeKube(),  # type: ignore[arg-type]
        services={entry.key: [entry]},
        pods={entry.key: [_pod("chat-r0-node-0")]},
        routers={entry.key: [_pod("chat-router-a", ip="10.0.0.9")]},
        clock=Clock(),
        scrape=scrape,
    )
    asyncio.run(scaler.tick())
    assert scraped == ["http://10.0.0.1:9400/metrics"]


def test_a_service_an_hpa_also_targets_is_left_alone() -> None:
    """Two writers of spec.replicas would flap a service's GPU groups: the service says ScalingConflict,
    and the loop writes nothing while the HPA is there."""
    entry = _service(1)
    scaler, kube, clock = _autoscaler(entry, [_pod("chat-r0-node-0")], {"http://10.0.0.1:9400/metrics": 8.0})
    scaler.autoscalers = {entry.key: ["chat-hpa"]}
    for _ in range(6):
        asyncio.run(scaler.tick())
        clock.now += 1
    assert kube.writes == []
    scaler.autoscalers = {}
    for _ in range(6):
        asyncio.run(scaler.tick())
        clock.now += 1
    assert kube.writes
    assert {replicas for _, _, replicas, _ in kube.writes} == {4}  # (the fake never applies a write)


def test_a_value_written_out_of_bounds_is_kept_while_there_is_nothing_to_decide_on() -> None:
    entry = _service(9)  # maxReplicas 5: served clamped by the service's controller
    scaler, kube, clock = _autoscaler(entry, [_pod("chat-r0-node-0")], {"http://10.0.0.1:9400/metrics": None})
    scaler.pods = {}  # no ready leader: no sample at all
    for _ in range(5):
        asyncio.run(scaler.tick())
        clock.now += 1
    assert kube.writes == []


def test_series_that_add_up_to_infinity_are_no_load() -> None:
    """Each value finite, their sum not: the decision would overflow on it."""
    text = (
        "# TYPE largo_serve_requests_in_flight gauge\n"
        'largo_serve_requests_in_flight{engine="a"} 1e308\n'
        'largo_serve_requests_in_flight{engine="b"} 1e308\n'
    )
    value, _ = replica_load(text, ScalingMetric.IN_FLIGHT, RuntimeType.LARGO, 10.0, None)
    assert value is None


def test_a_scrape_reads_no_more_than_a_metrics_page() -> None:
    """A replica that answers /metrics with megabytes (a bug, or not a model server) is refused
    after the first MiB instead of being read and parsed on the operator's event loop."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from largo.controllers.autoscaler import SCRAPE_MAX_BYTES, http_scrape

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=LARGO_TEXT)

    async def huge(_: web.Request) -> web.Response:
        return web.Response(body=b"#" * (SCRAPE_MAX_BYTES + 1))

    async def scenario() -> tuple[str, BaseException | None]:
        app = web.Application()
        app.router.add_get("/metrics", page)
        app.router.add_get("/huge", huge)
        async with TestServer(app) as server:
            text = await http_scrape(str(server.make_url("/metrics")))
            try:
                await http_scrape(str(server.make_url("/huge")))
            except ValueError as error:
                return text, error
            return text, None

    text, refused = asyncio.run(scenario())
    assert text == LARGO_TEXT
    assert refused is not None


def test_a_leader_that_finished_requests_between_scrapes_is_sampled_as_having_served() -> None:
    """In flight 0 at every scrape, but the finished-requests counter moved: the sample says it served
    (so the policy does not take the service for idle)."""
    entry = _service(1, minReplicas=1, scaleToZero=True)
    totals = iter([5.0, 5.0, 6.0])
    scaler, _, clock = _autoscaler(entry, [_pod("chat-r0-node-0")], {})

    async def scrape(url: str) -> str:
        return f"largo_serve_requests_in_flight 0\nlargo_serve_requests_total {next(totals)}\n"

    scaler.scrape = scrape
    for _ in range(3):
        asyncio.run(scaler.tick())
        clock.now += 2
    samples = scaler._memory[entry.key].samples
    assert [(s.value, s.served) for s in samples] == [(0.0, False), (0.0, False), (0.0, True)]


def test_a_new_replica_without_a_rate_yet_does_not_scale_up() -> None:
    """Requests per second, 15 on one replica against a target of 10: the second replica comes up,
    and its first scrape has a counter but no rate yet (a rate needs two). It is not load at the
    target: the service stays at 2 (it went 2 -> 3, and back only after the scale-down delay)."""
    entry = service_entry(
        {
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u", "resourceVersion": "7"},
            "spec": {
                "model": {"claimName": "w"},
                "replicas": 2,
                "autoscaling": {"maxReplicas": 10, "target": 10, "metric": "requestsPerSecond"},
            },
        }
    )
    totals = {"http://10.0.0.1:9400/metrics": 0.0, "http://10.0.0.2:9400/metrics": 0.0}

    async def scrape(url: str) -> str:
        return f"largo_serve_requests_total {totals[url]}\n"

    scaler, kube, clock = _autoscaler(entry, [_pod("chat-r0-node-0")], {})
    scaler.scrape = scrape
    for _ in range(40):  # 80 s of 15 rps on one replica, the second still loading its model
        asyncio.run(scaler.tick())
        clock.now += 2
        totals["http://10.0.0.1:9400/metrics"] += 30
    assert kube.writes == []
    scaler.pods = {entry.key: [_pod("chat-r0-node-0"), _pod("chat-r1-node-0", ip="10.0.0.2")]}
    for _ in range(5):  # ready now: no rate at its first scrape, then 0 rps
        asyncio.run(scaler.tick())
        clock.now += 2
        totals["http://10.0.0.1:9400/metrics"] += 30
    assert kube.writes == []


def test_a_new_replica_that_does_not_answer_counts_busy_only_from_when_it_was_ready() -> None:
    """A silent replica counts at the target (it may be the busy one), but not over the seconds before
    it was ready: one just up and not answering yet does not read as a whole window at the target."""
    entry = _service(2, stableWindowSeconds=60)
    loads: dict[str, float | None] = {
        "http://10.0.0.1:9400/metrics": 3.0,
        "http://10.0.0.2:9400/metrics": None,
    }
    scaler, kube, clock = _autoscaler(entry, [_pod("chat-r0-node-0")], loads)
    for _ in range(40):
        asyncio.run(scaler.tick())
        clock.now += 2
    scaler.pods = {entry.key: [_pod("chat-r0-node-0"), _pod("chat-r1-node-0", ip="10.0.0.2")]}
    asyncio.run(scaler.tick())
    assert kube.writes == []  # 3 in flight + 2 for one second of 60 = 2 replicas at target 2
    for _ in range(40):  # still silent: from its ready second on, it counts busy, as before
        clock.now += 2
        asyncio.run(scaler.tick())
    assert {replicas for _, _, replicas, _ in kube.writes} == {3}  # (the fake never writes back)


@pytest.mark.parametrize("period", [2.0, 15.0])
def test_a_longer_sampling_period_reads_the_whole_load(period: float) -> None:
    """At 15 s (HPA's own sync period) a sample once went stale 10 s in: every period ended with
    seconds read as idle, the service read 2/3 of its load and never panicked."""
    entry = _service(1, maxReplicas=10, target=4, stableWindowSeconds=60)
    kube, clock = FakeKube(), Clock()
    clock.now += 0.37
    start = clock.now

    async def scrape(url: str) -> str:
        return f"largo_serve_requests_in_flight {0 if clock.now - start < 120 else 12}\n"

    services, pods = {entry.key: [entry]}, {entry.key: [_pod("chat-r0-node-0")]}
    scaler = Autoscaler(kube, services, pods, clock=clock, scrape=scrape, period=period)  # type: ignore[arg-type]
    for _ in range(int(400 / period)):
        asyncio.run(scaler.tick())
        clock.now += period
    replicas, annotations = kube.writes[-1][2], kube.writes[-1][3]
    assert (replicas, json.loads(annotations[ANNOTATION_SCALING])["metricValue"]) == (3, 12.0)
