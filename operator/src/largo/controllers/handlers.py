"""kopf registrations. Thin on purpose: indexes summarise objects, event handlers only wake work.

- indexes over Nodes, Pods, TrainJobs and InferenceServices feed the gang scheduler's inventory;
- every TrainJob or TrainJob-pod event enqueues that job for one level-triggered reconcile, and every
  InferenceService event (its pods, its TrainJob, its claim, an autoscaler aimed at it) that service;
- changes that free or take capacity wake the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from largo.api.v1alpha1 import GROUP, PLURAL, SERVICE_KIND, SERVICE_PLURAL, VERSION, Phase
from largo.controllers import freshness
from largo.controllers.autoscaler import Autoscaler
from largo.controllers.inferenceservice import InferenceServiceReconciler
from largo.controllers.kube import COMPONENT, Kube
from largo.controllers.leader import (
    LeaderGate,
    identity,
    lease_api,
    release_lease,
    start_election,
    supervise,
)
from largo.controllers.scheduler import Scheduler
from largo.controllers.settings import OperatorSettings
from largo.controllers.state import JobKey, job_entry, pod_usage, service_entry
from largo.controllers.trainjob import TrainJobReconciler
from largo.controllers.workqueue import WorkQueue
from largo.manifests.names import (
    LABEL_JOB_NAME,
    LABEL_PROGRESS_OF,
    LABEL_ROUTER,
    LABEL_SERVICE,
    progress_configmap,
)
from largo.metrics import Snapshot, on_watch_restarts
from largo.metrics import serve as serve_metrics
from largo.sched import inventory

logger = logging.getLogger(__name__)


class NoDiffBase(kopf.DiffBaseStorage):
    """No last-handled state: largo registers no create/update/resume handlers, only event handlers,
    indexes and its own loops, so kopf never compares an object with its previous essence. The default
    storage deep-copies every pod, node and job on every event to build one: the operator's main CPU
    cost at scale, for nothing."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's watches authenticate exactly as largo's own client does (``Kube.from_environment``): the
    kubernetes client's loader, in-cluster first, then KUBECONFIG. One way of loading credentials."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    # Checked by ``largo operator`` before kopf started (controllers/main.py); defaults otherwise.
    largo: OperatorSettings = memo.get("settings") or OperatorSettings()
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    # largo posts its own events with reasons; kopf's per-handler log events would only add noise.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # A stream with no event, not even the API server's bookmark (about one a minute), is dead: kopf
    # reconnects it after this long (its default, 70 s, unless set).
    settings.watching.inactivity_timeout = largo.watch_inactivity_seconds
    settings.networking.connect_timeout = 10

    # Every API call runs in a worker thread: enough of them for the reconcile workers and the
    # scheduler's parallel writes.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=32))
    election = largo.leader_election
    election_timings = largo.election_timings()
    holder = identity()
    gate = LeaderGate(renew_deadline=election_timings.renew_deadline) if election else LeaderGate()
    kube = Kube.from_environment(gate, field_manager=holder if election else COMPONENT)
    jobs: WorkQueue[JobKey] = WorkQueue(
        base_delay=largo.retry_base_seconds,
        max_delay=largo.retry_max_seconds,
    )

    services: WorkQueue[JobKey] = WorkQueue(
        base_delay=largo.retry_base_seconds,
        max_delay=largo.retry_max_seconds,
    )

    def admitted(key: JobKey, body: Mapping[str, Any]) -> None:
        reconciler.hint(key, body)
        jobs.add(key)

    def group_admitted(key: JobKey, body: Mapping[str, Any]) -> None:
        serving.hint(key, body)
        services.add(key)

    scheduler = Scheduler(
        kube=kube,
        nodes=kwargs["node_inventory"],
        pods=kwargs["pod_inventory"],
        jobs=kwargs["trainjob_queue"],
        admitted=admitted,
        clock=time.time,
        services=kwargs["service_queue"],
        service_admitted=group_admitted,
    )
    serving = InferenceServiceReconciler(
        kube=kube,
        nodes=kwargs["node_inventory"],
        services=kwargs["service_queue"],
        pods=kwargs["service_pods"],
        trainjobs=kwargs["trainjob_queue"],
        claims=kwargs["claim_names"],
        autoscalers=kwargs["service_autoscalers"],
        wake_scheduler=scheduler.wake,
        clock=time.time,
        default_image=largo.server_image,
        router_image=largo.router_image,
        binding_timeout=largo.binding_timeout_seconds,
        node_lost_after=largo.node_lost_seconds,
    )
    reconciler = TrainJobReconciler(
        kube=kube,
        nodes=kwargs["node_inventory"],
        jobs=kwargs["trainjob_queue"],
        pods=kwargs["trainjob_pods"],
        reports=kwargs["progress_reports"],
        wake_scheduler=scheduler.wake,
        clock=time.time,
        timings=largo.timings(),
    )
    scheduler.complete_admission = reconciler.complete_admission
    autoscaler = Autoscaler(
        kube=kube,
        services=kwargs["service_queue"],
        pods=kwargs["service_pods"],
        routers=kwargs["service_routers"],
        autoscalers=kwargs["service_autoscalers"],
        clock=time.time,
        period=largo.autoscale_period_seconds,
    )
    workers = largo.reconcile_workers
    memo.jobs = jobs
    memo.services = services
    memo.serving = serving
    memo.scheduler = scheduler
    memo.tasks = []
    reconcile = reconciler.reconcile
    metrics_port = largo.metrics_port

    def snapshot() -> Snapshot | None:
        # Until the indexes hold the first listing, they tell nothing: no series rather than a cluster
        # of free GPUs and no jobs (a dip in every graph at each start).
        indexed = memo.get("indexed")
        if indexed is None or not indexed.is_set():
            return None
        # Scrapes run in prometheus-client's thread; the indexes change on the event loop, so the
        # snapshot is taken there.
        return asyncio.run_coroutine_threadsafe(_snapshot(kwargs), loop).result(timeout=10)

    metrics = serve_metrics(metrics_port, snapshot) if metrics_port else None
    if metrics is not None:
        kube.on_event = metrics.count_event
        jobs.on_failure = metrics.count_failure
        services.on_failure = metrics.count_failure
        # A standby queues keys it does not work on: its depth would only grow and alarm.
        metrics.queue_depth.set_function(lambda: len(jobs) if gate.leading() else 0)
        scheduler.observe_pass = metrics.observe_pass
        scheduler.observe_admission = metrics.queue_wait.observe
        jobs.on_wait = metrics.queue_latency.observe
        reconciler.observe_start = metrics.gang_start.observe
        autoscaler.observe_decision = lambda direction: metrics.autoscaler_decisions.labels(direction).inc()

        async def reconcile(key: JobKey) -> float | None:
            with metrics.reconcile_seconds.time():
                return await reconciler.reconcile(key)

    memo.indexed = indexed = asyncio.Event()
    # Indexes kept by a standby that was cut off for long, or by a leader whose watch expired, may
    # hold objects long gone (freshness.py).
    memo.index_checks = index_checks = freshness.Rechecks(
        lambda: freshness.verify(
            lambda: freshness.indexed(kwargs),
            kube.list_identities,
            stale_indexes,
            settle=largo.watch_inactivity_seconds + freshness.SETTLE_MARGIN_SECONDS,
        ),
        interval=freshness.RECHECK_INTERVAL_SECONDS,
    )
    acting = asyncio.Event()  # set once this replica leads with filled indexes

    def watch_restarted(resource: str, reason: str) -> None:
        # kopf logs it on the event loop's thread; the hop keeps that true for any other caller.
        if metrics is not None:
            metrics.watch_restarts.labels(resource, reason).inc()
        if reason == "expired" and acting.is_set() and gate.leading():
            loop.call_soon_threadsafe(index_checks.ask)

    on_watch_restarts(watch_restarted)

    def lead() -> None:
        """This replica leads: once every index is filled, the reconcile workers and the scheduler run
        and every known job is looked at. A standby's handlers have kept the indexes warm meanwhile;
        a replica that just started (and won the Lease before its first listing ended) waits for
        them, as its handlers do: a reconcile on a partial pod index would take a running gang's
        pods for gone, and a scheduling pass on it hand out GPUs in use."""
        if metrics is not None:
            metrics.leader.set(1)
        jobs.accepting = services.accepting = True
        memo.tasks = [supervise(act_once_indexed(), "largo-leader", lambda: True, exit_process)]

    def supervised(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return supervise(work, name, lambda: bool(memo.get("stopping")), exit_process)

    async def act_once_indexed() -> None:
        await indexed.wait()
        logger.info("%s leads: gang scheduler and %d reconcile workers started", holder, workers)
        memo.tasks += [
            supervised(jobs.run(reconcile, workers), "largo-trainjob-workers"),
            supervised(scheduler.run(), "largo-gang-scheduler"),
            supervised(services.run(serving.reconcile, workers), "largo-service-workers"),
            supervised(autoscaler.run(), "largo-autoscaler"),
        ]
        acting.set()
        index_checks.ask()
        for store in kwargs["trainjob_queue"].values():
            for entry in store:
                jobs.add(entry.key)
        for store in kwargs["service_queue"].values():
            for entry in store:
                services.add(entry.key)
        scheduler.nudge()

    if election is None:
        lead()
        return
    jobs.accepting = services.accepting = False
    namespace, lease = election.split("/", 1)

    def stopped() -> None:
        # Never lead again in this process: no task, reservation or queued decision of the old term
        # survives. The Deployment starts a fresh standby.
        exit_process()

    logger.info("%s is a candidate for the Lease %s/%s", holder, namespace, lease)

    def started() -> None:
        # Called from the election's thread: the work starts on the operator's event loop.
        loop.call_soon_threadsafe(lead)

    start_election(gate, lease, namespace, holder, election_timings, started, stopped)
    memo.release_lease = lambda: release_lease(
        lease_api(election_timings.renew_deadline), gate, lease, namespace, holder
    )


def exit_process() -> None:
    logging.shutdown()
    os._exit(1)


def stale_indexes(found: Mapping[str, set[str]]) -> None:
    logger.critical(
        "the indexes hold objects the API server no longer has (%s), deleted while a watch was cut: "
        "exiting to start again with fresh ones",
        freshness.describe(found),
    )
    exit_process()


async def _snapshot(indexes: Mapping[str, Any]) -> Snapshot:
    """The indexes as they are now, for one scrape of /metrics."""
    nodes = [info for store in indexes["node_inventory"].values() for info in store]
    pods = [(node, usage) for node, store in indexes["pod_inventory"].items() for usage in store]
    jobs = [entry for store in indexes["trainjob_queue"].values() for entry in store]
    services = [entry for store in indexes["service_queue"].values() for entry in store]
    return Snapshot(nodes=nodes, pods=pods, jobs=jobs, now=time.time(), services=services)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.stopping = True
    for task in memo.get("tasks", []):
        task.cancel()
    await asyncio.gather(*memo.get("tasks", []), return_exceptions=True)
    if "index_checks" in memo:
        await memo.index_checks.stop()
    release = memo.get("release_lease")
    if release is not None:
        # Once nothing of this term runs: a standby takes over in about a second, not the Lease's 10.
        await asyncio.to_thread(release)


# -- indexes: the inventory, rebuilt from the cluster at every start ---------------------------------


@kopf.index("nodes")
async def node_inventory(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    info = inventory.node_info(body)
    # kopf's memo here is the node's own: it keeps when this operator first saw the node not Ready.
    if info.ready:
        memo.pop("first_seen_not_ready", None)
        return {name: info}
    first_seen: float = memo.setdefault("first_seen_not_ready", time.time())
    return {name: inventory.noticed_not_ready(info, first_seen)}


@kopf.index("pods")
async def pod_inventory(body: kopf.Body, **_: Any) -> dict[str, Any]:
    usage = pod_usage(body)
    if usage is None:
        return {}
    return {body["spec"]["nodeName"]: usage}


@kopf.index("pods", labels={LABEL_JOB_NAME: kopf.PRESENT})
async def trainjob_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[JobKey, Any]:
    return {(str(namespace), labels[LABEL_JOB_NAME]): dict(body)}


@kopf.index("configmaps", labels={LABEL_PROGRESS_OF: kopf.PRESENT})
async def progress_reports(
    namespace: str | None, name: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[JobKey, Any]:
    """What each job's runtime last reported; read and validated by the job's reconcile. Only the
    job's own ConfigMap speaks for it: a trainer may patch its ConfigMap's labels too, and one
    relabelled to name another job is not that job's report."""
    job = labels[LABEL_PROGRESS_OF]
    if name != progress_configmap(job):
        return {}
    return {(str(namespace), job): dict(body.get("data") or {})}


@kopf.index(GROUP, VERSION, SERVICE_PLURAL)
async def service_queue(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[JobKey, Any]:
    return {(str(namespace), name): service_entry(body)}


@kopf.index("pods", labels={LABEL_SERVICE: kopf.PRESENT})
async def service_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[JobKey, Any]:
    return {(str(namespace), labels[LABEL_SERVICE]): dict(body)}


@kopf.index("pods", labels={LABEL_ROUTER: kopf.PRESENT})
async def service_routers(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[JobKey, Any]:
    """Each service's router pods: at zero replicas, the autoscaler reads their held requests."""
    return {(str(namespace), labels[LABEL_ROUTER]): dict(body)}


@kopf.index("persistentvolumeclaims")
async def claim_names(namespace: str | None, name: str, **_: Any) -> dict[JobKey, Any]:
    """Which claims exist: a service whose model's claim is missing says so instead of pending pods."""
    return {(str(namespace), name): True}


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers")
async def service_autoscalers(
    namespace: str | None, name: str, spec: kopf.Spec, **_: Any
) -> dict[JobKey, Any]:
    target = spec.get("scaleTargetRef") or {}
    if target.get("kind") != SERVICE_KIND or not str(target.get("apiVersion", "")).startswith(GROUP):
        return {}
    return {(str(namespace), str(target.get("name"))): name}


@kopf.index(GROUP, VERSION, PLURAL)
async def trainjob_queue(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[JobKey, Any]:
    return {(str(namespace), name): job_entry(body)}


# -- wake-ups -----------------------------------------------------------------------------------------


def _indexes_filled(memo: kopf.Memo) -> None:
    """kopf calls a handler only once every index is filled from its initial listing: the first call
    lets the leader act (``act_once_indexed``)."""
    memo.indexed.set()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def trainjob_changed(
    namespace: str | None, name: str, status: kopf.Status, memo: kopf.Memo, **kwargs: Any
) -> None:
    _indexes_filled(memo)
    memo.jobs.add((str(namespace), name))
    # Services that serve this job's checkpoints look at its newest one.
    for store in kwargs["service_queue"].values():
        for entry in store:
            source = entry.service.spec.model.from_train_job if entry.service is not None else None
            if source is not None and entry.key[0] == namespace and source.name == name:
                memo.services.add(entry.key)
    # The index already holds this version: a new or queued job is visible to the very next pass.
    if status.get("phase") in (None, Phase.QUEUED):
        memo.scheduler.wake()


@kopf.on.event("pods")
async def pod_changed(
    namespace: str | None,
    labels: kopf.Labels,
    event: kopf.RawEvent,
    body: kopf.Body,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """A TrainJob's or InferenceService's pod changed: reconcile its owner. Any pod that stops holding
    resources frees capacity."""
    _indexes_filled(memo)
    job = labels.get(LABEL_JOB_NAME)
    if job is not None:
        memo.jobs.add((str(namespace), job))
    service = labels.get(LABEL_SERVICE)
    if service is not None:
        memo.services.add((str(namespace), service))
    if event.get("type") == "DELETED" or not inventory.pod_holds_resources(body):
        memo.scheduler.wake()


@kopf.on.event("configmaps", labels={LABEL_PROGRESS_OF: kopf.PRESENT})
async def progress_reported(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.add((str(namespace), labels[LABEL_PROGRESS_OF]))


@kopf.on.event("nodes")
async def node_changed(
    name: str, body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any
) -> None:
    _indexes_filled(memo)
    info = None if event.get("type") == "DELETED" else inventory.node_info(body)
    seen: dict[str, Any] = memo.setdefault("nodes_seen", {})
    # Heartbeats change nothing the scheduler reads: only capacity, labels, taints or readiness do.
    if seen.get(name) == info and name in seen:
        return
    before = seen.get(name)
    seen[name] = info
    memo.scheduler.wake()
    recovered = before is not None and not before.usable
    if info is None or not info.usable or recovered:
        # Jobs with pods or placements on this node must notice at once, not at the next resync: a
        # node gone, out of service or not Ready (its grace starts), or Ready again (said on the job).
        for store in kwargs["trainjob_queue"].values():
            for entry in store:
                if entry.placement and name in entry.placement:
                    memo.jobs.add(entry.key)
        for store in kwargs["service_queue"].values():
            for entry in store:
                if any(name in group.nodes for group in entry.groups):
                    memo.services.add(entry.key)


@kopf.on.event(GROUP, VERSION, SERVICE_PLURAL)
async def service_changed(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    _indexes_filled(memo)
    memo.services.add((str(namespace), name))


@kopf.on.event("services", labels={LABEL_SERVICE: kopf.PRESENT})
@kopf.on.event("apps", "v1", "deployments", labels={LABEL_SERVICE: kopf.PRESENT})
async def network_changed(
    namespace: str | None, labels: kopf.Labels, event: kopf.RawEvent, memo: kopf.Memo, **_: Any
) -> None:
    """A service's Service or router Deployment was deleted (by hand, say): it is made again."""
    if event.get("type") == "DELETED":
        key = (str(namespace), labels[LABEL_SERVICE])
        memo.serving.forget_network(key)
        memo.services.add(key)


@kopf.on.event("persistentvolumeclaims")
async def claim_changed(namespace: str | None, memo: kopf.Memo, **kwargs: Any) -> None:
    """A claim came or went: the namespace's services look again (their model's claim, or their
    TrainJob's, may be this one). Claims change rarely."""
    for store in kwargs["service_queue"].values():
        for entry in store:
            if entry.key[0] == namespace:
                memo.services.add(entry.key)


@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers")
async def autoscaler_changed(namespace: str | None, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    target = spec.get("scaleTargetRef") or {}
    if target.get("kind") == SERVICE_KIND:
        memo.services.add((str(namespace), str(target.get("name"))))
