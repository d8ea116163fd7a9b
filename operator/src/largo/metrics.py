"""The operator's Prometheus metrics (docs/observability.md).

Resource and workload series are computed from kopf's indexes at scrape time by a custom collector,
so there is no second copy of the state to drift; the operator's own timings and counts are ordinary
prometheus-client instruments updated where they happen. Labels are bounded: nodes, namespaces,
queues, phases and reasons, never a pod.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from largo.api.v1alpha1 import GPU_RESOURCE, Phase, ServicePhase
from largo.controllers.state import BoundRanks, JobEntry, PodUsage, ServiceEntry, bound_rank, is_bound
from largo.policy.conditions import parse_timestamp
from largo.runtime.metrics import serve as serve_metrics
from largo.sched import gang
from largo.sched.inventory import POD_SLOTS, free_by_node
from largo.sched.types import GangRequest, NodeInfo

GPU = GPU_RESOURCE
# The gang shapes fragmentation is reported for: pods of this many GPUs.
GANG_SHAPES = (1, 2, 4, 8)
_QUEUE_STATES = ("requested", "allocated", "waiting")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the indexes hold at one scrape."""

    nodes: Sequence[NodeInfo]
    pods: Sequence[tuple[str, PodUsage]]  # (node, a bound pod that holds resources)
    jobs: Sequence[JobEntry]
    now: float = 0.0  # epoch seconds of the scrape
    services: Sequence[ServiceEntry] = ()


def _job_gpus(entry: JobEntry) -> int:
    request = entry.request
    return request.per_pod.get(GPU, 0) * request.pod_count if request is not None else 0


def _slot() -> dict[str, int]:
    return {"allocatable": 0, "largo": 0, "other": 0}


def node_gpus(snapshot: Snapshot) -> dict[str, dict[str, int]]:
    """Per node: GPUs allocatable, allocated by largo (bound gang pods and admitted ranks not bound
    yet), allocated by anything else, and free."""
    return node_resource(snapshot, GPU)


def node_resource(snapshot: Snapshot, resource: str) -> dict[str, dict[str, int]]:
    """``node_gpus`` for any resource the scheduler counts (an RDMA adapter, for one)."""
    by_node: dict[str, dict[str, int]] = {}
    for node in snapshot.nodes:
        by_node[node.name] = {**_slot(), "allocatable": node.allocatable.get(resource, 0)}
    bound: BoundRanks = set()
    # Nodes a gang with exclusiveNodes holds whole: the scheduler counts all their GPUs as used.
    whole: set[str] = set()
    for node_name, pod in snapshot.pods:
        owner = "largo" if pod.job is not None else "other"
        by_node.setdefault(node_name, _slot())[owner] += pod.requests.get(resource, 0)
        bound_rank(bound, pod)
        if pod.exclusive:
            whole.add(node_name)
    for entry in snapshot.jobs:
        if not entry.active or entry.placement is None:
            continue
        for rank, node_name in enumerate(entry.placement):
            # A finished rank's pod holds nothing (the scheduler reserves nothing for it either).
            if rank in entry.succeeded_ranks:
                continue
            if not is_bound(bound, entry.key, entry.uid, entry.attempt, rank):
                by_node.setdefault(node_name, _slot())["largo"] += entry.per_pod.get(resource, 0)
                if entry.request is not None and entry.request.exclusive:
                    whole.add(node_name)
    for service in snapshot.services:
        for group in service.placed():
            for member, node_name in enumerate(group.nodes):
                if not is_bound(bound, group.gang(*service.key), service.uid, group.attempt, member):
                    by_node.setdefault(node_name, _slot())["largo"] += service.per_pod.get(resource, 0)
                    if service.exclusive:
                        whole.add(node_name)
    if resource in (GPU, POD_SLOTS):  # what an exclusive pod holds whole (Scheduler.usage)
        for node_name in whole:
            counts = by_node.setdefault(node_name, _slot())
            counts["largo"] = max(counts["largo"], counts["allocatable"] - counts["other"])
    for counts in by_node.values():
        counts["free"] = max(0, counts["allocatable"] - counts["largo"] - counts["other"])
    # A node gone from the index, whose pods are not collected yet, offers nothing and holds nothing:
    # counted, it made a row of 0 allocatable and pushed the allocation ratio past 1.
    known = {node.name for node in snapshot.nodes}
    return {name: counts for name, counts in by_node.items() if name in known}


