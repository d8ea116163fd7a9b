"""One InferenceService cycle, decided purely: the service, its pods and its model's source in; the new
status, the pods to create and delete, and the events out.

Replica groups live in ``status.groups``. A group without nodes waits for the gang scheduler, which
admits it whole and writes its nodes; this plan then creates its pods, watches them, and restarts the
whole group when a member fails or its node is lost (a pipeline missing a stage cannot serve). How
many groups exist, and at which revision, is ``largo.policy.rollout``'s call; the groups it retires are
drained (their pods deleted, each finishing its requests within its grace period) and dropped from the
status once their pods are gone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from largo.api.v1alpha1 import (
    MAX_SCALING_DECISIONS,
    InferenceServiceSpec,
    ServiceConditionType,
    ServicePhase,
    ServiceReason,
)
from largo.api.v1alpha1 import Phase as JobPhase
from largo.manifests.inferenceservice import ModelMount
from largo.manifests.names import (
    LABEL_ATTEMPT,
    LABEL_MEMBER,
    LABEL_REPLICA,
    LABEL_REVISION,
    SERVER_CONTAINER_NAME,
    member_pod_name,
)
from largo.policy.conditions import parse_timestamp, set_condition, timestamp
from largo.policy.pods import cannot_start
from largo.policy.rollout import GroupState, plan_rollout

# A failed group waits base * 2**(restarts-1), capped, before it queues again.
RESTART_BACKOFF_BASE = 1.0
# As kubelet's CrashLoopBackOff: a group that keeps failing (a stalled rollout's new revision, say)
# is started again every five minutes at most, not every minute with an event and an admission each.
RESTART_BACKOFF_CAP = 300.0
# Group restarts of the new revision after which a rollout counts as stalled.
STALL_AFTER_RESTARTS = 3
# How long after the autoscaler wrote its note a change of the desired replicas is taken for its: the
# reconcile that sees its write follows within seconds.
SCALING_NOTE_SECONDS = 300.0
# Progressing reasons of a rollout under way (plan_rollout's): it stays one until it completes.
ROLLOUT_REASONS = frozenset({"RollingOut", "RolloutStalled", "ProgressDeadlineExceeded"})


# -- the model's source ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelResolution:
    """What spec.model resolves to now: a mount (ModelReady) or why there is none yet."""

    mount: ModelMount | None
    reason: str
    message: str


def rollout_under_way(status: Mapping[str, Any], now: float, deadline: float) -> bool:
    """Whether the service is still moving to its current revision, and well: old groups are still
    being replaced, or groups of it are loading (admitted, not ready, within ``deadline``), while some
    group of it has GPUs and is within its deadline; Progressing is not False (stalled) and no group
    of it failed since it last served. A followed
    checkpoint waits for it: each newer step retired the half-loaded groups of the one before, so
    checkpoints written faster than a model loads were never served. Groups waiting for GPUs, a
    stalled or failing rollout, or one past its deadline hold nothing back."""
    progressing: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == ServiceConditionType.PROGRESSING), {}
    )
    if progressing.get("status") == "False":
        return False
    revision = status.get("revision")
    live = [group for group in status.get("groups") or [] if not group.get("retiring")]
    current = [group for group in live if group.get("revision") == revision]
    if any(group.get("failures") for group in current):
        return False
    # Only groups of it that have GPUs and are within their deadline move it on: one waiting for
    # GPUs may wait for ever, and one past its deadline is stuck.
    if not any(group.get("nodes") and _unready_for(group, now) < deadline for group in current):
        return False
    replacing = any(group.get("revision") != revision for group in live)
    loading = any(0 < _unready_for(group, now) < deadline for group in current)
    return replacing or loading


def resolve_model(
    spec: InferenceServiceSpec,
    served: Mapping[str, Any] | None,
    train_job: Mapping[str, Any] | None,
    hold_newer: bool = False,
) -> ModelResolution:
    """``served``: status.model as last written; ``train_job``: the referenced TrainJob's body, if any.

    A TrainJob's newest complete checkpoint is the step its runtime last reported as checkpointed.
    Without ``follow`` the step first served stays pinned; with it, each newer step becomes a new
    revision (and so a rollout), once the rollout to the one before is over (``hold_newer`` while it
    is not: ``rollout_under_way``)."""
    source = spec.model
    if source.claim_name is not None:
        mount = ModelMount(claim_name=source.claim_name, sub_path=source.path)
        return ModelResolution(mount, ServiceReason.MODEL_RESOLVED, f"serving claim {mount.summary()}")
    reference = source.from_train_job
    assert reference is not None  # the model's validator allows exactly one source
    pinned = _pinned(served, reference.name)
    if train_job is None:
        if pinned is not None:
            return ModelResolution(
                pinned,
                ServiceReason.TRAIN_JOB_NOT_FOUND,
                f"TrainJob {reference.name} is gone; still serving {pinned.summary()}",
            )
        return ModelResolution(
            None, ServiceReason.TRAIN_JOB_NOT_FOUND, f"TrainJob {reference.name} not found"
        )
    job_spec = train_job.get("spec") or {}
    checkpoint = job_spec.get("checkpoint") or {}
    if not checkpoint.get("claimName") and pinned is not None:
        return ModelResolution(
            pinned,
            ServiceReason.TRAIN_JOB_WITHOUT_CHECKPOINT,
            f"TrainJob {reference.name} has no spec.checkpoint now; still serving {pinned.summary()}",
        )
    if not checkpoint.get("claimName"):
        return ModelResolution(
            None,
            ServiceReason.TRAIN_JOB_WITHOUT_CHECKPOINT,
            f"TrainJob {reference.name} has no spec.checkpoint: it writes no checkpoint to serve",
        )
    job_status = train_job.get("status") or {}
    step = (job_status.get("progress") or {}).get("checkpointStep")
    if not isinstance(step, int) and pinned is not None:
        # A restarted or resumed job reports no step until it writes its next checkpoint, and a failed
        # one may never again: what is served stays (dropping it would stop every scale and restart).
        failed = job_status.get("phase") == JobPhase.FAILED
        return ModelResolution(
            pinned,
            ServiceReason.TRAIN_JOB_FAILED if failed else ServiceReason.MODEL_RESOLVED,
            f"TrainJob {reference.name} failed; still serving {pinned.summary()}"
            if failed
            else f"serving {pinned.summary()}; TrainJob {reference.name} has reported no newer "
            "checkpoint since it last started",
        )
    if not isinstance(step, int):
        if job_status.get("phase") == JobPhase.FAILED:
            return ModelResolution(
                None,
                ServiceReason.TRAIN_JOB_FAILED,
                f"TrainJob {reference.name} failed without a complete checkpoint",
            )
        return ModelResolution(
            None,
            ServiceReason.WAITING_FOR_CHECKPOINT,
            f"waiting for TrainJob {reference.name} to write its first complete checkpoint",
        )
    newest = ModelMount(
        claim_name=str(checkpoint["claimName"]),
        sub_path=checkpoint.get("subPath"),
        step=step,
        train_job=reference.name,
    )
    mode = "following the job's checkpoints" if reference.follow else "pinned: follow is off"
    if pinned is not None and pinned.claim_name == newest.claim_name and not reference.follow:
        return ModelResolution(pinned, ServiceReason.MODEL_RESOLVED, f"serving {pinned.summary()} ({mode})")
    if pinned is not None and pinned.step is not None and step > pinned.step and hold_newer:
        return ModelResolution(
            pinned,
            ServiceReason.MODEL_RESOLVED,
            f"serving {pinned.summary()} ({mode}); "
            "a newer checkpoint is rolled out once this rollout is over",
        )
    if pinned is not None and pinned.step is not None and step > pinned.step:
        return ModelResolution(
            newest, ServiceReason.NEWER_CHECKPOINT, f"rolling out {newest.summary()} (was step {pinned.step})"
        )
    same_directory = pinned is not None and (pinned.claim_name, pinned.sub_path) == (
        newest.claim_name,
        newest.sub_path,
    )
    if pinned is not None and pinned.step is not None and step < pinned.step and same_directory:
        return ModelResolution(
            newest,
            ServiceReason.OLDER_CHECKPOINT,
            f"rolling back to {newest.summary()} (was step {pinned.step}): the job's newest checkpoint is "
            "older than the one served (it went back to an earlier one)",
        )
    return ModelResolution(newest, ServiceReason.MODEL_RESOLVED, f"serving {newest.summary()} ({mode})")


def _pinned(served: Mapping[str, Any] | None, job: str) -> ModelMount | None:
    if not served or served.get("trainJob") != job or not served.get("claimName"):
        return None
    step = served.get("checkpointStep")
    return ModelMount(
        claim_name=str(served["claimName"]),
        sub_path=served.get("path"),
        step=step if isinstance(step, int) else None,
        train_job=job,
    )


def served_model(mount: ModelMount) -> dict[str, Any]:
    """status.model for ``mount``."""
    out: dict[str, Any] = {"claimName": mount.claim_name, "summary": mount.summary()}
    if mount.sub_path:
        out["path"] = mount.sub_path
    if mount.train_job is not None:
        out["trainJob"] = mount.train_job
    if mount.step is not None:
        out["checkpointStep"] = mount.step
    return out


# -- replicas ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DesiredReplicas:
    replicas: int
    limited: bool
    message: str


def desired_replicas(spec: InferenceServiceSpec) -> DesiredReplicas:
    """spec.replicas, within autoscaling's bounds when it is on (largo owns the field then): a write
    through /scale outside them is clamped, and the condition says so."""
    wanted = spec.replicas
    scaling = spec.autoscaling
    if scaling is None:
        return DesiredReplicas(wanted, False, f"spec.replicas is {wanted}; no autoscaling bounds")
    low = 0 if scaling.scale_to_zero and wanted == 0 else scaling.min_replicas
    clamped = min(max(wanted, low), scaling.max_replicas)
    if clamped != wanted:
        bound = "maxReplicas" if wanted > clamped else "minReplicas"
        return DesiredReplicas(
            clamped,
            True,
            f"spec.replicas {wanted} is outside autoscaling "
            f"[{scaling.min_replicas}, {scaling.max_replicas}]: clamped to {bound} {clamped}",
        )
    return DesiredReplicas(
        wanted, False, f"{wanted} within autoscaling [{scaling.min_replicas}, {scaling.max_replicas}]"
    )


# -- pods -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberPod:
    name: str
    replica: int
    member: int
    attempt: int
    revision: str
    phase: str
    ready: bool
    node_name: str | None
    terminating: bool
    # Since when kube-scheduler says the pod cannot go to its pinned node, and why.
    unschedulable_since: float | None = None
    unschedulable_message: str = ""
    # Why its server container cannot start, as the kubelet says (``pods.cannot_start``).
    cannot_start: str | None = None
    # The pod's uid: its name comes back with the group's next attempt.
    uid: str = ""


def member_pod(pod: Mapping[str, Any]) -> MemberPod | None:
    """Reads one pod of an InferenceService; None for a pod without largo's labels."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    try:
        replica, member, attempt = (
            int(labels[LABEL_REPLICA]),
            int(labels[LABEL_MEMBER]),
            int(labels[LABEL_ATTEMPT]),
        )
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    since, message = None, ""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            since = parse_timestamp(condition.get("lastTransitionTime"))
            message = str(condition.get("message") or "")
    return MemberPod(
        name=str(metadata.get("name")),
        replica=replica,
        member=member,
        attempt=attempt,
        revision=str(labels.get(LABEL_REVISION, "")),
        phase=str(status.get("phase") or "Pending"),
        ready=ready,
        node_name=(pod.get("spec") or {}).get("nodeName"),
        terminating=metadata.get("deletionTimestamp") is not None,
        unschedulable_since=since,
        unschedulable_message=message,
        cannot_start=cannot_start(status, SERVER_CONTAINER_NAME),
        uid=str(metadata.get("uid") or ""),
    )


