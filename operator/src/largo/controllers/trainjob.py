"""One TrainJob reconcile: read the job and its pods fresh, let the pure lifecycle decide, apply the plan.

Order matters: the status is written first, guarded by the resourceVersion the decision was made on;
only when that write succeeds are events posted and pods created or deleted. A stale decision therefore
never acts, and a reconcile interrupted at any point is completed by the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from largo.api.v1alpha1 import ConditionType, DisruptionPolicy, Phase, Reason
from largo.controllers.kube import ConflictError, CreateRefused, Kube
from largo.controllers.objects import newer, owned, status_patch
from largo.controllers.scheduler import KeyedIndex, node_lookup
from largo.controllers.state import JobEntry, JobKey
from largo.manifests import trainjob as build
from largo.policy.conditions import parse_timestamp, set_condition
from largo.policy.pods import unschedulable_as_seen
from largo.policy.progress import ReadReport, read_report
from largo.policy.trainjob import (
    JobView,
    Plan,
    Timings,
    counts_only,
    creation_refused,
    plan,
    pod_view,
    summary,
)
from largo.sched.types import NodeHealth, node_health

logger = logging.getLogger(__name__)


def job_view(job: Any, body: Mapping[str, Any], report: ReadReport | None = None) -> JobView:
    spec = job.spec
    failure = spec.failure_policy
    return JobView(
        num_nodes=spec.num_nodes,
        gpus_per_node=build.gpus_per_node(spec),
        backoff_limit=failure.backoff_limit,
        permanent_exit_codes=frozenset(failure.permanent_exit_codes),
        retryable_exit_codes=frozenset(failure.retryable_exit_codes),
        start_timeout_seconds=failure.start_timeout_seconds,
        ignore_disruptions=failure.disruptions is DisruptionPolicy.IGNORE,
        active_deadline_seconds=spec.active_deadline_seconds,
        ttl_seconds_after_finished=spec.ttl_seconds_after_finished,
        suspend=spec.suspend,
        generation=(body.get("metadata") or {}).get("generation"),
        status=body.get("status") or {},
        report=report,
        spec_hash=build.pod_spec_hash(spec),
    )


@dataclass
class TrainJobReconciler:
    kube: Kube
    nodes: KeyedIndex
    jobs: KeyedIndex
    pods: KeyedIndex
    # (namespace, job) -> the data of the job's progress ConfigMap.
    reports: KeyedIndex
    wake_scheduler: Callable[[], None]
    clock: Callable[[], float]
    timings: Timings
    count_interval: float = 1.0
    # When each job's status was last written: only paces count updates, so losing it costs nothing.
    _last_write: dict[JobKey, float] = field(default_factory=dict)
    # Objects returned by our own writes, newer than the index until their watch event arrives.
    _hints: dict[JobKey, Mapping[str, Any]] = field(default_factory=dict)
    # When this operator first saw each job's pods unschedulable (``pods.unschedulable_as_seen``).
    _unschedulable: dict[JobKey, dict[str, float]] = field(default_factory=dict)
    # Told, when a gang becomes Running, how long it took since its admission (for the metrics).
    observe_start: Callable[[float], None] = lambda seconds: None

    def hint(self, key: JobKey, body: Mapping[str, Any]) -> None:
        self._hints[key] = body

    def node_health(self, names: Iterable[str], now: float) -> NodeHealth:
        """Which of ``names`` are lost or unusable now (``sched.types.node_health``)."""
        return node_health(names, node_lookup(self.nodes), now, self.timings.node_lost_after)

    def _latest(self, key: JobKey) -> JobEntry | None:
        store = self.jobs.get(key)
        entries: list[JobEntry] = list(store) if store is not None else []
        return entries[-1] if entries else None

    async def reconcile(self, key: JobKey) -> float | None:
        """One cycle for one job, from the indexes' view of it and its pods.

        The view may lag the API server by a moment; the resourceVersion guard on the status write
        turns a lagging decision into a conflict, which the work queue retries within a second.
        """
        hint = self._hints.pop(key, None)
        entry = self._latest(key)
        if entry is None or (entry.body.get("metadata") or {}).get("deletionTimestamp"):
            # Deleted: the API server's garbage collector removes what it owned.
            self._last_write.pop(key, None)
            self._unschedulable.pop(key, None)
            self.wake_scheduler()
            return None
        # The newer of the hint (an object our own write returned) and the index's version.
        body, job = newer(hint, entry.body) if hint else entry.body, entry.job
        if job is None:
            await self._reject(body, entry.invalid or "invalid spec")
            return None
        now = self.clock()
        decision = self._decide(key, body, job, now)
        current = dict(body.get("status") or {})
        if counts_only(decision, current):
            # The pods of a starting gang change one by one: count them at most every interval.
            wait = self._last_write.get(key, 0.0) + self.count_interval - now
            if wait > 0:
                return wait
        self._last_write[key] = now
        return await self._apply(body, job, decision, current)

    def _decide(self, key: JobKey, body: Mapping[str, Any], job: Any, now: float) -> Plan:
        """The lifecycle's decision for ``body`` and the job's pods as the index shows them."""
        uid = body["metadata"]["uid"]
        store = self.pods.get(key)
        owned = [
            pod
            for pod in (store or [])
            if any(ref.get("uid") == uid for ref in (pod["metadata"].get("ownerReferences") or []))
        ]
        views, self._unschedulable[key] = unschedulable_as_seen(
            [view for view in map(pod_view, owned) if view is not None], self._unschedulable.get(key, {}), now
        )
        placement = (body.get("status") or {}).get("placement") or {}
        # Only the job's own nodes matter; one missing from the inventory is gone, hence lost.
        relevant = {pod.node_name for pod in views if pod.node_name} | set(placement.get("nodes") or [])
        health = self.node_health(relevant, now)
        reports: list[Mapping[str, Any]] = list(self.reports.get(key) or [])
        report = read_report(reports[-1]) if reports else None
        return plan(
            job_view(job, body, report),
            views,
            health.unusable,
            health.lost,
            now,
            self.timings,
            not_ready=health.lost_at,
        )

    def complete_admission(self, entry: JobEntry, patch: Mapping[str, Any]) -> dict[str, Any]:
        """The scheduler's admission write, completed with what the first reconcile after it would
        write (counts, start time, observed generation): that reconcile then creates the pods at once
        instead of writing the status a second time first."""
        if entry.job is None:
            return dict(patch)
        before = dict(entry.body.get("status") or {})
        admitted = {k: v for k, v in {**before, **patch}.items() if v is not None}
        decision = self._decide(entry.key, {**entry.body, "status": admitted}, entry.job, self.clock())
        # The decision marks when the pods could first be created (creatingSince): the same
        # placement otherwise, carried in the admission write.
        placed = {k: v for k, v in (decision.status.get("placement") or {}).items() if k != "creatingSince"}
        if not decision.create_ranks or placed != admitted.get("placement"):
            return dict(patch)
        return {**patch, **status_patch(admitted, decision.status)}

    async def _apply(
        self, body: Mapping[str, Any], job: Any, decision: Plan, current: Mapping[str, Any]
    ) -> float | None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        written: Mapping[str, Any] = body
        if decision.status != current:
            # A conflict propagates: the work queue runs the job again after its back-off.
            written = await self.kube.patch_trainjob_status(
                namespace, name, metadata.get("resourceVersion"), status_patch(current, decision.status)
            )
            # The next reconcile decides on this version, not on an index that may not show it yet:
            # deciding on the older one would only make its write conflict.
            self._hints[(namespace, name)] = written
            if decision.status.get("phase") == Phase.RUNNING and current.get("phase") == Phase.STARTING:
                admitted = parse_timestamp((decision.status.get("placement") or {}).get("admittedAt"))
                if admitted is not None:
                    self.observe_start(max(0.0, self.clock() - admitted))
        # The decision's events go out with its status, before any pod call that may fail: a retry
        # decides on the written status and would not post them again.
        for event in decision.events:
            await self.kube.event(body, event.type, event.reason, event.message)
        if decision.create_ranks:
            nodes = decision.status["placement"]["nodes"]
            attempt = int(decision.status.get("attempt") or 0)
            # The Service first: a pod without its DNS name (or with a stranger's) cannot rendezvous.
            # The progress ConfigMap is only needed once rank 0 reports: it goes with the pods.
            await self._create(written, body, [build.build_service(job)], keep=True)
            pods = [build.build_pod(job, rank, nodes[rank], attempt) for rank in decision.create_ranks]
            await self._create(written, body, [build.build_progress_configmap(job), *pods])
        if decision.delete_pods:
            await asyncio.gather(
                *(self.kube.delete_pod(namespace, pod, decision.force_delete) for pod in decision.delete_pods)
            )
        if decision.delete_job:
            await self.kube.event(
                body, "Normal", Reason.TTL_EXPIRED, "ttlSecondsAfterFinished passed: deleting"
            )
            await self.kube.delete_trainjob(namespace, name, str((body.get("metadata") or {}).get("uid")))
            return None
        if decision.wake_scheduler:
            self.wake_scheduler()
        return decision.requeue_after

    async def _create(
        self,
        written: Mapping[str, Any],
        owner: Mapping[str, Any],
        manifests: list[dict[str, Any]],
        keep: bool = False,
    ) -> None:
        """Creates ``manifests`` at once (``keep``: applies them server-side instead, ``Kube.keep``); a
        refusal is recorded on the job, then raised for back-off."""
        namespace = owner["metadata"]["namespace"]
        write = self.kube.keep if keep else self.kube.create
        results = await asyncio.gather(
            *(write(namespace, owned(manifest, owner)) for manifest in manifests),
            return_exceptions=True,
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        refused = [failure for failure in failures if isinstance(failure, CreateRefused)]
        if refused:
            await self._record_refusal(written, refused[0])
        if failures:
            raise (refused or failures)[0]

    async def _record_refusal(self, body: Mapping[str, Any], refused: CreateRefused) -> None:
        """Says in the job's status and events what the API server refused and why."""
        metadata = body["metadata"]
        patch, news = creation_refused(
            body.get("status") or {},
            refused.reason,
            refused.message,
            self.clock(),
            metadata.get("generation"),
        )
        written = await self.kube.patch_trainjob_status(
            metadata["namespace"], metadata["name"], metadata.get("resourceVersion"), patch
        )
        self._hints[(metadata["namespace"], metadata["name"])] = written
        if news:
            logger.warning("%s/%s: %s", metadata["namespace"], metadata["name"], refused.message)
            await self.kube.event(body, "Warning", refused.reason, refused.message)

    async def _reject(self, body: Mapping[str, Any], message: str) -> None:
        """A spec the schema let through but largo cannot run: say why, once, and wait for a fix."""
        metadata = body["metadata"]
        status = body.get("status") or {}
        conditions = status.get("conditions") or []
        if any(c.get("reason") == Reason.INVALID_SPEC and c.get("message") == message for c in conditions):
            return
        updated = set_condition(
            conditions,
            ConditionType.ADMITTED,
            False,
            Reason.INVALID_SPEC,
            message,
            self.clock(),
            metadata.get("generation"),
        )
        patch = {"observedGeneration": metadata.get("generation"), "conditions": updated, **summary(updated)}
        try:
            await self.kube.patch_trainjob_status(
                metadata["namespace"], metadata["name"], metadata.get("resourceVersion"), patch
            )
        except ConflictError:
            return
        await self.kube.event(body, "Warning", Reason.INVALID_SPEC, message)
