"""The TrainJob lifecycle as a pure function: what the job and its pods look like now -> what to do.

No I/O and no clock: the controller passes the job, its pods, the lost nodes and ``now``, and applies
the returned plan (one status patch, pod creations and deletions, events, when to look again).
Each policy (suspend, deadline, failure, success, TTL) is a small function of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from largo.api.v1alpha1 import ConditionType, Phase, Reason, check_status, sanitize_status
from largo.manifests.names import CONTAINER_NAME, LABEL_ATTEMPT, LABEL_NODE_RANK
from largo.policy.conditions import condition_status, listed, parse_timestamp, set_condition, timestamp
from largo.policy.pods import cannot_start
from largo.policy.progress import ReadReport

TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})


@dataclass(frozen=True, slots=True)
class Timings:
    """The lifecycle's clocks. Restart delay: ``base * 2**(restarts-1)``, at most ``cap`` seconds."""

    base: float = 10.0
    cap: float = 300.0
    # An unbound pod pinned to a usable node gets this long before its gang is released and re-queued.
    binding_timeout: float = 30.0
    # A running job whose runtime has not reported progress for this long is shown as stale.
    progress_stale_after: float = 120.0
    # A node not Ready for this long is lost: its pods count as dead and the gang restarts elsewhere.
    node_lost_after: float = 60.0

    def delay(self, restarts: int) -> float:
        # The exponent is bounded: 2**1024 overflows a float, and backoffLimit may reach 10000.
        return float(min(self.cap, self.base * 2 ** min(max(restarts - 1, 0), 64)))


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    rank: int
    attempt: int
    phase: str
    node_name: str | None
    exit_code: int | None = None
    terminating: bool = False
    # Epoch seconds since the scheduler said the pod cannot be placed (PodScheduled=False), if so.
    unschedulable_since: float | None = None
    unschedulable_message: str = ""
    # Why its trainer container cannot start, as the kubelet says (``pods.cannot_start``).
    cannot_start: str | None = None
    # Why Kubernetes is taking it away (its DisruptionTarget condition: a drain's eviction, a
    # preemption, a taint), if it is.
    disrupted: str | None = None
    # The pod's uid: its name comes back with the next attempt.
    uid: str = ""
    # Epoch seconds its trainer container ended (``finishedAt``), and it was taken away (the
    # DisruptionTarget condition's time, or when its deletion was asked for), where known.
    finished_at: float | None = None
    taken_at: float | None = None

    @property
    def taken_away(self) -> bool:
        """Deleted or disrupted, unless it had ended on its own before: the eviction API marks and
        deletes a pod that already finished too (a drain of a node whose rank is done)."""
        if not (self.terminating or self.disrupted):
            return False
        ended, taken = self.finished_at, self.taken_at
        if self.phase not in ("Succeeded", "Failed") or ended is None or taken is None:
            return True
        # Strictly earlier: a trainer that exits within the second it gets SIGTERM was stopped.
        return int(ended) >= int(taken)


@dataclass(frozen=True, slots=True)
class JobView:
    """What the lifecycle needs to know of one TrainJob: its spec essentials and its status."""

    num_nodes: int
    gpus_per_node: int
    backoff_limit: int = 3
    permanent_exit_codes: frozenset[int] = frozenset()
    retryable_exit_codes: frozenset[int] = frozenset()
    active_deadline_seconds: int | None = None
    # failurePolicy.startTimeoutSeconds: how long an admitted gang may take to have every pod running.
    start_timeout_seconds: int | None = None
    # failurePolicy.disruptions Ignore: restarts because pods were taken away do not count against
    # backoffLimit.
    ignore_disruptions: bool = False
    ttl_seconds_after_finished: int | None = None
    suspend: bool = False
    generation: int | None = None
    status: Mapping[str, Any] = field(default_factory=dict)
    # The runtime's latest progress report, read from the job's progress ConfigMap.
    report: ReadReport | None = None
    # Hash of the spec's pod-shaping fields now (build.trainjob.pod_spec_hash).
    spec_hash: str | None = None

    @property
    def phase(self) -> Phase | None:
        value = self.status.get("phase")
        return Phase(value) if isinstance(value, str) and value in Phase.__members__.values() else None

    @property
    def attempt(self) -> int:
        return status_attempt(self.status)

    @property
    def restarts(self) -> int:
        return int(self.status.get("restarts") or 0)

    @property
    def disruptions(self) -> int:
        return int(self.status.get("disruptions") or 0)

    @property
    def counted_restarts(self) -> int:
        """The restarts backoffLimit counts: all, or with disruptions ignored, those the job caused."""
        return self.restarts - (min(self.disruptions, self.restarts) if self.ignore_disruptions else 0)

    @property
    def releases(self) -> int:
        return int(self.status.get("releases") or 0)

    @property
    def placement_nodes(self) -> tuple[str, ...] | None:
        return status_placement(self.status)


def status_attempt(status: Mapping[str, Any]) -> int:
    return int(status.get("attempt") or 0)