# -- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateMember:
    replica: int
    member: int
    node: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass
class ServicePlan:
    status: dict[str, Any]
    create: list[CreateMember] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    # Pods on lost nodes: deleted without grace, or they would stay Terminating for ever.
    force_delete: set[str] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)
    # The model every new group is built from (None: no group can be built yet).
    model: ModelMount | None = None
    wake_scheduler: bool = False
    requeue_after: float | None = None


@dataclass(frozen=True, slots=True)
class ServiceView:
    name: str
    namespace: str
    spec: InferenceServiceSpec
    generation: int | None
    status: Mapping[str, Any]
    # The revision of groups built now (from spec and the resolved model); None without a model.
    revision: str | None
    # What the autoscaler said when it last set spec.replicas: {to, reason, metricValue, time}.
    scaling_note: Mapping[str, Any] | None = None
    # How long a member may stay unschedulable on its pinned node before its group is placed again.
    binding_timeout: float = 30.0
    # Remove pods of no known group (False when some group entry could not be read).
    sweep_leftovers: bool = True


def _unready_for(group: Mapping[str, Any], now: float) -> float:
    """Seconds the admitted group has not been ready: since its admission if it never was in this
    attempt, else since it last stopped being ready (a blink is not a slow start; a readiness lost for
    good is as stuck as one never reached). 0 when ready or not admitted."""
    since = parse_timestamp(group.get("unreadySince")) or parse_timestamp(group.get("admittedAt"))
    if group.get("ready") or not group.get("nodes") or since is None:
        return 0.0
    return max(0.0, now - since)


