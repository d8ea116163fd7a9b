"""The gang scheduler loop: inventory from the kopf indexes in, admissions written to status.

One pass reads every node, every resource-holding pod, every TrainJob and every InferenceService's
replica groups from the indexes, asks the pure ``largo.sched.gang.schedule`` what to admit (one queue
for training and serving, ordered by priority, then arrival), and writes each admission: a TrainJob's
as ``status.placement``, a replica group's as its entry in the service's ``status.groups`` (guarded by
the resourceVersion it decided on, so an object that changed meanwhile is decided again). Passes run
one at a time, whenever something that changes capacity or the queue happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from largo.api.v1alpha1 import (
    GPU_RESOURCE,
    ConditionType,
    Phase,
    Reason,
    ServiceReason,
    check_service_status,
    check_status,
    sanitize_status,
)
from largo.controllers.kube import ConflictError, Kube
from largo.controllers.state import (
    BoundRanks,
    GroupRecord,
    JobEntry,
    JobKey,
    PodUsage,
    ServiceEntry,
    bound_rank,
    gang_key,
    group_gang_id,
    is_bound,
)
from largo.controllers.workqueue import Retry
from largo.manifests.trainjob import pod_spec_hash
from largo.policy.conditions import listed, set_condition, timestamp
from largo.policy.trainjob import summary
from largo.sched import gang, inventory
from largo.sched.types import NodeInfo, Placement, Waiting, WaitReason, checkpoint_directory

logger = logging.getLogger(__name__)

# Back-off of failed scheduling passes.
PASS_RETRY_SECONDS = 1.0
PASS_RETRY_MAX_SECONDS = 30.0
# How often a waiting job's queue message is rewritten when only its detail (the room left) changed.
QUEUE_MESSAGE_REFRESH_SECONDS = 30.0


class IndexLike(Protocol):
    """The read side of a kopf index: key -> store of values."""

    def values(self) -> Iterable[Iterable[Any]]: ...


class KeyedIndex(Protocol):
    """A kopf index read by key."""

    def get(self, key: Any) -> Iterable[Any] | None: ...


def index_values(index: IndexLike) -> list[Any]:
    return [value for store in index.values() for value in store]


def node_lookup(nodes: KeyedIndex) -> Callable[[str], NodeInfo | None]:
    """A node's entry in the node inventory by name; None for a node that is gone."""

    def lookup(name: str) -> NodeInfo | None:
        infos: list[NodeInfo] = list(nodes.get(name) or [])
        return infos[-1] if infos else None

    return lookup


@dataclass
class _Admission:
    attempt: int
    nodes: tuple[str, ...]
    per_pod: Mapping[str, int]
    exclusive: bool = False
    # Ranks that finished and are never created again: nothing to reserve for them.
    done: frozenset[int] = frozenset()
    # The admitted object's uid: one deleted and created again under its name is another gang.
    uid: str = ""


