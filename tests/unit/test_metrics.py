"""The operator's resource and workload series, computed from a snapshot of the indexes (no cluster)."""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import yaml
from largo.controllers.state import JobEntry, PodUsage, job_entry, service_entry
from largo.metrics import OperatorMetrics, Snapshot, node_gpus, resource_families
from largo.policy.conditions import parse_timestamp
from largo.sched.types import NodeInfo
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

GPU = "nvidia.com/gpu"


def _node(name: str, gpus: int = 8, **extra: Any) -> NodeInfo:
    return NodeInfo(name, {"cpu": 32_000, GPU: gpus, "pods": 110}, {}, (), **extra)


def _job(name: str, gpus: int, nodes: int, phase: str | None = None, **status: Any) -> JobEntry:
    body = {
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "uid": f"uid-{name}",
            "resourceVersion": "1",
            "creationTimestamp": "2027-01-15T08:00:00Z",
        },
        "spec": {"image": "i", "numNodes": nodes, "resourcesPerNode": {GPU: gpus}},
        "status": {"phase": phase, **status} if phase else status,
    }
    return job_entry(body)


def _series(snapshot: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()

    class Fixed:
        def collect(self) -> Any:
            return resource_families(snapshot)

    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_gpus_held_by_largo_by_others_and_free_per_node() -> None:
    running = _job("run", 4, 2, "Running", attempt=0, placement={"attempt": 0, "nodes": ["a", "b"]})
    snapshot = Snapshot(
        nodes=[_node("a"), _node("b"), _node("c")],
        pods=[
            # Rank 1 on b is admitted, not bound.
            ("a", PodUsage("p0", {GPU: 4}, ("team-a", "run"), 0, 0, owner="uid-run")),
            ("c", PodUsage("x", {GPU: 3})),  # not largo's
        ],
        jobs=[running],
    )
    per_node = node_gpus(snapshot)
    assert per_node["a"] == {"allocatable": 8, "largo": 4, "other": 0, "free": 4}
    assert per_node["b"] == {"allocatable": 8, "largo": 4, "other": 0, "free": 4}
    assert per_node["c"] == {"allocatable": 8, "largo": 0, "other": 3, "free": 5}
    series = _series(snapshot)
    assert series[("largo_node_gpus_allocated", (("node", "c"), ("owner", "other")))] == 3
    assert series[("largo_cluster_gpu_allocation_ratio", ())] == 11 / 24
    assert series[("largo_cluster_largest_gang_pods", (("gpus_per_pod", "4"),))] == 3  # 4 + 4 + 5 free
    assert series[("largo_cluster_largest_gang_pods", (("gpus_per_pod", "8"),))] == 0  # fragmented


def test_a_node_gone_from_the_index_has_no_row_and_holds_nothing() -> None:
    """Its pods are not collected yet: their GPUs on a node that no longer offers any made a row of 0
    allocatable and an allocation ratio of 2."""
    running = _job("run", 8, 2, "Running", attempt=0, placement={"attempt": 0, "nodes": ["a", "gone"]})
    snapshot = Snapshot(
        nodes=[_node("a")],
        pods=[
            ("a", PodUsage("p0", {GPU: 8}, ("team-a", "run"), 0, 0, owner="uid-run")),
            ("gone", PodUsage("p1", {GPU: 8}, ("team-a", "run"), 0, 1, owner="uid-run")),
        ],
        jobs=[running],
    )
    assert set(node_gpus(snapshot)) == {"a"}
    assert _series(snapshot)[("largo_cluster_gpu_allocation_ratio", ())] == 1.0


def test_a_node_held_whole_by_an_exclusive_gang_has_no_gpu_free() -> None:
    """exclusiveNodes: the scheduler counts the node's every GPU as used, bound pod or admitted rank;
    the series say what it will do, not 6 GPUs no gang will get."""
    admitted = _job("whole", 2, 2, "Starting", attempt=0, placement={"attempt": 0, "nodes": ["a", "b"]})
    body = {**admitted.body, "spec": {**admitted.body["spec"], "scheduling": {"exclusiveNodes": True}}}
    exclusive = job_entry(body)
    snapshot = Snapshot(
        nodes=[_node("a"), _node("b"), _node("c")],
        pods=[
            # Rank 1 not bound.
            ("a", PodUsage("p0", {GPU: 2}, ("team-a", "whole"), 0, 0, exclusive=True, owner="uid-whole")),
            ("c", PodUsage("x", {GPU: 3})),
        ],
        jobs=[exclusive],
    )
    per_node = node_gpus(snapshot)
    assert per_node["a"] == {"allocatable": 8, "largo": 8, "other": 0, "free": 0}
    assert per_node["b"] == {"allocatable": 8, "largo": 8, "other": 0, "free": 0}
    assert per_node["c"] == {"allocatable": 8, "largo": 0, "other": 3, "free": 5}


def test_stranded_gpus_are_the_free_ones_the_head_of_the_queue_cannot_use() -> None:
    head = _job("head", 8, 1, "Queued", queue={"position": 1, "reason": "InsufficientCapacity"})
    snapshot = Snapshot(
        nodes=[_node("a"), _node("b")],
        pods=[("a", PodUsage("x", {GPU: 2})), ("b", PodUsage("y", {GPU: 1}))],
        jobs=[head],
    )
    series = _series(snapshot)
    assert series[("largo_cluster_gpus_stranded", ())] == 13  # 6 + 7 free, none of it 8 in one place
    no_queue = _series(Snapshot(nodes=snapshot.nodes, pods=snapshot.pods, jobs=[]))
    assert no_queue[("largo_cluster_gpus_stranded", ())] == 0


def test_a_finished_rank_holds_no_gpus() -> None:
    """A rank in placement.succeededRanks has a Succeeded pod, gone from the pod index: the scheduler
    reserves nothing for it, and the series say so (they showed its GPUs held while the queue got them)."""
    placement = {"attempt": 0, "nodes": ["a", "b"], "succeededRanks": [1]}
    running = _job("run", 4, 2, "Running", attempt=0, placement=placement)
    rank_0 = PodUsage("p0", {GPU: 4}, ("team-a", "run"), 0, 0, owner="uid-run")
    snapshot = Snapshot(nodes=[_node("a"), _node("b")], pods=[("a", rank_0)], jobs=[running])
    per_node = node_gpus(snapshot)
    assert per_node["a"] == {"allocatable": 8, "largo": 4, "other": 0, "free": 4}
    assert per_node["b"] == {"allocatable": 8, "largo": 0, "other": 0, "free": 8}


def test_free_gpus_beside_a_taken_resource_the_head_needs_are_stranded() -> None:
    """The head needs an RDMA adapter besides its GPUs: a node whose only adapter is taken cannot take
    one of its pods, so its free GPUs are stranded, as the scheduler sees it."""
    head = _job("head", 4, 1, "Queued", queue={"position": 1, "reason": "InsufficientCapacity"})
    spec = {**head.body["spec"], "resourcesPerNode": {GPU: 4, "rdma/hca": 1}}
    head = job_entry({**head.body, "spec": spec})
    taken = PodUsage("p", {GPU: 4, "rdma/hca": 1, "pods": 1}, ("team-a", "other"), 0, 0)
    node = NodeInfo("a", {"cpu": 32_000, GPU: 8, "rdma/hca": 1, "pods": 110}, {}, ())
    snapshot = Snapshot(nodes=[node], pods=[("a", taken)], jobs=[head])
    assert _series(snapshot)[("largo_cluster_gpus_stranded", ())] == 4


def test_an_exclusive_head_strands_the_free_gpus_of_nodes_partly_in_use() -> None:
    """exclusiveNodes: a pod of the head needs a node with no GPU in use, so 7 free GPUs beside a used
    one are of no use to it."""
    head = _job("head", 2, 2, "Queued", queue={"position": 1, "reason": "InsufficientCapacity"})
    head = job_entry({**head.body, "spec": {**head.body["spec"], "scheduling": {"exclusiveNodes": True}}})
    snapshot = Snapshot(
        nodes=[_node("a"), _node("b"), _node("c")],
        pods=[("a", PodUsage("x", {GPU: 1})), ("b", PodUsage("y", {GPU: 1}))],
        jobs=[head],
    )
    assert _series(snapshot)[("largo_cluster_gpus_stranded", ())] == 14  # c is whole: its 8 are usable


def test_jobs_by_phase_and_gpus_by_namespace_and_queue() -> None:
    jobs = [
        _job("new", 8, 1),
        _job("queued", 8, 2, "Queued"),
        _job("run", 4, 2, "Running", attempt=0, placement={"attempt": 0, "nodes": ["a", "a"]}),
        _job("done", 8, 4, "Succeeded"),
    ]
    series = _series(Snapshot(nodes=[_node("a")], pods=[], jobs=jobs))
    assert series[("largo_trainjobs", (("phase", "New"),))] == 1
    assert series[("largo_trainjobs", (("phase", "Queued"),))] == 1
    assert series[("largo_trainjobs", (("phase", "Running"),))] == 1
    assert series[("largo_trainjobs", (("phase", "Succeeded"),))] == 1
    assert series[("largo_trainjobs", (("phase", "Failed"),))] == 0
    key = (("namespace", "team-a"), ("queue", "default"))
    assert series[("largo_queue_gpus", (*key, ("state", "requested")))] == 8 + 16 + 8
    assert series[("largo_queue_gpus", (*key, ("state", "allocated")))] == 8
    assert series[("largo_queue_gpus", (*key, ("state", "waiting")))] == 8 + 16
    assert series[("largo_queue_length", (("queue", "default"), ("reason", "")))] == 2


def test_waiting_jobs_are_counted_by_why_they_wait() -> None:
    """A job waiting for another's checkpoint directory waits by design: the stuck-queue alert
    leaves it out, so the length says why each job waits."""
    jobs = [
        _job("new", 8, 1),
        _job("full", 8, 2, "Queued", reason="InsufficientCapacity"),
        _job("behind", 8, 1, "Queued", reason="QueuedBehindHead"),
        _job("second-run", 8, 1, "Queued", reason="CheckpointInUse"),
        _job("also-second", 8, 1, "Queued", reason="CheckpointInUse"),
        # Queued again after its pods were refused: the summary shows the refusal, the queue why it waits.
        _job("refused-before", 8, 1, "Queued", reason="CreateRefused", queue={"reason": "CheckpointInUse"}),
        # Released after a failure: not waiting for admission until its back-off ends.
        _job("failed", 8, 1, "Queued", reason="PodFailed", nextAdmissionTime="2027-01-15T09:00:00Z"),
        _job("failed-before", 8, 1, "Queued", reason="PodFailed", nextAdmissionTime="2027-01-15T07:00:00Z"),
    ]
    now = parse_timestamp("2027-01-15T08:30:00Z")
    assert now is not None
    series = _series(Snapshot(nodes=[_node("a")], pods=[], jobs=jobs, now=now))
    lengths = {dict(key)["reason"]: n for (name, key), n in series.items() if name == "largo_queue_length"}
    assert lengths == {
        "": 1,
        "InsufficientCapacity": 1,
        "QueuedBehindHead": 1,
        "CheckpointInUse": 3,
        "BackOff": 1,
        "PodFailed": 1,
    }


def test_other_extended_resources_are_counted_like_gpus() -> None:
    snapshot = Snapshot(
        nodes=[
            NodeInfo("a", {GPU: 8, "rdma/hca": 1, "cpu": 8000}, {}, ()),
            NodeInfo("b", {GPU: 8, "rdma/hca": 1}, {}, ()),
        ],
        pods=[("a", PodUsage("p", {GPU: 4, "rdma/hca": 1}, ("team-a", "x"), 0, 0))],
        jobs=[],
    )
    series = _series(snapshot)
    assert (
        series[
            ("largo_node_extended_resource", (("node", "a"), ("resource", "rdma/hca"), ("state", "largo")))
        ]
        == 1
    )
    assert (
        series[("largo_node_extended_resource", (("node", "a"), ("resource", "rdma/hca"), ("state", "free")))]
        == 0
    )
    assert (
        series[("largo_node_extended_resource", (("node", "b"), ("resource", "rdma/hca"), ("state", "free")))]
        == 1
    )
    assert not any(labels and dict(labels).get("resource") == "cpu" for _, labels in series)


def test_the_age_of_each_running_job_s_newest_checkpoint() -> None:
    written = datetime.datetime(2027, 1, 15, 7, tzinfo=datetime.UTC)
    now = written.timestamp() + 900
    checkpointed = {"checkpointedAt": "2027-01-15T07:00:00Z", "step": 5}
    running = _job("llm", 8, 1, "Running", progress=checkpointed)
    queued = _job("later", 8, 1, "Queued", progress=checkpointed)  # holds no work at risk
    series = _series(Snapshot(nodes=[], pods=[], jobs=[running, queued], now=now))
    ages = {
        dict(labels)["trainjob"]: value
        for (name, labels), value in series.items()
        if name == "largo_trainjob_checkpoint_age_seconds"
    }
    assert ages == {"llm": 900}


def test_serving_groups_hold_gpus_and_services_are_counted_by_phase_and_replicas() -> None:
    service = service_entry(
        {
            "metadata": {"name": "chat", "namespace": "team-b", "uid": "u", "resourceVersion": "3"},
            "spec": {"model": {"claimName": "w"}, "nodesPerReplica": 2, "resourcesPerNode": {GPU: 8}},
            "status": {
                "phase": "Degraded",
                "desiredReplicas": 2,
                "replicas": 2,
                "readyReplicas": 1,
                "updatedReplicas": 2,
                # Group 0 is bound on a and b; group 1 is placed on c and d, its pods not bound yet.
                "groups": [
                    {"replica": 0, "revision": "r", "attempt": 0, "nodes": ["a", "b"]},
                    {"replica": 1, "revision": "r", "attempt": 0, "nodes": ["c", "d"]},
                    {"replica": 2, "revision": "r", "attempt": 0, "nodes": []},
                ],
            },
        }
    )
    snapshot = Snapshot(
        nodes=[_node(name) for name in "abcde"],
        pods=[
            ("a", PodUsage("p0", {GPU: 8}, ("team-b", "chat#r0"), 0, 0, owner="u")),
            ("b", PodUsage("p1", {GPU: 8}, ("team-b", "chat#r0"), 0, 1, owner="u")),
        ],
        jobs=[],
        services=[service],
    )
    held = {node: counts["largo"] for node, counts in node_gpus(snapshot).items()}
    assert held == {"a": 8, "b": 8, "c": 8, "d": 8, "e": 0}
    series = _series(snapshot)
    assert series[("largo_inferenceservices", (("phase", "Degraded"),))] == 1
    assert series[("largo_inferenceservices", (("phase", "Ready"),))] == 0  # there at 0, not vanished
    replicas = {
        state: series[
            (
                "largo_inferenceservice_replicas",
                (("namespace", "team-b"), ("service", "chat"), ("state", state)),
            )
        ]
        for state in ("desired", "existing", "ready", "updated")
    }
    assert replicas == {"desired": 2, "existing": 2, "ready": 1, "updated": 2}


def _serving(*groups: dict[str, Any], gpus: int = 8) -> Any:
    return service_entry(
        {
            "metadata": {"name": "chat", "namespace": "team-b", "uid": "u", "resourceVersion": "3"},
            "spec": {
                "model": {"claimName": "w"},
                "nodesPerReplica": 1,
                "resourcesPerNode": {GPU: gpus},
                "scheduling": {"queue": "serving"},
            },
            "status": {"phase": "Progressing", "groups": list(groups)},
        }
    )


def test_a_serving_group_at_the_head_of_the_queue_has_its_stranded_gpus_counted() -> None:
    """TrainJobs and serving groups wait in one queue: a group first in line is the head."""
    head = {"replica": 0, "revision": "r", "attempt": 0, "nodes": [], "queue": {"position": 1}}
    snapshot = Snapshot(
        nodes=[_node("a"), _node("b")],
        pods=[("a", PodUsage("x", {GPU: 4})), ("b", PodUsage("y", {GPU: 4}))],
        jobs=[_job("second", 4, 1, "Queued", queue={"position": 2})],
        services=[_serving(head)],
    )
    # 4 + 4 free GPUs, none of them 8 in one place for the group's one 8-GPU pod.
    assert _series(snapshot)[("largo_cluster_gpus_stranded", ())] == 8


def test_waiting_serving_groups_are_counted_in_their_queue() -> None:
    """A serving group that never fits holds the queue like a job: the stuck-queue alert must see it."""
    snapshot = Snapshot(
        nodes=[_node("a")],
        pods=[],
        jobs=[],
        services=[
            _serving(
                {"replica": 0, "revision": "r", "attempt": 0, "nodes": ["a"]},
                {"replica": 1, "attempt": 0, "nodes": [], "queue": {"reason": "Unschedulable"}},
                {"replica": 2, "revision": "r", "attempt": 0, "nodes": [], "retiring": True},
            )
        ],
    )
    series = _series(snapshot)
    key = (("namespace", "team-b"), ("queue", "serving"))
    assert series[("largo_queue_gpus", (*key, ("state", "requested")))] == 16
    assert series[("largo_queue_gpus", (*key, ("state", "allocated")))] == 8
    assert series[("largo_queue_gpus", (*key, ("state", "waiting")))] == 8
    assert series[("largo_queue_length", (("queue", "serving"), ("reason", "Unschedulable")))] == 1


def test_kopf_s_watch_restarts_are_counted_from_its_own_log_lines_which_are_then_dropped() -> None:
    import logging

    from largo.metrics import KOPF_WATCH_LOGGER, WatchRestartCounter

    counted: list[tuple[str, str]] = []
    logger = logging.getLogger(KOPF_WATCH_LOGGER)
    counter = WatchRestartCounter(
        lambda resource, reason: counted.append((resource, reason)), keep_debug=False
    )
    level = logger.level
    logger.addFilter(counter)
    logger.setLevel(logging.DEBUG)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    logger.addHandler(keep)
    try:
        logger.debug("Restarting the watch-stream for trainjobs.v1alpha1.largo.dev cluster-wide.")
        logger.debug("Watch-stream for pods.v1 in 'ml' is inactive, reconnecting.")
        logger.debug("Starting the watch-stream for pods.v1 cluster-wide.")
        logger.warning("Ignoring an unsupported event type: {}")
    finally:
        logger.removeHandler(keep)
        logger.removeFilter(counter)
        logger.setLevel(level)
    assert counted == [("trainjobs.v1alpha1.largo.dev", "expired"), ("pods.v1", "inactive")]
    assert seen == ["Ignoring an unsupported event type: {}"]  # debug lines dropped, warnings kept


def test_kopf_still_logs_its_watch_restarts_in_the_words_counted() -> None:
    import inspect

    from kopf._cogs.clients import watching

    source = inspect.getsource(watching)
    assert 'logger.debug(f"Restarting the watch-stream for {resource} {where}.")' in source
    assert 'logger.debug(f"Watch-stream for {resource} {where} is inactive, reconnecting.")' in source


def test_the_events_the_alerts_count_are_exported_at_zero_from_the_start() -> None:
    """A counter born at its first increment hides that increment from increase(): after an operator
    start or a failover, LargoQueueStuck would not see the first admission."""
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    text = generate_latest(registry).decode()
    samples = {
        (sample.labels["reason"], sample.labels["type"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "largo_events"
        for sample in family.samples
        if sample.name == "largo_events_total"
    }
    assert samples == {
        ("Admitted", "Normal"): 0.0,
        ("GroupAdmitted", "Normal"): 0.0,
        ("PodFailed", "Warning"): 0.0,
        ("NodeLost", "Warning"): 0.0,
        ("PodDeleted", "Warning"): 0.0,
        ("GroupRestarted", "Warning"): 0.0,
    }


def test_every_event_reason_an_alert_reads_is_among_them() -> None:
    rules = Path(__file__).parents[2] / "charts" / "largo" / "files" / "prometheus-rules.yaml"
    groups = yaml.safe_load(rules.read_text())["groups"]
    expressions = [rule["expr"] for group in groups for rule in group["rules"]]
    read = {
        reason
        for expression in expressions
        for match in re.finditer(r'largo_events_total\{reason=~"([^"]+)"', expression)
        for reason in match.group(1).split("|")
    }
    assert "GroupRestarted" in read
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    exported = {
        sample.labels["reason"]
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if family.name == "largo_events"
        for sample in family.samples
        if sample.name == "largo_events_total"
    }
    assert read <= exported


def test_a_serving_group_in_its_restart_back_off_still_waits_in_its_queue() -> None:
    """A group whose back-off (restartAfter) has not ended wants its GPUs as a TrainJob in its back-off
    does: requested and waiting, BackOff in the queue's length (it was in no state at all)."""
    now = parse_timestamp("2027-01-15T08:30:00Z")
    after = "2027-01-15T09:00:00Z"
    backing_off = {"replica": 1, "revision": "r", "attempt": 2, "nodes": [], "restartAfter": after}
    placed = {"replica": 0, "revision": "r", "attempt": 0, "nodes": ["a"]}
    services = [_serving(placed, backing_off)]
    snapshot = Snapshot(nodes=[_node("a"), _node("b")], pods=[], jobs=[], now=now, services=services)
    series = _series(snapshot)
    key = (("namespace", "team-b"), ("queue", "serving"))
    assert series[("largo_queue_gpus", (*key, ("state", "requested")))] == 16
    assert series[("largo_queue_gpus", (*key, ("state", "waiting")))] == 8
    assert series[("largo_queue_length", (("queue", "serving"), ("reason", "BackOff")))] == 1


def test_the_operator_s_metrics_page_answers_on_ipv4_and_on_ipv6() -> None:
    """Prometheus scrapes the operator pod's IP, an IPv6 one in an IPv6 cluster."""
    import socket
    import urllib.request

    from largo.metrics import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve(port, lambda: Snapshot(nodes=[_node("a")], pods=[], jobs=[]))
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        hosts = ["127.0.0.1", "[::1]"]
    except OSError:  # no IPv6 here
        hosts = ["127.0.0.1"]
    for host in hosts:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as page:
            assert b'largo_node_gpus_allocatable{node="a"} 8.0' in page.read()


def test_no_resource_series_before_the_indexes_hold_the_first_listing() -> None:
    """A restarted operator's empty indexes said: every GPU free, no job, at each start."""
    from largo.metrics import ResourceCollector

    registry = CollectorRegistry()
    registry.register(ResourceCollector(lambda: None))
    assert "largo_node_gpus_allocatable" not in generate_latest(registry).decode()
    filled = CollectorRegistry()
    filled.register(ResourceCollector(lambda: Snapshot(nodes=[_node("a")], pods=[], jobs=[])))
    assert 'largo_node_gpus_allocatable{node="a"} 8.0' in generate_latest(filled).decode()