def _backoff(failures: int) -> float:
    """The wait before a group's next start, after ``failures`` failures in a row (since it last
    served): a group that served a while and fails once starts again at once."""
    return float(min(RESTART_BACKOFF_BASE * 2 ** min(max(failures - 1, 0), 64), RESTART_BACKOFF_CAP))


def _refused_since(group: Mapping[str, Any], attempt: int) -> float | None:
    """When the API server began refusing this attempt's pods (``group_creation_refused``), if it does."""
    refusal = group.get("createRefused")
    if not isinstance(refusal, Mapping) or refusal.get("attempt") != attempt:
        return None
    return parse_timestamp(refusal.get("since"))


def group_creation_refused(
    status: Mapping[str, Any], refused: Mapping[int, int], reason: str, message: str, now: float
) -> tuple[list[dict[str, Any]], bool]:
    """The status's groups with a refused create recorded on each group of ``refused`` (replica ->
    attempt whose pods were refused), and whether it is news (worth an event). ``since`` stays when the
    refusals began: ``plan`` releases the group's GPUs once they have lasted the binding timeout."""
    groups = [dict(group) for group in status.get("groups") or []]
    news = False
    for group in groups:
        attempt = refused.get(int(group.get("replica", -1)))
        if attempt is None or int(group.get("attempt") or 0) != attempt or not group.get("nodes"):
            continue
        before = group.get("createRefused") if _refused_since(group, attempt) is not None else None
        since = before.get("since") if isinstance(before, Mapping) else timestamp(now)
        news = news or not isinstance(before, Mapping) or before.get("message") != message
        group["createRefused"] = {"attempt": attempt, "since": since, "reason": reason, "message": message}
    return groups, news