def resource_families(snapshot: Snapshot) -> list[Metric]:
    """Every resource and workload series for one snapshot (pure)."""
    per_node = node_gpus(snapshot)
    return [
        *_gpu_families(per_node),
        _extended_family(snapshot),
        *_fragmentation(snapshot, per_node),
        *_workload_families(snapshot),
        _checkpoint_family(snapshot),
        *_service_families(snapshot.services),
    ]


def services_by_phase(services: Iterable[ServiceEntry]) -> dict[str, int]:
    """Every phase (and New) with its count, 0 included, as ``jobs_by_phase``: a series that vanished at
    0 read as no data, not as none."""
    counts: dict[str, int] = {**{str(phase): 0 for phase in ServicePhase}, "New": 0}
    for entry in services:
        phase = str((entry.body.get("status") or {}).get("phase") or "New")
        counts[phase] = counts.get(phase, 0) + 1
    return counts


def _service_families(services: Sequence[ServiceEntry]) -> list[Metric]:
    phases = GaugeMetricFamily(
        "largo_inferenceservices", "InferenceServices by phase (New: not decided yet).", labels=["phase"]
    )
    for phase, count in sorted(services_by_phase(services).items()):
        phases.add_metric([phase], count)
    replicas = GaugeMetricFamily(
        "largo_inferenceservice_replicas",
        "Replica groups of a service: desired (spec.replicas within the bounds), existing, ready, and at "
        "the current revision (updated).",
        labels=["namespace", "service", "state"],
    )
    for entry in sorted(services, key=lambda e: e.key):
        status = entry.body.get("status") or {}
        for state, field in (
            ("desired", "desiredReplicas"),
            ("existing", "replicas"),
            ("ready", "readyReplicas"),
            ("updated", "updatedReplicas"),
        ):
            value = status.get(field)
            if isinstance(value, int):
                replicas.add_metric([entry.key[0], entry.key[1], state], value)
    return [phases, replicas]


def checkpoint_ages(jobs: Iterable[JobEntry], now: float) -> dict[tuple[str, str], float]:
    """Per running job that reported a checkpoint: seconds since it was written (the work a failure
    would lose now)."""
    ages = {}
    for entry in jobs:
        if entry.phase != Phase.RUNNING:
            continue
        progress = (entry.body.get("status") or {}).get("progress") or {}
        written = parse_timestamp(progress.get("checkpointedAt"))
        if written is not None:
            ages[entry.key] = max(0.0, now - written)
    return ages


def _checkpoint_family(snapshot: Snapshot) -> Metric:
    family = GaugeMetricFamily(
        "largo_trainjob_checkpoint_age_seconds",
        "Seconds since a running job's newest complete checkpoint: the work a failure would lose.",
        labels=["namespace", "trainjob"],
    )
    for (namespace, name), age in sorted(checkpoint_ages(snapshot.jobs, snapshot.now).items()):
        family.add_metric([namespace, name], age)
    return family


def extended_resources(nodes: Iterable[NodeInfo]) -> list[str]:
    """Extended resources the nodes offer besides GPUs (vendor-domain names such as rdma/hca)."""
    names = {name for node in nodes for name in node.allocatable if "/" in name and name != GPU}
    return sorted(names)


def _extended_family(snapshot: Snapshot) -> Metric:
    family = GaugeMetricFamily(
        "largo_node_extended_resource",
        "Other extended resources (an RDMA adapter, for one), counted like GPUs: allocatable, held by "
        "largo's gangs, held by other pods, free.",
        labels=["node", "resource", "state"],
    )
    for resource in extended_resources(snapshot.nodes):
        for name, counts in sorted(node_resource(snapshot, resource).items()):
            for state in ("allocatable", "largo", "other", "free"):
                family.add_metric([name, resource, state], counts[state])
    return family


def _gpu_families(per_node: Mapping[str, Mapping[str, int]]) -> list[Metric]:
    allocatable = GaugeMetricFamily("largo_node_gpus_allocatable", "GPUs the node offers.", labels=["node"])
    allocated = GaugeMetricFamily(
        "largo_node_gpus_allocated",
        "GPUs held on the node, by largo's gangs (bound or admitted) or by other pods.",
        labels=["node", "owner"],
    )
    free = GaugeMetricFamily("largo_node_gpus_free", "GPUs nobody holds on the node.", labels=["node"])
    for name, counts in sorted(per_node.items()):
        allocatable.add_metric([name], counts["allocatable"])
        allocated.add_metric([name, "largo"], counts["largo"])
        allocated.add_metric([name, "other"], counts["other"])
        free.add_metric([name], counts["free"])
    total = sum(counts["allocatable"] for counts in per_node.values())
    held = sum(counts["largo"] + counts["other"] for counts in per_node.values())
    ratio = GaugeMetricFamily(
        "largo_cluster_gpu_allocation_ratio", "Held GPUs / allocatable GPUs over all nodes (0 without GPUs)."
    )
    ratio.add_metric([], held / total if total else 0.0)
    return [allocatable, allocated, free, ratio]