def status_placement(status: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The nodes of the current attempt's admitted gang (index = rank), or None."""
    placement = status.get("placement") or {}
    if placement.get("attempt") != status_attempt(status) or not placement.get("nodes"):
        return None
    return tuple(placement["nodes"])


def status_succeeded_ranks(status: Mapping[str, Any]) -> frozenset[int]:
    """The ranks of the current attempt's gang recorded as finished (``placement.succeededRanks``):
    never created again, so they hold nothing."""
    placement = status.get("placement")
    if not isinstance(placement, dict) or placement.get("attempt") != status_attempt(status):
        return frozenset()
    return frozenset(r for r in placement.get("succeededRanks") or [] if isinstance(r, int))


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(slots=True)
class Plan:
    status: dict[str, Any]
    create_ranks: tuple[int, ...] = ()
    delete_pods: tuple[str, ...] = ()
    # Pods on lost nodes are deleted without grace: no kubelet is left to confirm a graceful stop.
    force_delete: bool = False
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    delete_job: bool = False
    # Capacity was released or a job joined the queue: the gang scheduler should run.
    wake_scheduler: bool = False

    def after(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


# Status fields that only count pods: they change with every pod transition of a starting gang.
COUNT_FIELDS = frozenset({"podCounts", "nodes"})


def counts_only(plan: Plan, current: Mapping[str, Any]) -> bool:
    """Whether ``plan`` does nothing but update pod counts: such a write may wait for the next one."""
    if plan.create_ranks or plan.delete_pods or plan.events or plan.delete_job:
        return False
    changed = {key for key in plan.status.keys() | current.keys() if plan.status.get(key) != current.get(key)}
    return bool(changed) and changed <= COUNT_FIELDS


def gang_position(labels: Mapping[str, str]) -> tuple[int, int] | None:
    """(rank, attempt) of a TrainJob pod from its labels; None for pods without them."""
    try:
        return int(labels[LABEL_NODE_RANK]), int(labels[LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """Reads one pod of a TrainJob; None for pods without largo's labels."""
    metadata = pod.get("metadata") or {}
    position = gang_position(metadata.get("labels") or {})
    if position is None:
        return None
    rank, attempt = position
    status = pod.get("status") or {}
    # The trainer container's exit code speaks for the pod; without it, the first non-zero one.
    codes: dict[str, int] = {}
    ends: dict[str, float | None] = {}
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated is not None:
            codes[str(container.get("name"))] = int(terminated.get("exitCode", 0))
            ends[str(container.get("name"))] = parse_timestamp(terminated.get("finishedAt"))
    exit_code = codes.get(CONTAINER_NAME)
    if exit_code is None and codes:
        exit_code = next((code for code in codes.values() if code != 0), 0)
    since, message, disrupted = None, "", None
    taken: list[float | None] = []  # when it was taken away, by each sign of it
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            since = parse_timestamp(condition.get("lastTransitionTime"))
            message = str(condition.get("message") or "")
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            disrupted = str(condition.get("reason") or "DisruptionTarget")
            taken.append(parse_timestamp(condition.get("lastTransitionTime")))
    deleted = parse_timestamp(metadata.get("deletionTimestamp"))
    if deleted is not None:
        # deletionTimestamp is when the grace period ends: the deletion was asked for that long before.
        taken.append(deleted - float(metadata.get("deletionGracePeriodSeconds") or 0))
    return PodView(
        name=str(metadata.get("name")),
        rank=rank,
        attempt=attempt,
        phase=str(status.get("phase") or "Pending"),
        node_name=(pod.get("spec") or {}).get("nodeName"),
        exit_code=exit_code,
        terminating=metadata.get("deletionTimestamp") is not None,
        unschedulable_since=since,
        unschedulable_message=message,
        cannot_start=cannot_start(status, CONTAINER_NAME),
        disrupted=disrupted,
        uid=str(metadata.get("uid") or ""),
        finished_at=ends.get(CONTAINER_NAME),
        taken_at=_earliest(taken),
    )


def _earliest(times: Sequence[float | None]) -> float | None:
    """The earliest of ``times``; None when there are none or any is unknown (it may be earlier)."""
    known = [t for t in times if t is not None]
    return min(known) if known and len(known) == len(times) else None


# -- the plan --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Builder:
    """Accumulates one cycle's status changes over the job's current status."""

    job: JobView
    now: float
    status: dict[str, Any]
    plan: Plan

    def condition(self, type_: ConditionType, value: bool, reason: Reason, message: str) -> None:
        self.status["conditions"] = set_condition(
            self.status.get("conditions") or [], type_, value, reason, message, self.now, self.job.generation
        )

    def event(self, warning: bool, reason: Reason, message: str) -> None:
        self.plan.events.append(Event("Warning" if warning else "Normal", reason, message))

    def phase(self, phase: Phase) -> None:
        self.status["phase"] = phase

    def forget_creates(self) -> None:
        """Drops ``PodsCreated``: the next attempt's creates start with a clean slate (and, refused,
        a fresh binding timeout), and no earlier attempt's refusal is shown as the job's reason. And an
        edit that waited for the next attempt waits no more (``gang_gone``)."""
        self.status["conditions"] = _without_pods_created(self.status.get("conditions") or [])
        self.gang_gone()

    def gang_gone(self) -> None:
        """No gang runs the spec of before an edit any more: ``PodsUpToDate`` False (``SpecChanged``)
        turns True, or it outlived a suspend and resume and hid the scheduler's reason for the wait."""
        if condition_status(self.status.get("conditions") or [], ConditionType.PODS_UP_TO_DATE) == "False":
            message = "the next attempt runs the current spec"
            self.condition(ConditionType.PODS_UP_TO_DATE, True, Reason.PODS_UP_TO_DATE, message)

    def restart_over(self, reason: Reason, message: str) -> None:
        """``Restarting`` False once the job ends or is suspended before its restarted gang ran."""
        if condition_status(self.status.get("conditions") or [], ConditionType.RESTARTING) == "True":
            self.condition(ConditionType.RESTARTING, False, reason, message)


def plan(
    job: JobView,
    pods: Sequence[PodView],
    unusable_nodes: frozenset[str],
    lost_nodes: frozenset[str],
    now: float,
    timings: Timings | None = None,
    not_ready: Mapping[str, float] | None = None,
) -> Plan:
    """Decides one reconcile cycle of a TrainJob.

    ``lost_nodes``: nodes whose pods are dead (gone, out of service, or not Ready for
    ``timings.node_lost_after``). ``unusable_nodes``: nodes no new pod may land on (also cordoned or
    not Ready at all). ``not_ready``: nodes not Ready but not yet lost, with when each will be.
    """
    timings = timings or Timings()
    status, malformed = sanitize_status(job.status)
    b = _Builder(job, now, status, Plan(status=status))
    if malformed:
        # Written by hand or by an older operator: dropped rather than carried into every write.
        b.event(True, Reason.MALFORMED_STATUS, f"dropped malformed status fields: {', '.join(malformed)}")
    current = [pod for pod in pods if pod.attempt == job.attempt]
    stale = tuple(pod.name for pod in pods if pod.attempt != job.attempt and not pod.terminating)
    phase = job.phase

    if phase in TERMINAL:
        _finished(b, pods)
    elif job.suspend:
        _suspend(b, pods)
    elif phase is None:
        # New: the gang scheduler decides, in one write, whether it starts now or waits (Queued).
        # Writing anything first would only make that write conflict.
        b.plan.wake_scheduler = True
        return b.plan
    elif phase in (Phase.SUSPENDED, Phase.SUSPENDING):
        _enqueue(b, resumed=True)
    elif _deadline_passed(b):
        _fail(
            b,
            Reason.DEADLINE_EXCEEDED,
            f"the job ran longer than activeDeadlineSeconds={job.active_deadline_seconds}",
        )
        b.plan.delete_pods = tuple(pod.name for pod in pods if not pod.terminating)
    elif phase == Phase.RESTARTING:
        _restarting(b, pods, lost_nodes)
    elif phase == Phase.QUEUED:
        _released_backoff(b)
    elif phase in (Phase.STARTING, Phase.RUNNING) and len(job.placement_nodes or ()) == job.num_nodes:
        earlier = [pod for pod in pods if pod.attempt != job.attempt]
        nodes = job.placement_nodes or ()
        _active(b, current, earlier, nodes, unusable_nodes, lost_nodes, timings, not_ready or {})
    elif phase in (Phase.STARTING, Phase.RUNNING):
        # Admitted without a placement for this attempt, or one without a node for every rank (written
        # by hand or lost): queue again.
        _enqueue(b, resumed=False)

    _accept_report(b)
    if b.status.get("phase") == Phase.RUNNING:
        _progress(b, timings.progress_stale_after)
        if phase == Phase.RUNNING:
            _node_readiness(b, current, not_ready or {}, lost_nodes)
    # A node that stays not Ready sends no event when its grace ends: look again then.
    watched = {pod.node_name for pod in pods if pod.node_name} | set(job.placement_nodes or ())
    due = [at for name, at in (not_ready or {}).items() if name in watched]
    if due:
        b.plan.after(max(0.0, min(due) - now))
    if phase not in TERMINAL and not job.suspend and stale:
        b.plan.delete_pods = tuple(dict.fromkeys((*b.plan.delete_pods, *stale)))
    # A pod deleted before its node was lost stays Terminating until the Node object goes: no kubelet
    # confirms it. Restarting, suspending and a new attempt all wait for it, so it is removed at once.
    stuck = tuple(pod.name for pod in pods if pod.terminating and pod.node_name in lost_nodes)
    if stuck:
        b.plan.delete_pods = tuple(dict.fromkeys((*b.plan.delete_pods, *stuck)))
        b.plan.force_delete = True
    _count(b, current)
    if job.generation is not None:
        status["observedGeneration"] = job.generation
    status.update(summary(status.get("conditions") or []))
    check_status(status)
    return b.plan


# What a job's reason says, most telling first: (condition type, the status that makes it the reason).
_SUMMARY_ORDER: tuple[tuple[ConditionType, str], ...] = (
    (ConditionType.FAILED, "True"),
    (ConditionType.COMPLETE, "True"),
    (ConditionType.SUSPENDED, "True"),
    (ConditionType.PODS_CREATED, "False"),
    (ConditionType.RESTARTING, "True"),
    (ConditionType.PODS_UP_TO_DATE, "False"),
    (ConditionType.ADMITTED, "False"),
    (ConditionType.RUNNING, "True"),
    (ConditionType.ADMITTED, "True"),
)


def summary(conditions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``status.reason`` and ``status.message``: why the job is where it is, from its conditions.

    Both the scheduler's and the reconcile's writes carry it, so ``kubectl get tj -o wide`` shows
    what a job waits for or what went wrong without reading the conditions."""
    by_type = {condition.get("type"): condition for condition in conditions}
    for type_, value in _SUMMARY_ORDER:
        condition = by_type.get(type_)
        if condition is not None and condition.get("status") == value:
            return {"reason": condition.get("reason"), "message": condition.get("message")}
    return {"reason": None, "message": None}


def _without_pods_created(conditions: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [c for c in conditions if c.get("type") != ConditionType.PODS_CREATED]


def creation_refused(
    status: Mapping[str, Any], reason: str, message: str, now: float, generation: int | None
) -> tuple[dict[str, Any], bool]:
    """The status patch that records a refused create, and whether it is news (worth an event).

    The condition's transition time is when the refusals began: the gang is released once they
    have lasted the binding timeout (see ``_active``)."""
    conditions = status.get("conditions") or []
    before = next((c for c in conditions if c.get("type") == ConditionType.PODS_CREATED), None)
    news = before is None or before.get("status") != "False" or before.get("message") != message
    admitted_at = parse_timestamp((status.get("placement") or {}).get("admittedAt"))
    since = parse_timestamp((before or {}).get("lastTransitionTime"))
    if before is not None and (
        before.get("reason") not in (Reason.CREATE_REFUSED, Reason.NAME_CONFLICT)
        or (admitted_at is not None and since is not None and since < admitted_at)
    ):
        # False for another reason (waiting for an earlier attempt), or an earlier attempt's refusal:
        # this attempt's refusals' clock starts now.
        conditions = _without_pods_created(conditions)
    updated = set_condition(conditions, ConditionType.PODS_CREATED, False, reason, message, now, generation)
    return {"conditions": updated, **summary(updated)}, news


def _accept_report(b: _Builder) -> None:
    """Copies the runtime's report into ``status.progress``, or says why it was refused.

    A refused report changes nothing else: the previous progress stays, the lifecycle goes on.
    """
    report = b.job.report
    if report is None:
        return
    conditions = b.status.get("conditions") or []
    if report.refused is not None:
        message = f"the runtime's last progress report was refused: {report.refused}"
        if condition_status(conditions, ConditionType.PROGRESS_REPORTED) != "False":
            b.event(True, Reason.INVALID_PROGRESS, message)
        b.condition(ConditionType.PROGRESS_REPORTED, False, Reason.INVALID_PROGRESS, message)
        return
    accepted = report.progress or {}
    current = b.status.get("progress")
    # The report already copied (perhaps marked stale since, which rewrites its summary) is not news.
    if not isinstance(current, Mapping) or _measured(current) != _measured(accepted):
        b.status["progress"] = accepted
    b.condition(
        ConditionType.PROGRESS_REPORTED, True, Reason.PROGRESS_ACCEPTED, "the runtime reports progress"
    )


def _measured(progress: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in progress.items() if key not in ("stale", "summary")}


def _progress(b: _Builder, stale_after: float) -> None:
    """Marks the progress stale when the runtime's reports stopped while the job runs, so that
    ``kubectl get`` never shows frozen progress as current."""
    progress = b.status.get("progress")
    if not isinstance(progress, Mapping) or progress.get("stale"):
        return
    updated = parse_timestamp(progress.get("updatedAt"))
    if updated is None:
        return
    silent = b.now - updated
    if silent < stale_after:
        b.plan.after(stale_after - silent)
        return
    b.status["progress"] = {
        **progress,
        "stale": True,
        "summary": f"stale: no report for {int(silent)}s (last: {progress.get('summary', '')})"[:200],
    }


def _count(b: _Builder, current: Sequence[PodView]) -> None:
    counts = {"pending": 0, "running": 0, "succeeded": 0, "failed": 0}
    for pod in current:
        key = pod.phase.lower()
        if key in counts:
            counts[key] += 1
    b.status["podCounts"] = counts
    b.status["nodes"] = f"{counts['running']}/{b.job.num_nodes}"
    b.status["gpus"] = b.job.num_nodes * b.job.gpus_per_node
    b.status.setdefault("restarts", 0)
    b.status.setdefault("attempt", 0)


def _enqueue(b: _Builder, resumed: bool) -> None:
    b.phase(Phase.QUEUED)
    b.status.pop("placement", None)
    b.gang_gone()
    b.condition(ConditionType.ADMITTED, False, Reason.QUEUED, "waiting for the gang scheduler")
    if resumed:
        # Someone acted on the job: a backoff from before its suspension is over.
        b.status.pop("nextAdmissionTime", None)
        b.status.pop("releases", None)
        # Its pods are gone: the directory is held again from the next admission (which may find it
        # taken by a job that ran meanwhile).
        b.status.pop("checkpointDirectory", None)
        b.condition(ConditionType.SUSPENDED, False, Reason.RESUMED, "the job was resumed")
        b.event(False, Reason.RESUMED, "resumed: queued for admission")
    else:
        b.event(False, Reason.QUEUED, "queued for gang admission")
    b.plan.wake_scheduler = True


def _released_backoff(b: _Builder) -> None:
    """A released gang's backoff: the scheduler leaves the job be until ``nextAdmissionTime``; once it
    passed, or the spec was edited since the release, the time goes and the scheduler is woken."""
    due = parse_timestamp(b.job.status.get("nextAdmissionTime"))
    if due is None:
        return
    edited = b.job.generation is not None and b.job.status.get("observedGeneration") != b.job.generation
    if b.now < due and not edited:
        b.plan.after(due - b.now)
        return
    # Over, or the spec was edited (the fix for what was refused, perhaps): admissible now.
    b.status.pop("nextAdmissionTime", None)
    b.plan.wake_scheduler = True


def _suspend(b: _Builder, pods: Sequence[PodView]) -> None:
    """Suspending while any pod still terminates (its GPUs are not free yet), Suspended once none is left."""
    b.plan.delete_pods = tuple(pod.name for pod in pods if not pod.terminating)
    if b.job.phase not in (Phase.SUSPENDING, Phase.SUSPENDED):
        # A new attempt only for a job that held a gang: one never admitted (created suspended, or
        # suspended while queued) keeps attempt 0, whose admission is its first (largo_queue_wait_seconds).
        held = b.status.pop("placement", None) is not None or bool(pods)
        if held:
            b.status["attempt"] = b.job.attempt + 1
        b.status.pop("queue", None)
        # As for a Kubernetes Job, the deadline counts again from the next start.
        b.status.pop("startTime", None)
        b.condition(ConditionType.ADMITTED, False, Reason.SUSPENDED, "suspended")
        b.condition(ConditionType.RUNNING, False, Reason.SUSPENDED, "suspended")
        b.forget_creates()
        # A pending restart (or a restarted gang not running yet) is the resume now: nothing of it
        # stays to mislead.
        b.status.pop("nextRestartTime", None)
        b.restart_over(Reason.SUSPENDED, "suspended before the restarted gang ran")
        b.plan.wake_scheduler = True
    if pods:
        b.phase(Phase.SUSPENDING)
        b.condition(
            ConditionType.SUSPENDED,
            True,
            Reason.SUSPENDED,
            f"spec.suspend is true: waiting for {len(pods)} pod(s) to terminate before the GPUs are free",
        )
        return
    if b.job.phase == Phase.SUSPENDED:
        return
    b.phase(Phase.SUSPENDED)
    b.condition(
        ConditionType.SUSPENDED, True, Reason.SUSPENDED, "spec.suspend is true: pods deleted, GPUs released"
    )
    b.event(False, Reason.SUSPENDED, "suspended: pods deleted and GPUs released")
    b.plan.wake_scheduler = True


def _deadline_passed(b: _Builder) -> bool:
    deadline = b.job.active_deadline_seconds
    started = parse_timestamp(b.job.status.get("startTime"))
    if deadline is None or started is None:
        return False
    remaining = started + deadline - b.now
    if remaining > 0:
        b.plan.after(remaining)
        return False
    return True


def _fail(b: _Builder, reason: Reason, message: str) -> None:
    b.phase(Phase.FAILED)
    b.status["completionTime"] = timestamp(b.now)
    b.status.pop("nextRestartTime", None)
    b.status.pop("nextAdmissionTime", None)
    b.condition(ConditionType.FAILED, True, reason, message)
    b.condition(ConditionType.RUNNING, False, reason, message)
    b.restart_over(reason, message)
    b.event(True, reason, message)
    b.plan.wake_scheduler = True
    _schedule_ttl(b)


def _schedule_ttl(b: _Builder) -> None:
    ttl = b.job.ttl_seconds_after_finished
    finished = parse_timestamp(b.status.get("completionTime"))
    if ttl is None or finished is None:
        return
    remaining = finished + ttl - b.now
    if remaining <= 0:
        b.plan.delete_job = True
    else:
        b.plan.after(remaining)


def _finished(b: _Builder, pods: Sequence[PodView]) -> None:
    """A finished job holds no GPUs: a failed one's pods that still run are stopped, and so are an
    earlier attempt's, whichever way it ended (their deletion, asked for once before the job ended, may
    have been lost with the write after it, and nothing asked again)."""
    live = [p for p in pods if p.phase in ("Pending", "Running") and not p.terminating]
    failed = b.job.phase == Phase.FAILED
    b.plan.delete_pods = tuple(p.name for p in live if failed or p.attempt != b.job.attempt)
    _schedule_ttl(b)


def _restarting(b: _Builder, pods: Sequence[PodView], lost_nodes: frozenset[str]) -> None:
    alive = [pod for pod in pods if not pod.terminating]
    if alive:
        b.plan.delete_pods = tuple(pod.name for pod in alive)
    if pods:
        # The new gang starts only when the old one is gone: it holds the GPUs until then.
        b.plan.force_delete = any(pod.node_name in lost_nodes for pod in pods)
        return
    due = parse_timestamp(b.job.status.get("nextRestartTime")) or b.now
    if b.now < due:
        b.plan.after(due - b.now)
        return
    b.status.pop("nextRestartTime", None)
    b.phase(Phase.QUEUED)
    b.status.pop("placement", None)
    b.condition(
        ConditionType.ADMITTED, False, Reason.REQUEUED, "back-off over: waiting for the gang scheduler"
    )
    b.event(False, Reason.REQUEUED, f"restart {b.job.restarts}: queued for gang admission")
    b.plan.wake_scheduler = True


def _failure(
    current: Sequence[PodView],
    placement: tuple[str, ...],
    unusable: frozenset[str],
    lost: frozenset[str],
    now: float,
    timings: Timings,
    finished: AbstractSet[int] = frozenset(),
    not_ready: Mapping[str, float] | None = None,
    job: JobView | None = None,
) -> tuple[Reason, str, int | None] | None:
    """The first reason the current gang cannot go on, with the failed pod's exit code if any. Pods that
    ended are looked at in the order they ended (then by rank): the first failure decides, not a
    lower rank that failed later because its peer was gone (its exit code hid a permanent one).

    A pod that failed while a peer's node is not Ready is taken as that node's doing (a collective's
    error once its peer went silent: NCCL's, gloo's): the node's verdict is waited for, a lost node
    being a disruption (``failurePolicy.disruptions``), not a failure of the job, and a node Ready
    again leaving the failure the job's. A permanent exit code is the job's verdict whatever a node
    does."""
    dying = sorted(
        (
            pod
            for pod in current
            if pod.phase in ("Pending", "Running")
            and not pod.terminating
            and pod.node_name is not None
            and (pod.node_name in lost or pod.node_name in (not_ready or {}))
        ),
        key=lambda pod: pod.rank,
    )

    def order(pod: PodView) -> tuple[float, int]:
        ended = pod.finished_at if pod.phase in ("Succeeded", "Failed") else None
        return (math.inf if ended is None else ended, pod.rank)

    for pod in sorted(current, key=order):
        if pod.phase == "Succeeded" and pod.rank in finished:
            continue  # seen ended 0 on its own before: taken away since, it had finished
        if pod.phase in ("Succeeded", "Failed") and pod.taken_away:
            # Taken away (a drain, a preemption, a deletion), not finished: its exit code is how it
            # took the signal it was stopped with (a trainer that saves and exits 0 on SIGTERM too),
            # never the job's verdict on itself, so always a restart.
            why = pod.disrupted or "deleted"
            return Reason.POD_DELETED, f"pod {pod.name} (rank {pod.rank}) was stopped: {why}", None
        permanent = job is not None and pod.exit_code is not None and _permanent(job, pod.exit_code)
        if pod.phase == "Failed" and dying and not permanent:
            peer = dying[0]
            if peer.node_name not in lost:
                return None  # looked at again when the node is due to count as lost
            why = f"gone, out of service, or not Ready for {timings.node_lost_after:g}s"
            message = f"node {peer.node_name} of pod {peer.name} is {why} (pod {pod.name} failed meanwhile)"
            return Reason.NODE_LOST, message, None
        if pod.phase == "Failed":
            return (
                Reason.POD_FAILED,
                f"pod {pod.name} (rank {pod.rank}) failed with exit code {pod.exit_code}",
                pod.exit_code,
            )
        if pod.node_name is not None and pod.node_name in lost and pod.phase in ("Pending", "Running"):
            why = f"gone, out of service, or not Ready for {timings.node_lost_after:g}s"
            return Reason.NODE_LOST, f"node {pod.node_name} of pod {pod.name} is {why}", None
        if pod.node_name is None and not pod.terminating:
            pinned = placement[pod.rank] if pod.rank < len(placement) else None
            if pinned in unusable:
                return (
                    Reason.BINDING_FAILED,
                    f"node {pinned} chosen for rank {pod.rank} can no longer take pods",
                    None,
                )
            if (
                pod.unschedulable_since is not None
                and now - pod.unschedulable_since >= timings.binding_timeout
            ):
                return (
                    Reason.BINDING_FAILED,
                    f"pod {pod.name} could not be bound to {pinned}: {pod.unschedulable_message}",
                    None,
                )
    return None


def _active(
    b: _Builder,
    current: Sequence[PodView],
    earlier: Sequence[PodView],
    placement: tuple[str, ...],
    unusable: frozenset[str],
    lost: frozenset[str],
    timings: Timings,
    not_ready: Mapping[str, float],
) -> None:
    job = b.job
    if "startTime" not in b.status:
        b.status["startTime"] = timestamp(b.now)
    finished = _finished_ranks(b, current)
    failure = (
        _failure(current, placement, unusable, lost, b.now, timings, finished, not_ready, b.job)
        or _refused_too_long(b, timings)
        or _start_timed_out(b, current, finished)
    )
    by_rank = {pod.rank: pod for pod in current}
    if failure is None and job.phase == Phase.STARTING:
        # A node of the placement that can take no pod now (gone, cordoned, not Ready) is no place to
        # create the rest of the gang on: released at once, not after a thousand creates.
        absent = [r for r in range(len(placement)) if r not in by_rank and r not in finished]
        gone = [r for r in absent if placement[r] in unusable]
        if gone:
            reason = f"node {placement[gone[0]]} chosen for rank {gone[0]} can no longer take pods"
            failure = (Reason.BINDING_FAILED, reason, None)
    if failure is None and job.phase == Phase.RUNNING:
        missing = [rank for rank in range(job.num_nodes) if rank not in by_rank and rank not in finished]
        if missing:
            failure = (Reason.POD_DELETED, f"pod of rank {missing[0]} disappeared while the job ran", None)
    if failure is not None:
        _handle_failure(b, current, lost, timings, *failure)
        return

    if job.phase == Phase.STARTING and earlier:
        # Pods of an earlier attempt share the new pods' names and DNS names: the new gang is created
        # whole once they are gone, never one rank beside a sibling's terminating namesake.
        b.condition(
            ConditionType.PODS_CREATED,
            False,
            Reason.PREVIOUS_ATTEMPT_TERMINATING,
            f"waiting for {len(earlier)} pod(s) of an earlier attempt to terminate",
        )
    elif job.phase == Phase.STARTING:
        to_create = tuple(r for r in range(job.num_nodes) if r not in by_rank and r not in finished)
        if to_create and _spec_changed(b):
            # A rank that finished ran the old spec too, though its pod is gone.
            if current or finished:
                message = f"the spec changed before every pod of attempt {job.attempt} was created"
                _handle_failure(b, current, lost, timings, Reason.SPEC_CHANGED, message, None)
                return
            # Nothing of this attempt exists yet: it is simply built from the new spec.
            b.status["placement"] = {**b.status["placement"], "specHash": job.spec_hash}
        b.plan.create_ranks = to_create
        if to_create and "creatingSince" not in b.status["placement"]:
            b.status["placement"] = {**b.status["placement"], "creatingSince": timestamp(b.now)}
        if not b.plan.create_ranks and _pods_created_false(b):
            b.condition(
                ConditionType.PODS_CREATED, True, Reason.PODS_CREATED, f"all {job.num_nodes} pods created"
            )
        # Pods that wait on binding are looked at again when the binding timeout is up.
        waiting = [pod.unschedulable_since for pod in current if pod.unschedulable_since is not None]
        if waiting:
            b.plan.after(max(0.0, min(waiting) + timings.binding_timeout - b.now))
    _spec_in_effect(b)

    # Every rank ended 0 on its own: one that exited 0 because it was taken away did not finish. A
    # rank seen so whose pod is gone since (deleted once finished) counts as done.
    done = [pod for pod in current if pod.phase == "Succeeded" and not pod.taken_away]
    if len(done) == len(current) and finished >= set(range(job.num_nodes)):
        b.phase(Phase.SUCCEEDED)
        b.status["completionTime"] = timestamp(b.now)
        message = f"all {job.num_nodes} pods succeeded"
        b.condition(ConditionType.COMPLETE, True, Reason.SUCCEEDED, message)
        b.condition(ConditionType.RUNNING, False, Reason.SUCCEEDED, message)
        b.restart_over(Reason.SUCCEEDED, message)
        b.event(False, Reason.SUCCEEDED, message)
        b.plan.wake_scheduler = True
        _schedule_ttl(b)
        return
    running = _running_or_done(current, finished)
    stuck = _cannot_start(current)
    if job.phase == Phase.STARTING and stuck:
        message = f"pod {stuck[0].name} cannot start: {stuck[0].cannot_start}"
        if len(stuck) > 1:
            message += f" (and {len(stuck) - 1} more pod(s))"
        told = any(
            c.get("type") == ConditionType.RUNNING and c.get("reason") == Reason.PODS_NOT_STARTING
            for c in b.status.get("conditions") or []
        )
        b.condition(ConditionType.RUNNING, False, Reason.PODS_NOT_STARTING, message)
        if not told:
            b.event(True, Reason.PODS_NOT_STARTING, message)
    if job.phase == Phase.STARTING and running == job.num_nodes:
        b.phase(Phase.RUNNING)
        b.status.pop("releases", None)  # placed and created: the next release waits the shortest
        message = f"all {job.num_nodes} pods running on {listed(sorted(set(placement)))}"
        b.condition(ConditionType.RUNNING, True, Reason.PODS_RUNNING, message)
        b.condition(ConditionType.RESTARTING, False, Reason.PODS_RUNNING, message)
        b.event(False, Reason.PODS_RUNNING, message)


def _finished_ranks(b: _Builder, current: Sequence[PodView]) -> set[int]:
    """The ranks of this attempt that ended 0 on their own, seen now or recorded before in
    ``placement.succeededRanks`` (recorded here when news): Kubernetes deletes a finished pod without
    grace, so once gone it is only known from that record."""
    placement = b.status.get("placement")
    if not isinstance(placement, dict):
        return set()
    recorded = set(status_succeeded_ranks(b.status))
    seen = {pod.rank for pod in current if pod.phase == "Succeeded" and not pod.taken_away}
    if not seen <= recorded:
        b.status["placement"] = {**placement, "succeededRanks": sorted(recorded | seen)}
    return recorded | seen


def _node_readiness(
    b: _Builder, current: Sequence[PodView], not_ready: Mapping[str, float], lost: frozenset[str]
) -> None:
    """A running gang with a live pod on a node that is not Ready (and not yet lost) says so on
    Running, and when it will restart if the node stays so; once its nodes are Ready again, that too.
    A rank that already finished is not waited on: its node does not matter."""
    said = any(
        c.get("type") == ConditionType.RUNNING and c.get("reason") == Reason.NODE_NOT_READY
        for c in b.status.get("conditions") or []
    )
    live = [pod for pod in current if pod.phase in ("Pending", "Running") and not pod.terminating]
    affected = sorted((pod for pod in live if pod.node_name in not_ready), key=lambda pod: pod.rank)
    if affected:
        nodes = sorted({str(pod.node_name) for pod in affected})
        ranks = listed([pod.rank for pod in affected])
        restart = timestamp(min(not_ready[node] for node in nodes))
        message = (
            f"node {listed(nodes)} (rank {ranks}) is not Ready; the gang restarts at {restart} "
            "unless it is Ready again"
        )
        b.condition(ConditionType.RUNNING, True, Reason.NODE_NOT_READY, message)
        if not said:
            b.event(True, Reason.NODE_NOT_READY, message)
    elif said:
        nodes = sorted(set(b.job.placement_nodes or ()))
        running = _running_or_done(current)
        message = f"{running}/{b.job.num_nodes} pods running or done on {listed(nodes)}"
        recovered = not any(pod.node_name in lost or pod.node_name in not_ready for pod in current)
        b.condition(ConditionType.RUNNING, True, Reason.PODS_RUNNING, message)
        if recovered:
            b.event(False, Reason.NODE_READY, f"nodes Ready again: {message}")


def _start_timed_out(
    b: _Builder, current: Sequence[PodView], finished: AbstractSet[int]
) -> tuple[Reason, str, int | None] | None:
    """A gang still starting ``startTimeoutSeconds`` after its admission: a failure, counted as a
    restart (a pod whose image cannot be pulled, a volume that never attaches: waiting on would hold
    the GPUs for good)."""
    limit = b.job.start_timeout_seconds
    admitted = _admitted_at(b)
    if b.job.phase != Phase.STARTING or limit is None or admitted is None:
        return None
    # From when its pods could be created: not the time the previous attempt's took to terminate
    # (a long grace period writing a last checkpoint), which no new pod could shorten. A placement
    # of an earlier version, without the mark, with pods of its own: from the admission.
    placement = b.status.get("placement") or {}
    creating = parse_timestamp(placement.get("creatingSince"))
    if creating is None and not current:
        return None
    admitted = max(admitted, creating or admitted)
    running = _running_or_done(current, finished)
    if running == b.job.num_nodes:
        return None  # every pod runs (or finished): this cycle makes the job Running
    remaining = admitted + limit - b.now
    if remaining > 0:
        b.plan.after(remaining)
        return None
    unbound = [p for p in current if p.node_name is None and p.unschedulable_since is not None]
    if unbound:
        # The placement's failure, not the job's: released and queued again without counting a restart,
        # as the binding timeout does (a start timeout shorter than it came first and counted one).
        pod = min(unbound, key=lambda p: p.rank)
        message = (
            f"pod {pod.name} could not be bound within {limit}s (startTimeoutSeconds): "
            f"{pod.unschedulable_message}"
        )
        return Reason.BINDING_FAILED, message, None
    stuck = _cannot_start(current)
    why = f"; pod {stuck[0].name} cannot start: {stuck[0].cannot_start}" if stuck else ""
    message = f"{running}/{b.job.num_nodes} pods running {limit}s after admission (startTimeoutSeconds){why}"
    return Reason.START_TIMEOUT, message, None


def _running_or_done(current: Sequence[PodView], finished: AbstractSet[int] = frozenset()) -> int:
    """Ranks of the gang that run or finished well: a finished rank still counts as started, also one
    recorded finished (``finished``) whose pod is gone."""
    gone = finished - {pod.rank for pod in current}
    return sum(1 for pod in current if pod.phase in ("Running", "Succeeded")) + len(gone)


def _cannot_start(current: Sequence[PodView]) -> list[PodView]:
    """The pods whose trainer cannot start (``pods.cannot_start``), by rank."""
    return [pod for pod in sorted(current, key=lambda pod: pod.rank) if pod.cannot_start]


def _admitted_at(b: _Builder) -> float | None:
    """When the current attempt was admitted (its placement's ``admittedAt``), if known."""
    return parse_timestamp((b.status.get("placement") or {}).get("admittedAt"))


def _spec_changed(b: _Builder) -> bool:
    """Whether the spec differs from the one the current attempt's pods are built from."""
    recorded = (b.status.get("placement") or {}).get("specHash")
    return b.job.spec_hash is not None and recorded is not None and recorded != b.job.spec_hash


def _spec_in_effect(b: _Builder) -> None:
    """Says when an edit waits for the next attempt: the running gang keeps the spec it started with."""
    if _spec_changed(b):
        b.condition(
            ConditionType.PODS_UP_TO_DATE,
            False,
            Reason.SPEC_CHANGED,
            f"the spec changed after attempt {b.job.attempt} started; the change takes effect at the next "
            "attempt (a gang restart, or suspend and resume)",
        )
    elif condition_status(b.status.get("conditions") or [], ConditionType.PODS_UP_TO_DATE) == "False":
        b.condition(
            ConditionType.PODS_UP_TO_DATE, True, Reason.PODS_UP_TO_DATE, "the pods run the current spec"
        )


def _pods_created_false(b: _Builder) -> bool:
    return condition_status(b.status.get("conditions") or [], ConditionType.PODS_CREATED) == "False"


def _refusal(b: _Builder) -> Mapping[str, Any] | None:
    """The PodsCreated=False condition of the current attempt, if the API server refuses its creates."""
    for condition in b.status.get("conditions") or []:
        if (
            condition.get("type") == ConditionType.PODS_CREATED
            and condition.get("status") == "False"
            and condition.get("reason") in (Reason.CREATE_REFUSED, Reason.NAME_CONFLICT)
        ):
            return dict(condition)
    return None


def _refused_too_long(b: _Builder, timings: Timings) -> tuple[Reason, str, int | None] | None:
    """A gang whose creates the API server has refused for the binding timeout gives its GPUs back."""
    refusal = _refusal(b)
    if refusal is None:
        return None
    since = parse_timestamp(refusal.get("lastTransitionTime")) or b.now
    admitted_at = _admitted_at(b)
    if admitted_at is not None and since < admitted_at:
        return None  # an earlier attempt's refusal (before a suspension, say): this one's creates are new
    remaining = since + timings.binding_timeout - b.now
    if remaining > 0:
        b.plan.after(remaining)
        return None
    reason = Reason.NAME_CONFLICT if refusal.get("reason") == Reason.NAME_CONFLICT else Reason.CREATE_REFUSED
    return reason, str(refusal.get("message") or "the API server refused the gang's pods"), None


# Restarts because Kubernetes took pods away, not because the job failed (failurePolicy.disruptions).
_DISRUPTIONS = frozenset({Reason.POD_DELETED, Reason.NODE_LOST})

# Failures of placement or creation, not of the job: the gang is released and queued again without
# counting a restart.
_RELEASE_REASONS = frozenset(
    {Reason.BINDING_FAILED, Reason.CREATE_REFUSED, Reason.NAME_CONFLICT, Reason.SPEC_CHANGED}
)


def _handle_failure(
    b: _Builder,
    current: Sequence[PodView],
    lost: frozenset[str],
    timings: Timings,
    reason: Reason,
    message: str,
    exit_code: int | None,
) -> None:
    job = b.job
    b.plan.delete_pods = tuple(pod.name for pod in current if not pod.terminating)
    b.plan.force_delete = any(pod.node_name in lost for pod in current)
    if exit_code is not None and _permanent(job, exit_code):
        _fail(b, Reason.PERMANENT_EXIT_CODE, f"{message}; exit code {exit_code} is permanent")
        return
    if reason in _RELEASE_REASONS:
        # Not the job's fault: release the gang and queue it again without counting a restart.
        b.status["attempt"] = job.attempt + 1
        b.phase(Phase.QUEUED)
        b.status.pop("placement", None)
        b.forget_creates()
        queued_again = "gang released and queued again"
        if reason != Reason.SPEC_CHANGED:
            # A refusal that lasts (a quota, a webhook, a node the kube-scheduler keeps refusing) would
            # otherwise take the GPUs back at every pass, a binding timeout each time, ahead of the
            # queue: each release in a row waits longer before its next admission.
            releases = job.releases + 1
            delay = timings.delay(releases)
            b.status["releases"] = releases
            b.status["nextAdmissionTime"] = timestamp(b.now + delay)
            queued_again += f" (release {releases} in a row: admitted again no sooner than in {delay:.0f}s)"
            b.plan.after(delay)
        b.condition(ConditionType.ADMITTED, False, reason, message)
        b.event(True, reason, f"{message}; {queued_again}")
        b.plan.wake_scheduler = True
        return
    disrupted = reason in _DISRUPTIONS
    ignored = disrupted and job.ignore_disruptions
    if not ignored and job.counted_restarts >= job.backoff_limit:
        _fail(b, Reason.BACKOFF_LIMIT_EXCEEDED, f"{message}; backoffLimit {job.backoff_limit} reached")
        return
    restarts = job.restarts + 1
    # Every restart backs off, disruptions too: a node that keeps failing is not retried in a tight loop.
    delay = timings.delay(restarts)
    b.status["restarts"] = restarts
    if disrupted:
        b.status["disruptions"] = job.disruptions + 1
    b.status["attempt"] = job.attempt + 1
    b.status["lastRestartTime"] = timestamp(b.now)
    b.status["nextRestartTime"] = timestamp(b.now + delay)
    b.status.pop("placement", None)
    b.forget_creates()
    b.phase(Phase.RESTARTING)
    b.condition(ConditionType.RESTARTING, True, reason, message)
    b.condition(ConditionType.RUNNING, False, reason, message)
    b.condition(ConditionType.ADMITTED, False, reason, "gang released for restart")
    uncounted = " (a disruption: not counted against backoffLimit)" if ignored else ""
    b.event(
        True, reason, f"{message}; restarting the whole gang (restart {restarts}{uncounted}) in {delay:.0f}s"
    )
    b.plan.wake_scheduler = True
    b.plan.after(delay)


def _permanent(job: JobView, exit_code: int) -> bool:
    if exit_code in job.permanent_exit_codes:
        return True
    return bool(job.retryable_exit_codes) and exit_code not in job.retryable_exit_codes