def plan(
    view: ServiceView,
    resolution: ModelResolution,
    pods: Sequence[MemberPod],
    lost_nodes: frozenset[str],
    now: float,
    selector: str,
    url: str,
) -> ServicePlan:
    status = dict(view.status)
    spec = view.spec
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
    generation = view.generation
    out = ServicePlan(status={}, model=resolution.mount)
    by_group: dict[int, list[MemberPod]] = {}
    for pod in pods:
        by_group.setdefault(pod.replica, []).append(pod)
        if pod.node_name in lost_nodes:
            # No kubelet will confirm its end: remove it now (the group's restart below decides why).
            out.delete.append(pod.name)
            out.force_delete.add(pod.name)

    groups: list[dict[str, Any]] = [dict(g) for g in status.get("groups") or []]
    kept: list[dict[str, Any]] = []
    # Groups restarted in this cycle: the index of the event that says so, and why.
    restarted: dict[int, tuple[int, str]] = {}
    for group in groups:
        replica, attempt = int(group["replica"]), int(group.get("attempt") or 0)
        members = by_group.get(replica, [])
        if group.get("retiring"):
            # Drained and deleted: the group leaves the status once its last pod is gone.
            out.delete += [p.name for p in members if not p.terminating]
            if members:
                kept.append(group)
            continue
        # A pod of another attempt or revision under this group's name is a leftover (an earlier group
        # with the same id, dropped while the pod index lagged): never a member.
        revision = str(group.get("revision"))
        stale = [p for p in members if p.attempt != attempt or p.revision != revision]
        current = {p.member: p for p in members if p.attempt == attempt and p.revision == revision}
        out.delete += [p.name for p in stale if not p.terminating]
        nodes = list(group.get("nodes") or [])
        if not nodes:
            group["ready"] = False
            kept.append(group)
            continue
        # A server never ends by itself: a member that exited, however, is gone from the pipeline.
        failed = [p for p in current.values() if p.phase in ("Failed", "Succeeded") or p.terminating]
        lost = sorted({n for n in nodes if n in lost_nodes})
        unbound = [
            p
            for p in current.values()
            if p.phase == "Pending"
            and p.unschedulable_since is not None
            and now - p.unschedulable_since >= view.binding_timeout
        ]
        # A pod that waits sends no event when the binding timeout ends.
        for pod in current.values():
            if pod.phase == "Pending" and pod.unschedulable_since is not None and pod not in unbound:
                out.requeue_after = _soonest(
                    out.requeue_after, pod.unschedulable_since + view.binding_timeout - now
                )
        refused = _refused_since(group, attempt) if len(current) < len(nodes) else None
        if current and len(current) == len(nodes):
            group.pop("createRefused", None)  # every member exists: whatever was refused got through
        refused_too_long = refused is not None and now - refused >= view.binding_timeout
        if refused is not None and not refused_too_long:
            out.requeue_after = _soonest(out.requeue_after, refused + view.binding_timeout - now)
        # Once every member has existed, one missing was deleted while nobody looked (its whole
        # termination fell between two reconciles, or it was removed at once): the pipeline it was a
        # stage of is broken, so it is never recreated alone.
        # (A group of an older revision or shape missing one makes way for a new one instead: below.)
        buildable = group.get("revision") == view.revision and len(nodes) == spec.nodes_per_replica
        watched = bool(group.get("formed")) and buildable
        vanished = [m for m in range(len(nodes)) if m not in current] if watched else []
        if len(current) == len(nodes):
            group["formed"] = True
        if failed or lost or vanished or unbound or refused_too_long:
            if failed:
                pod = failed[0]
                what = "was deleted" if pod.terminating else pod.phase.lower()
                cause = f"member {pod.member} ({pod.name}) {what}"
            elif lost:
                cause = f"node {', '.join(lost)} lost"
            elif vanished:
                cause = f"member {vanished[0]} ({member_pod_name(view.name, replica, vanished[0])}) is gone"
            elif unbound:
                pod = unbound[0]
                cause = (
                    f"member {pod.member} ({pod.name}) could not be bound to {nodes[pod.member]} for "
                    f"{view.binding_timeout:.0f}s: {pod.unschedulable_message}"
                )
            else:
                # Its GPUs were held for pods that never came: give them back, try again after a backoff.
                cause = (
                    f"its pods were refused for {view.binding_timeout:.0f}s: "
                    f"{group['createRefused'].get('message')}"
                )
            group.pop("createRefused", None)
            restarts = int(group.get("restarts") or 0) + 1
            failures = int(group.get("failures") or 0) + 1
            after = now + _backoff(failures)
            out.delete += [p.name for p in current.values() if not p.terminating]
            group.update(
                attempt=attempt + 1,
                nodes=[],
                ready=False,
                formed=False,
                restarts=restarts,
                failures=failures,
                admittedAt=None,
                unreadySince=None,
                restartAfter=timestamp(after),
                queuedAt=timestamp(after),
            )
            # Told once the rollout has decided: a group it retires in this cycle is not restarted.
            restarted[replica] = (len(out.events), cause)
            out.events.append(
                Event(
                    "Warning",
                    ServiceReason.GROUP_RESTARTED,
                    f"replica {replica} restarted whole (restart {restarts}): {cause}",
                )
            )
            out.requeue_after = _soonest(out.requeue_after, after - now)
            kept.append(group)
            continue
        missing = [member for member in range(len(nodes)) if member not in current]
        if missing and (group.get("revision") != view.revision or len(nodes) != spec.nodes_per_replica):
            # Only the current revision's pods can be built: a group of an older one that lacks a
            # member (admitted before the spec changed, or a member deleted) makes way for a new one;
            # so does one admitted on as many nodes as a spec in between asked for (nodesPerReplica
            # 2 -> 4 -> 2: its revision is current again, but it has 4 nodes and members 2 and 3
            # cannot be built).
            group.update(retiring=True, ready=False)
            out.delete += [p.name for p in current.values() if not p.terminating]
            gone = ", ".join(member_pod_name(view.name, replica, m) for m in missing)
            out.events.append(
                Event(
                    "Normal",
                    ServiceReason.GROUP_RETIRED,
                    f"replica {replica} retired: {gone} is gone and a group of an earlier spec is not "
                    "rebuilt",
                )
            )
            if members:
                kept.append(group)
            continue
        if not stale:
            out.create += [CreateMember(replica, member, nodes[member], attempt) for member in missing]
        group["ready"] = len(current) == len(nodes) and all(
            p.phase == "Running" and p.ready for p in current.values()
        )
        if not group["ready"]:
            if group.pop("readySince", None) and not group.get("unreadySince"):
                group["unreadySince"] = timestamp(now)
        else:
            group.pop("unreadySince", None)
            if not group.get("readySince"):
                group["readySince"] = timestamp(now)
        if group.get("failures") and _available(group, spec.rollout.min_ready_seconds, now):
            # Serving (for minReadySeconds): earlier failures no longer say the group cannot start.
            group["failures"] = 0
        kept.append(group)

    # Pods of no group at all (their group left the status while the pod index lagged): removed.
    known = {int(g["replica"]) for g in kept} if view.sweep_leftovers else set(by_group)
    out.delete += [
        p.name for replica, ps in by_group.items() if replica not in known for p in ps if not p.terminating
    ]

    # How many groups, at which revision: the rollout's call, over the groups that are not leaving.
    desired = desired_replicas(spec)
    live = [g for g in kept if not g.get("retiring")]
    progressing: tuple[bool, str, str]
    retire: set[int] = set()
    create = 0
    if view.revision is None:
        progressing = (False, resolution.reason, resolution.message)
        # No group can be built without a model, but a scale-down (or to zero) still frees GPUs:
        # the surplus goes, not-ready first, then the highest replica id (as plan_rollout orders it).
        surplus = max(0, len(live) - desired.replicas)
        order = sorted(live, key=lambda g: (bool(g.get("ready")), bool(g.get("nodes")), -int(g["replica"])))
        retire = {int(g["replica"]) for g in order[:surplus]}
    else:
        was = next((c for c in conditions if c.get("type") == ServiceConditionType.PROGRESSING), {})
        # A rollout is under way while an old group is left, draining ones too, and after that until it
        # completes: when maxUnavailable let every old group go before its replacement was ready, a new
        # revision that never became ready (or kept failing) was no rollout any more, and never stalled.
        old_left = any(g.get("revision") != view.revision for g in kept)
        rolling = old_left or was.get("reason") in ROLLOUT_REASONS
        step = plan_rollout(
            [
                GroupState(
                    int(g["replica"]),
                    str(g["revision"]),
                    # minReadySeconds holds back the new revision's groups only: an old one that
                    # serves is never taken for idle.
                    _available(
                        g, spec.rollout.min_ready_seconds if g["revision"] == view.revision else 0, now
                    ),
                    # Failures since the group last served, and only while a rollout is under way:
                    # a group that keeps failing outside one is restarted, never a reason to stop scaling.
                    int(g.get("failures") or 0) if rolling and not g.get("ready") else 0,
                    # Likewise the progress deadline: a slow start outside a rollout stops nothing.
                    _unready_for(g, now) if rolling else 0.0,
                    serving=bool(g.get("ready")),
                    placed=bool(g.get("nodes")),
                )
                for g in live
            ],
            desired.replicas,
            view.revision,
            spec.rollout.max_surge,
            spec.rollout.max_unavailable,
            STALL_AFTER_RESTARTS,
            spec.rollout.progress_deadline_seconds,
            rolling_out=rolling,
        )
        # A group that is not ready sends no event when its deadline passes: look again then.
        deadline = spec.rollout.progress_deadline_seconds
        for g in live if rolling else ():
            waited = _unready_for(g, now)
            if g.get("revision") == view.revision and 0 < waited < deadline:
                out.requeue_after = _soonest(out.requeue_after, deadline - waited)
        progressing = (not step.stalled, step.reason, step.message)
        if step.stalled and was.get("reason") != step.reason:
            # Said once, when it stalls: the old groups keep serving and nothing more happens.
            out.events.append(Event("Warning", step.reason, step.message))
        retire, create = set(step.retire), step.create
    for group in live:
        if int(group["replica"]) in retire:
            group["retiring"] = True
            group["ready"] = False
            out.delete += [p.name for p in by_group.get(int(group["replica"]), []) if not p.terminating]
            out.create = [c for c in out.create if c.replica != int(group["replica"])]
            said = restarted.get(int(group["replica"]))
            if said is not None:
                # Failed and retired in one cycle (a group of the revision being replaced): one event,
                # saying why, rather than a restart that does not happen.
                index, cause = said
                why = f"replica {group['replica']} retired: {cause}"
                out.events[index] = Event("Normal", ServiceReason.GROUP_RETIRED, why)
                continue
            out.events.append(
                Event(
                    "Normal",
                    ServiceReason.GROUP_RETIRED,
                    f"replica {group['replica']} drained and removed",
                )
            )
    taken = {int(g["replica"]) for g in kept} | set(by_group)
    for _ in range(create):
        replica = next(i for i in range(len(taken) + 1) if i not in taken)
        taken.add(replica)
        kept.append(
            {
                "replica": replica,
                "revision": view.revision,
                "attempt": 0,
                "nodes": [],
                "queuedAt": timestamp(now),
                "ready": False,
                "restarts": 0,
            }
        )
    if create:
        out.wake_scheduler = True
    kept.sort(key=lambda g: int(g["replica"]))
    if any(not g.get("nodes") and not g.get("retiring") for g in kept):
        # Restarted groups rejoin the queue when their back-off ends: the scheduler must look then.
        out.wake_scheduler = True

    live = [g for g in kept if not g.get("retiring")]
    ready = sum(1 for g in live if g.get("ready"))
    updated = sum(1 for g in live if g.get("revision") == view.revision)
    replicas = len(live)
    before_model = next((c for c in conditions if c.get("type") == ServiceConditionType.MODEL_READY), {})
    if (before_model.get("reason"), before_model.get("message")) != (resolution.reason, resolution.message):
        # Said once per change, in `kubectl describe`: what is served now, or why nothing can be.
        fine = resolution.mount is not None and resolution.reason != ServiceReason.OLDER_CHECKPOINT
        waiting = fine or resolution.reason == ServiceReason.WAITING_FOR_CHECKPOINT
        out.events.append(Event("Normal" if waiting else "Warning", resolution.reason, resolution.message))
    conditions = set_condition(
        conditions,
        ServiceConditionType.MODEL_READY,
        resolution.mount is not None,
        resolution.reason,
        resolution.message,
        now,
        generation,
    )
    conditions = set_condition(
        conditions,
        ServiceConditionType.PROGRESSING,
        progressing[0],
        progressing[1],
        progressing[2],
        now,
        generation,
    )
    conditions = set_condition(
        conditions,
        ServiceConditionType.SCALING_LIMITED,
        desired.limited,
        ServiceReason.CLAMPED if desired.limited else ServiceReason.WITHIN_BOUNDS,
        desired.message,
        now,
        generation,
    )
    all_ready = ready >= desired.replicas and desired.replicas > 0
    if desired.replicas == 0:
        phase, ready_reason, ready_message = (
            ServicePhase.SCALED_TO_ZERO,
            ServiceReason.SCALED_TO_ZERO,
            "0 replicas wanted",
        )
    elif all_ready:
        phase, ready_reason = ServicePhase.READY, ServiceReason.ALL_REPLICAS_READY
        ready_message = f"{ready}/{desired.replicas} replicas ready"
    else:
        phase = ServicePhase.DEGRADED if ready > 0 else ServicePhase.PENDING
        ready_reason = ServiceReason.REPLICAS_NOT_READY
        ready_message = (
            f"{ready}/{desired.replicas} replicas ready" + _waiting_summary(kept) + _stuck_summary(kept, pods)
        )
    conditions = set_condition(
        conditions, ServiceConditionType.READY, all_ready, ready_reason, ready_message, now, generation
    )
    scaling = list(status.get("scaling") or [])
    before = status.get("desiredReplicas")
    if isinstance(before, int) and before != desired.replicas:
        note = view.scaling_note or {}
        # A note credits one change only, the first after it was written and soon after: an old one
        # whose number a later change (an HPA's, `kubectl scale`, new bounds) matches is not its reason.
        last = parse_timestamp(scaling[-1].get("time")) if scaling else None
        written = parse_timestamp(note.get("time"))
        # Times are whole seconds: a note of the same second as the last change is still new.
        fresh = written is not None and now - written <= SCALING_NOTE_SECONDS
        unused = fresh and written is not None and (last is None or written >= last)
        by_autoscaler = (
            note.get("to") == desired.replicas
            and unused
            and not desired.limited
            and spec.autoscaling is not None
        )
        value = note.get("metricValue") if by_autoscaler else None
        scaling.append(
            {
                "time": timestamp(now),
                "from": before,
                "to": desired.replicas,
                "reason": str(note.get("reason"))[:1024] if by_autoscaler else _scale_reason(spec, desired),
                **({"metricValue": float(value)} if isinstance(value, int | float) else {}),
            }
        )
        scaling = scaling[-MAX_SCALING_DECISIONS:]
        out.events.append(
            Event(
                "Normal",
                ServiceReason.SCALED,
                f"replicas {before} -> {desired.replicas}: {scaling[-1]['reason']}",
            )
        )
    reason, message = _summary(conditions)
    out.status = {
        "phase": phase,
        "reason": reason,
        "message": message,
        "conditions": conditions,
        "observedGeneration": generation,
        "replicas": replicas,
        "desiredReplicas": desired.replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "ready": f"{ready}/{desired.replicas}",
        "selector": selector,
        "url": url,
        "groups": kept,
        "scaling": scaling,
        **({"revision": view.revision} if view.revision is not None else {}),
        **(
            {"model": _model_status(resolution.mount)}
            if resolution.mount is not None
            else ({"model": status["model"]} if status.get("model") else {})
        ),
    }
    out.status = {k: v for k, v in out.status.items() if v is not None}
    # Groups ready but not yet for minReadySeconds are looked at again when they have been.
    for group in kept:
        since = parse_timestamp(group.get("readySince"))
        if since is not None and now - since < spec.rollout.min_ready_seconds:
            out.requeue_after = _soonest(out.requeue_after, since + spec.rollout.min_ready_seconds - now)
    # Groups waiting out a restart back-off are looked at again when it ends.
    for group in kept:
        until = parse_timestamp(group.get("restartAfter"))
        if until is not None and until > now:
            out.requeue_after = _soonest(out.requeue_after, until - now)
    return out