def largest_gangs(snapshot: Snapshot, per_node: Mapping[str, Mapping[str, int]]) -> dict[int, int]:
    """Per gang shape (GPUs per pod): how many such pods would fit on the free GPUs now."""
    usable = [node for node in snapshot.nodes if node.usable]
    free = {node.name: {GPU: per_node.get(node.name, _slot()).get("free", 0)} for node in usable}
    return {shape: gang.largest_gang(usable, free, shape) for shape in GANG_SHAPES}


def stranded(snapshot: Snapshot, per_node: Mapping[str, Mapping[str, int]]) -> int:
    """Free GPUs the head of the queue cannot use; 0 with no queue."""
    head = _head(snapshot)
    if head is None:
        return 0
    # Every resource the head asks for, as the scheduler counts it: a node whose RDMA adapter or pod
    # slots are taken strands its free GPUs for a head that needs one.
    usage = _usage(per_node)
    for resource in head.per_pod.keys() - {GPU}:
        for name, counts in node_resource(snapshot, resource).items():
            usage.setdefault(name, {})[resource] = counts["largo"] + counts["other"]
    return gang.stranded_gpus(snapshot.nodes, free_by_node(snapshot.nodes, usage), head)


def jobs_by_phase(jobs: Sequence[JobEntry]) -> dict[str, int]:
    """Every phase (and New: not decided yet) with its count of jobs."""
    by_phase: dict[str, int] = {str(phase): 0 for phase in Phase}
    by_phase["New"] = 0
    for entry in jobs:
        phase = str(entry.phase) if entry.phase else "New"
        by_phase[phase] = by_phase.get(phase, 0) + 1
    return by_phase


def queue_gpus(snapshot: Snapshot) -> dict[tuple[str, str], dict[str, int]]:
    """Per (namespace, queue): GPUs requested by unfinished jobs and serving groups, allocated, waiting;
    and ``jobs``: the jobs and serving groups waiting for admission."""
    out: dict[tuple[str, str], dict[str, int]] = {}

    def states(namespace: str, queue: str) -> dict[str, int]:
        return out.setdefault((namespace, queue), dict.fromkeys((*_QUEUE_STATES, "jobs"), 0))

    for entry in snapshot.jobs:
        if entry.job is None or entry.phase in (Phase.SUCCEEDED, Phase.FAILED):
            continue
        counts = states(entry.key[0], entry.queue_name)
        counts["requested"] += _job_gpus(entry)
        if entry.active:
            counts["allocated"] += _job_gpus(entry)
        if counted_waiting(entry):
            counts["waiting"] += _job_gpus(entry)
            counts["jobs"] += 1
    # Serving groups wait in the same queue as TrainJobs (controllers/scheduler.py): left out, a group
    # that never fits would hold the queue with nothing shown waiting.
    for service in snapshot.services:
        if service.service is None:
            continue
        gpus = service.per_pod.get(GPU, 0) * service.service.spec.nodes_per_replica
        counts = states(service.key[0], service.service.spec.scheduling.queue)
        # A group in its restart back-off waits too, as a TrainJob in its back-off does.
        waiting = service.unplaced()
        for group in service.groups:
            if group.nodes:
                counts["requested"] += gpus
                counts["allocated"] += gpus
            elif group in waiting:
                counts["requested"] += gpus
                counts["waiting"] += gpus
                counts["jobs"] += 1
    return out


def counted_waiting(entry: JobEntry) -> bool:
    """A job counted as waiting for admission (``queue_gpus``, ``largo_queue_length``)."""
    return entry.job is not None and entry.phase not in (Phase.SUCCEEDED, Phase.FAILED) and entry.admissible


def _fragmentation(snapshot: Snapshot, per_node: Mapping[str, Mapping[str, int]]) -> list[Metric]:
    largest = GaugeMetricFamily(
        "largo_cluster_largest_gang_pods",
        "Pods of gpus_per_pod GPUs that would fit on the free GPUs now.",
        labels=["gpus_per_pod"],
    )
    for shape, pods in largest_gangs(snapshot, per_node).items():
        largest.add_metric([str(shape)], pods)
    lost = GaugeMetricFamily(
        "largo_cluster_gpus_stranded",
        "Free GPUs the head of the queue cannot use (wrong nodes, or too few in one place); 0 with no queue.",
    )
    lost.add_metric([], stranded(snapshot, per_node))
    return [largest, lost]