@dataclass
class Scheduler:
    kube: Kube
    nodes: IndexLike
    pods: IndexLike
    jobs: IndexLike
    # Told of every admission with the object the API server returned, so the job's pods are created
    # without waiting for the watch event that brings the same version.
    admitted: Callable[[JobKey, Mapping[str, Any]], None]
    clock: Callable[[], float]
    # Completes an admission's status patch with what the job's reconcile would add (one write, not two).
    complete_admission: Callable[[JobEntry, Mapping[str, Any]], Mapping[str, Any]] = lambda _, patch: patch
    # Told of each pass (seconds, jobs decided) and each admission (the job, seconds since it arrived).
    observe_pass: Callable[[float, int], None] = lambda seconds, jobs: None
    observe_admission: Callable[[float], None] = lambda waited: None
    # InferenceServices, whose replica groups queue beside the TrainJobs; told of admissions like jobs.
    services: IndexLike = field(default_factory=dict)
    service_admitted: Callable[[JobKey, Mapping[str, Any]], None] = lambda key, body: None
    # Admissions written but not yet seen in the jobs index: they keep their capacity reserved.
    _pending: dict[JobKey, _Admission] = field(default_factory=dict)
    # The same for replica groups, by the group's gang key.
    _pending_groups: dict[JobKey, _Admission] = field(default_factory=dict)
    # When each waiting job's queue entry was last written: a change of its message alone (the room
    # left, which moves with every pod elsewhere) is written at most every QUEUE_MESSAGE_REFRESH_SECONDS.
    _told: dict[JobKey, float] = field(default_factory=dict)
    # The same for replica groups, by the group's gang key.
    _told_groups: dict[JobKey, float] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _ready: bool = False
    _again: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        # Handlers, the only callers, run once kopf has filled every index from its initial listing:
        # from then on a pass sees the whole inventory.
        self._ready = True
        self._wake.set()

    def _again_soon(self) -> None:
        """A write conflicted: another pass in a second, when the index shows the newer version. At
        once it would conflict again for as long as the index lags (a job deleted during a watch's
        gap, the watches stopped at a shutdown): hundreds of failed writes a second."""
        if self._again is None:
            self._again = asyncio.get_running_loop().call_later(PASS_RETRY_SECONDS, self._again_now)

    def _again_now(self) -> None:
        self._again = None
        self.wake()

    def nudge(self) -> None:
        """Asks for a pass without claiming the indexes are filled (see ``wake``)."""
        self._wake.set()

    async def run(self, resync: float = 30.0) -> None:
        failures = 0
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that arrives as
            # the event is set (a wake-up beside the operator's stop), and the stop waited for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(resync):
                    await self._wake.wait()
            self._wake.clear()
            if not self._ready:
                # However slowly the indexes fill, no pass runs on a partial inventory: it could
                # admit a gang onto GPUs that pods not listed yet already hold.
                continue
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Retry as reason:
                # Expected and soon over (a write that conflicted): looked at again in a second.
                logger.info("gang scheduling pass: %s; retrying", reason)
                await asyncio.sleep(PASS_RETRY_SECONDS)
                self._wake.set()
                continue
            except Exception as error:
                failures += 1
                # 1 s, doubling to at most 30 s: an API server down for minutes is retried, not
                # hammered, and only the first failure of a run is logged with a traceback.
                delay = min(PASS_RETRY_SECONDS * 2 ** min(failures - 1, 16), PASS_RETRY_MAX_SECONDS)
                if failures > 1:
                    logger.warning(
                        "gang scheduling pass failed (%d in a row): %s; retrying in %gs",
                        failures,
                        error,
                        delay,
                    )
                else:
                    logger.exception("gang scheduling pass failed; retrying in %gs", delay)
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            failures = 0

    def usage(
        self, entries: Iterable[JobEntry], services: Iterable[ServiceEntry] = ()
    ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        """What every node holds: bound pods, plus admitted ranks whose pods are not bound yet; and,
        from the same pass over the pods, what those that never leave their node (DaemonSets', static
        pods') hold there."""
        usage: dict[str, dict[str, int]] = {}
        resident: dict[str, dict[str, int]] = {}
        bound: BoundRanks = set()
        whole: set[str] = set()  # nodes an exclusive pod holds
        for node, store in self.pods_by_node():
            for pod in store:
                inventory.add_usage(usage, node, pod.requests)
                if pod.resident:
                    inventory.add_usage(resident, node, pod.requests)
                bound_rank(bound, pod)
                if pod.exclusive:
                    whole.add(node)
        reserved: dict[JobKey, _Admission] = {}
        for entry in entries:
            if entry.active and entry.placement is not None:
                exclusive = entry.request is not None and entry.request.exclusive
                reserved[entry.key] = _Admission(
                    entry.attempt, entry.placement, entry.per_pod, exclusive, entry.succeeded_ranks, entry.uid
                )
        reserved.update(self._pending)
        for service in services:
            exclusive = service.exclusive
            for group in service.placed():
                reserved[group.gang(*service.key)] = _Admission(
                    group.attempt, group.nodes, service.per_pod, exclusive, uid=service.uid
                )
        reserved.update(self._pending_groups)
        for key, admission in reserved.items():
            for rank, node in enumerate(admission.nodes):
                if rank in admission.done:
                    continue
                if not is_bound(bound, key, admission.uid, admission.attempt, rank):
                    inventory.add_usage(usage, node, admission.per_pod)
                    if admission.exclusive:
                        whole.add(node)
        if whole:
            # The node is the exclusive pod's: no GPU and no pod slot left, so nothing else of largo's
            # goes there, not even a gang that asks for no GPU.
            allocatable = {info.name: info.allocatable for info in index_values(self.nodes)}
            for node in whole:
                used = usage.setdefault(node, {})
                for resource in (GPU_RESOURCE, inventory.POD_SLOTS):
                    held = allocatable.get(node, {}).get(resource, 0)
                    used[resource] = max(used.get(resource, 0), held)
        return usage, resident

    def checkpoints_in_use(self, entries: Iterable[JobEntry], nodes: Iterable[NodeInfo]) -> dict[str, str]:
        """Each checkpoint directory held, to the gang key of the job that holds it: the directory a
        pod of a TrainJob mounts, while the pod is there (a stopping one may be writing a last
        checkpoint, whether its job finished, was suspended or deleted); and the one a job was
        admitted with, from its admission (written or only pending) until it has finished or been
        suspended (a released or restarting gang has no pods while it queues again)."""
        in_use: dict[str, str] = {}
        entries = list(entries)
        uids = {entry.key: entry.uid for entry in entries}
        # A pod of a node that is gone writes nothing more (and the pod garbage collector deletes it).
        # One on a node that is only not ready may still run and write to network storage: it holds
        # the directory until it is gone (a deleted job's pods there may be force-deleted by hand).
        existing = {info.name for info in nodes}
        for node, store in self.pods_by_node():
            if node not in existing:
                continue
            for pod in store:
                if pod.checkpoint is not None and pod.job is not None:
                    holder = gang_key(pod.job)
                    if pod.owner is not None and pod.owner != uids.get(pod.job):
                        # A deleted job's pod, still stopping (and perhaps writing): not the directory
                        # of the job created again under its name.
                        holder = f"{holder} (deleted, uid {pod.owner})"
                    in_use.setdefault(pod.checkpoint, holder)
        for entry in entries:
            if entry.key in self._pending and entry.request is not None:
                directory = entry.request.checkpoint
            elif entry.holds_checkpoint:
                directory = entry.admitted_checkpoint
            else:
                continue
            if directory is not None:
                in_use.setdefault(directory, gang_key(entry.key))
        return in_use

    def pods_by_node(self) -> list[tuple[str, list[PodUsage]]]:
        index: Any = self.pods
        return [(node, list(store)) for node, store in index.items()]

    async def run_pass(self) -> None:
        started = time.monotonic()
        decided = await self._pass()
        self.observe_pass(time.monotonic() - started, decided)

    async def _pass(self) -> int:
        """One pass; returns how many queued jobs it decided on."""
        entries: list[JobEntry] = index_values(self.jobs)
        by_key = {entry.key: entry for entry in entries}
        # An admission is settled once the index shows it, or the job moved on or went away.
        for key in list(self._pending):
            entry = by_key.get(key)
            pending = self._pending[key]
            if (
                entry is None
                or entry.uid != pending.uid  # deleted and created again under its name
                or entry.phase not in (None, Phase.QUEUED)
                or entry.attempt != pending.attempt
            ):
                del self._pending[key]
        for key in [key for key in self._told if key not in by_key or not by_key[key].admissible]:
            del self._told[key]
        services: list[ServiceEntry] = index_values(self.services)
        unplaced = {group.gang(*service.key) for service in services for group in service.unplaced()}
        for key in [key for key in self._told_groups if key not in unplaced]:
            del self._told_groups[key]
        self._settle_groups(services)
        nodes: list[NodeInfo] = index_values(self.nodes)
        usage, resident = self.usage(entries, services)
        now = self.clock()
        queued = [
            entry
            for entry in entries
            if entry.admissible and entry.due(now) and entry.key not in self._pending
        ]
        groups: dict[str, tuple[ServiceEntry, GroupRecord]] = {}
        for service in services:
            for group in service.waiting(now):
                if group.gang(*service.key) not in self._pending_groups:
                    groups[gang_key(group.gang(*service.key))] = (service, group)
        requests = [entry.request for entry in queued if entry.request]
        requests += [service.request(group) for service, group in groups.values()]
        decision = gang.schedule(nodes, usage, requests, self.checkpoints_in_use(entries, nodes), resident)
        by_gang_key = {gang_key(entry.key): entry for entry in queued}
        # One status write per service, whatever number of its groups this pass decided.
        by_service: dict[JobKey, tuple[ServiceEntry, dict[int, Placement], dict[int, Waiting]]] = {}
        for placement in decision.admitted:
            if placement.key in groups:
                service, group = groups[placement.key]
                by_service.setdefault(service.key, (service, {}, {}))[1][group.replica] = placement
        for waiting in decision.waiting:
            if waiting.key in groups:
                service, group = groups[waiting.key]
                by_service.setdefault(service.key, (service, {}, {}))[2][group.replica] = waiting
        # Every write of the pass ends before the pass does, failed or not: a failure raised at once
        # would leave the others' admissions in flight, in neither the index nor ``_pending``, and the
        # next pass would hand their nodes out again.
        outcomes = await asyncio.gather(
            *(
                self._admit(by_gang_key[placement.key], placement)
                for placement in decision.admitted
                if placement.key in by_gang_key
            ),
            *(
                self._wait(by_gang_key[waiting.key], waiting)
                for waiting in decision.waiting
                if waiting.key in by_gang_key
            ),
            *(self._decide_groups(*decided) for decided in by_service.values()),
            return_exceptions=True,
        )
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            raise failures[0]
        return len(queued) + len(groups)

    def _settle_groups(self, services: Iterable[ServiceEntry]) -> None:
        """A group's admission is settled once the index shows its nodes, or the group moved on."""
        shown: dict[JobKey, tuple[str, GroupRecord]] = {}
        for service in services:
            for group in service.groups:
                shown[group.gang(*service.key)] = (service.uid, group)
        for key, pending in list(self._pending_groups.items()):
            uid, seen = shown.get(key, ("", None))
            if (
                seen is None
                or uid != pending.uid  # the service was deleted and created again under its name
                or seen.nodes
                or seen.attempt != pending.attempt
                or seen.retiring
            ):
                del self._pending_groups[key]

    async def _decide_groups(
        self, service: ServiceEntry, admitted: Mapping[int, Placement], waiting: Mapping[int, Waiting]
    ) -> None:
        """Writes the pass's decisions on one service's queued groups: nodes for the admitted, the
        queue position and reason for the others (only when it changed)."""
        now = self.clock()
        status = dict(service.body.get("status") or {})
        groups = [dict(group) for group in status.get("groups") or []]
        changed = False
        told: list[JobKey] = []
        for group in groups:
            replica = int(group.get("replica", -1))
            if replica in admitted:
                group.update(nodes=list(admitted[replica].nodes), admittedAt=timestamp(now), queue=None)
                group.pop("restartAfter", None)
                changed = True
            elif replica in waiting:
                reason = waiting[replica]
                queue = {
                    "name": service.service.spec.scheduling.queue if service.service else "",
                    "position": reason.position,
                    "reason": str(reason.reason),
                    "message": reason.message,
                }
                previous = dict(group.get("queue") or {})
                if previous != {k: v for k, v in queue.items() if v is not None}:
                    key = (service.key[0], group_gang_id(service.key[1], replica))
                    same_place = all(previous.get(part) == queue[part] for part in ("reason", "position"))
                    recently = now - self._told_groups.get(key, -math.inf) < QUEUE_MESSAGE_REFRESH_SECONDS
                    if same_place and recently:
                        # Only the detail moved (the room left, with every pod elsewhere): a write of
                        # the service at each, and the reconcile's second write of its Ready message.
                        continue
                    group["queue"] = queue
                    told.append(key)
                    changed = True
        if not changed:
            return
        groups = [{k: v for k, v in group.items() if v is not None} for group in groups]
        for group in groups:
            if group.get("queue"):
                group["queue"] = {k: v for k, v in group["queue"].items() if v is not None}
        check_service_status({"groups": groups})
        try:
            updated = await self.kube.patch_service_status(
                *service.key, service.resource_version, {"groups": groups}
            )
        except ConflictError:
            self._again_soon()
            return
        for key in told:
            self._told_groups[key] = now
        for replica, placement in admitted.items():
            record = next(g for g in service.groups if g.replica == replica)
            self._pending_groups[record.gang(*service.key)] = _Admission(
                record.attempt, placement.nodes, service.per_pod, service.exclusive, uid=service.uid
            )
            if record.attempt == 0:
                self.observe_admission(max(0.0, now - record.queued_at))
        if admitted:
            self.service_admitted(service.key, updated)
            replicas = ", ".join(str(r) for r in sorted(admitted))
            nodes = sorted({n for p in admitted.values() for n in p.nodes})
            await self.kube.event(
                service.body,
                "Normal",
                ServiceReason.GROUP_ADMITTED,
                f"replica group {replicas} placed on {listed(nodes)}",
            )

    async def _admit(self, entry: JobEntry, placement: Placement) -> None:
        now = self.clock()
        # What a hand or an older operator wrote there must not fail the pass for every job.
        status, _ = sanitize_status(entry.body.get("status") or {})
        message = f"gang of {len(placement.nodes)} pods placed on {listed(sorted(set(placement.nodes)))}"
        conditions = set_condition(
            status.get("conditions") or [], ConditionType.ADMITTED, True, Reason.ADMITTED, message, now
        )
        patch = {
            "phase": Phase.STARTING,
            "placement": {
                "attempt": entry.attempt,
                "nodes": list(placement.nodes),
                "admittedAt": timestamp(now),
                **({"specHash": pod_spec_hash(entry.job.spec)} if entry.job is not None else {}),
            },
            "queue": None,
            "nextAdmissionTime": None,
            "checkpointDirectory": (
                checkpoint_directory(entry.request.checkpoint)
                if entry.request is not None and entry.request.checkpoint is not None
                else None
            ),
            "conditions": conditions,
            **summary(conditions),
        }
        complete = self.complete_admission(entry, patch)
        check_status({k: v for k, v in complete.items() if v is not None})
        try:
            updated = await self.kube.patch_trainjob_status(*entry.key, entry.resource_version, complete)
        except ConflictError:
            self._again_soon()
            return
        exclusive = entry.request is not None and entry.request.exclusive
        self._pending[entry.key] = _Admission(
            entry.attempt, placement.nodes, entry.per_pod, exclusive, uid=entry.uid
        )
        self.admitted(entry.key, updated)
        if entry.attempt == 0 and entry.request is not None and entry.request.arrival:
            self.observe_admission(max(0.0, now - entry.queued_since))
        await self.kube.event(entry.body, "Normal", Reason.ADMITTED, message)

    async def _wait(self, entry: JobEntry, waiting: Waiting) -> None:
        queue = {
            "name": entry.queue_name,
            "position": waiting.position,
            "reason": str(waiting.reason),
            "message": waiting.message,
        }
        previous = dict(entry.queue)
        new = entry.phase is None
        # The merge patch drops a null position: compare with what the status holds then.
        if previous == {k: v for k, v in queue.items() if v is not None} and not new:
            return
        now = self.clock()
        same_place = all(previous.get(part) == queue[part] for part in ("reason", "position"))
        recently = now - self._told.get(entry.key, -math.inf) < QUEUE_MESSAGE_REFRESH_SECONDS
        if same_place and recently and not new:
            return  # only the detail moved: every queued job rewritten at each pod's end is churn
        # What a hand or an older operator wrote there must not fail the pass for every job.
        status, _ = sanitize_status(entry.body.get("status") or {})
        conditions = set_condition(
            status.get("conditions") or [],
            ConditionType.ADMITTED,
            False,
            str(waiting.reason),
            waiting.message,
            self.clock(),
        )
        patch: dict[str, Any] = {"queue": queue, "conditions": conditions, **summary(conditions)}
        if new:
            patch["phase"] = Phase.QUEUED
        check_status(patch)
        try:
            await self.kube.patch_trainjob_status(*entry.key, entry.resource_version, patch)
        except ConflictError:
            self._again_soon()
            return
        self._told[entry.key] = now
        if new:
            await self.kube.event(entry.body, "Normal", Reason.QUEUED, "queued for gang admission")
        if previous.get("reason") != queue["reason"]:
            warn = waiting.reason in (WaitReason.Unschedulable, WaitReason.CheckpointInUse)
            kind = "Warning" if warn else "Normal"
            await self.kube.event(entry.body, kind, str(waiting.reason), waiting.message)