def _available(group: Mapping[str, Any], min_ready_seconds: int, now: float) -> bool:
    """Ready for ``min_ready_seconds`` at least: what a rollout counts on before it retires an old group
    (a server that crashes soon after its first ready moment never counts)."""
    since = parse_timestamp(group.get("readySince"))
    return bool(group.get("ready")) and since is not None and now - since >= min_ready_seconds


def _model_status(mount: ModelMount) -> dict[str, Any]:
    return served_model(mount)


def _soonest(current: float | None, delay: float) -> float:
    soon = max(delay, 0.1)
    return soon if current is None else min(current, soon)


def _waiting_summary(groups: Sequence[Mapping[str, Any]]) -> str:
    """Why the first queued group waits, for status.message."""
    for group in groups:
        queue = group.get("queue") or {}
        if not group.get("nodes") and not group.get("retiring") and queue.get("message"):
            return f"; replica {group['replica']} waits: {queue['message']}"
    return ""


def _stuck_summary(groups: Sequence[Mapping[str, Any]], pods: Sequence[MemberPod]) -> str:
    """The first pod of a group not leaving whose server cannot start (a wrong image, a missing
    Secret), for status.message: waiting will not mend it."""
    staying = {int(group["replica"]) for group in groups if not group.get("retiring")}
    for pod in sorted(pods, key=lambda pod: (pod.replica, pod.member)):
        if pod.replica in staying and pod.cannot_start and not pod.terminating:
            return f"; pod {pod.name} cannot start: {pod.cannot_start}"
    return ""