def _workload_families(snapshot: Snapshot) -> list[Metric]:
    phases = GaugeMetricFamily(
        "largo_trainjobs", "TrainJobs by phase (New: not decided yet).", labels=["phase"]
    )
    for phase, count in sorted(jobs_by_phase(snapshot.jobs).items()):
        phases.add_metric([phase], count)
    gpus = GaugeMetricFamily(
        "largo_queue_gpus",
        "GPUs of a namespace's jobs and serving groups in a queue: requested by every unfinished one, "
        "allocated to admitted ones, waiting for admission.",
        labels=["namespace", "queue", "state"],
    )
    length = GaugeMetricFamily(
        "largo_queue_length",
        "Jobs and InferenceService replica groups waiting for admission, by why (their status.queue.reason: "
        "InsufficientCapacity, QueuedBehindHead, Unschedulable, CheckpointInUse, ...; empty for one not "
        "looked at yet; BackOff for a restarting TrainJob or replica group whose back-off has not ended).",
        labels=["queue", "reason"],
    )
    lengths: dict[tuple[str, str], int] = {}
    for (namespace, queue), states in sorted(queue_gpus(snapshot).items()):
        for state in _QUEUE_STATES:
            gpus.add_metric([namespace, queue, state], states[state])
        lengths.setdefault((queue, ""), 0)
    for entry in snapshot.jobs:
        if counted_waiting(entry):
            # Why the scheduler left it waiting (status.queue.reason); the summarised status.reason
            # may show another condition's (a refusal of an earlier attempt's pods).
            summary = (entry.body.get("status") or {}).get("reason")
            reason = str(entry.queue.get("reason") or summary or "") if entry.phase else ""
            if not entry.due(snapshot.now):
                reason = BACK_OFF  # a released gang the scheduler leaves be until its back-off ends
            lengths[entry.queue_name, reason] = lengths.get((entry.queue_name, reason), 0) + 1
    for service in snapshot.services:
        for group in service.waiting(snapshot.now):
            assert service.service is not None  # waiting() is empty without a valid spec
            queue, reason = service.service.spec.scheduling.queue, str(group.queue.get("reason") or "")
            lengths[queue, reason] = lengths.get((queue, reason), 0) + 1
        if backing_off := len(service.backing_off(snapshot.now)):
            assert service.service is not None  # backing_off() is empty without a valid spec
            queue = service.service.spec.scheduling.queue
            lengths[queue, BACK_OFF] = lengths.get((queue, BACK_OFF), 0) + backing_off
    for (queue, reason), count in sorted(lengths.items()):
        length.add_metric([queue, reason], count)
    return [phases, gpus, length]


# largo_queue_length's reason for a job in its restart back-off (status.nextAdmissionTime to come).
BACK_OFF = "BackOff"