def _scale_reason(spec: InferenceServiceSpec, desired: DesiredReplicas) -> str:
    if desired.limited:
        return desired.message
    if spec.autoscaling is not None:
        return f"spec.replicas set to {desired.replicas} (autoscaling owns it)"
    return f"spec.replicas set to {desired.replicas}"


_SUMMARY_ORDER = (
    (ServiceConditionType.MODEL_READY, "False"),
    (ServiceConditionType.PROGRESSING, "False"),
    (ServiceConditionType.READY, "False"),
    (ServiceConditionType.SCALING_CONFLICT, "True"),
    (ServiceConditionType.SCALING_LIMITED, "True"),
    (ServiceConditionType.READY, "True"),
)


def _summary(conditions: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    by_type = {c.get("type"): c for c in conditions}
    for type_, value in _SUMMARY_ORDER:
        condition = by_type.get(type_)
        if condition is not None and condition.get("status") == value:
            return condition.get("reason"), condition.get("message")
    return None, None


def group_requests_pending(status: Mapping[str, Any], now: float) -> list[Mapping[str, Any]]:
    """Groups the gang scheduler should admit now: no nodes, not retiring, back-off over."""
    out = []
    for group in status.get("groups") or []:
        if group.get("nodes") or group.get("retiring"):
            continue
        after = parse_timestamp(group.get("restartAfter"))
        if after is not None and after > now:
            continue
        out.append(group)
    return out