def _usage(per_node: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    return {name: {GPU: counts["largo"] + counts["other"]} for name, counts in per_node.items()}


def _head(snapshot: Snapshot) -> GangRequest | None:
    """The request of the gang the scheduler last named the head of the queue (position 1): a TrainJob
    or an InferenceService's replica group, which wait in one queue (controllers/scheduler.py)."""
    for entry in snapshot.jobs:
        if entry.admissible and entry.request is not None and entry.queue.get("position") == 1:
            return entry.request
    for service in snapshot.services:
        for group in service.waiting(snapshot.now):
            if group.queue.get("position") == 1:
                return service.request(group)  # what the scheduler asks for it
    return None


class ResourceCollector(Collector):
    """Reads a snapshot of the indexes at each scrape; none (no series) before they are filled."""

    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot()
        if snapshot is not None:
            yield from resource_families(snapshot)


# The events the alerts count (charts/largo/files/prometheus-rules.yaml).
_ALERTED_EVENTS = (
    ("Admitted", "Normal"),
    ("GroupAdmitted", "Normal"),
    ("PodFailed", "Warning"),
    ("NodeLost", "Warning"),
    ("PodDeleted", "Warning"),
    ("GroupRestarted", "Warning"),
)


class OperatorMetrics:
    """The operator's own instruments, on their own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reconcile_seconds = Histogram(
            "largo_reconcile_duration_seconds",
            "Time of one TrainJob reconcile.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "largo_reconcile_errors_total",
            "Reconciles that failed and were retried with back-off, by kind.",
            ["kind"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "largo_workqueue_depth", "Job keys waiting for a reconcile.", registry=registry
        )
        self.pass_seconds = Histogram(
            "largo_scheduler_pass_duration_seconds",
            "Time of one gang scheduling pass.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.pass_jobs = Gauge(
            "largo_scheduler_pass_jobs", "Jobs the last scheduling pass decided on.", registry=registry
        )
        self.queue_wait = Histogram(
            "largo_queue_wait_seconds",
            "From a job's creation to its first admission.",
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
            registry=registry,
        )
        self.events = Counter(
            "largo_events_total",
            "Events largo posted, by reason and type: its decisions (admissions, restarts, refusals).",
            ["reason", "type"],
            registry=registry,
        )
        # At 0 from the start: a counter born at its first increment hides that increment from
        # increase(), and the alerts read these (an operator start or a failover makes new series).
        for reason, type_ in _ALERTED_EVENTS:
            self.events.labels(reason, type_)
        self.queue_latency = Histogram(
            "largo_workqueue_wait_seconds",
            "How long a job key waited in the work queue before a worker took it.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
            registry=registry,
        )
        self.gang_start = Histogram(
            "largo_gang_start_seconds",
            "From a gang's admission to all its pods Running (creation, binding and container start).",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=registry,
        )
        self.autoscaler_decisions = Counter(
            "largo_autoscaler_decisions_total",
            "Changes of an InferenceService's replicas written by the autoscaler, by direction (up, down).",
            ["direction"],
            registry=registry,
        )
        self.leader = Gauge(
            "largo_leader", "1 while this replica holds the Lease and acts, else 0.", registry=registry
        )
        self.watch_restarts = Counter(
            "largo_operator_watch_restarts_total",
            "Restarts of the operator's watch-streams, by resource and reason: expired (410 Gone, the "
            "resource version too old: listed again) or inactive (no event, not even a bookmark, "
            "within LARGO_WATCH_INACTIVITY_SECONDS: reconnected).",
            ["resource", "reason"],
            registry=registry,
        )

    def observe_pass(self, seconds: float, decided: int) -> None:
        self.pass_seconds.observe(seconds)
        self.pass_jobs.set(decided)

    def count_event(self, reason: str, type_: str) -> None:
        self.events.labels(reason, type_).inc()

    def count_failure(self, kind: str) -> None:
        self.reconcile_errors.labels(kind).inc()


# kopf has no hook for its watch-streams' restarts; it logs each at debug level, from this logger, in
# these words (kopf is pinned; tests/unit/test_metrics.py checks the words against kopf's source).
KOPF_WATCH_LOGGER = "kopf._cogs.clients.watching"
_WATCH_RESTART = re.compile(
    r"^(?:Restarting the watch-stream for (?P<expired>\S+) "
    r"|Watch-stream for (?P<inactive>\S+) .*is inactive, reconnecting\.$)"
)


class WatchRestartCounter(logging.Filter):
    """Counts kopf's watch-stream restarts off its debug lines, then drops those lines unless the
    operator logs at debug level anyway (raising that logger's level is what makes kopf write them)."""

    def __init__(self, count: Callable[[str, str], None], keep_debug: bool) -> None:
        super().__init__()
        self.count = count
        self.keep_debug = keep_debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        match = _WATCH_RESTART.match(record.getMessage())
        if match is not None:
            reason = "expired" if match.group("expired") else "inactive"
            self.count(match.group(reason), reason)
        return self.keep_debug


def on_watch_restarts(count: Callable[[str, str], None]) -> WatchRestartCounter:
    """Installs the counter on kopf's watching logger; ``count(resource, reason)`` per restart (the
    operator's metric, and its index check after an expired watch)."""
    logger = logging.getLogger(KOPF_WATCH_LOGGER)
    counter = WatchRestartCounter(count, keep_debug=logger.isEnabledFor(logging.DEBUG))
    logger.setLevel(logging.DEBUG)
    logger.addFilter(counter)
    return counter


def serve(port: int, snapshot: Callable[[], Snapshot | None]) -> OperatorMetrics:
    """Starts /metrics on ``port`` with the resource collector and the operator's instruments."""
    registry = CollectorRegistry()
    registry.register(ResourceCollector(snapshot))
    metrics = OperatorMetrics(registry)
    serve_metrics(port, registry)  # on IPv6's and IPv4's addresses: Prometheus scrapes the pod's IP
    return metrics
