"""What the kopf indexes hold: small, immutable summaries of nodes, pods and TrainJobs.

The index handlers turn raw objects into these; the gang scheduler reads only them. Everything here
is rebuilt from the cluster whenever the operator starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from largo.api.v1alpha1 import ConditionType, InferenceService, Phase, TrainJob, validation_messages
from largo.manifests import inferenceservice as serve_build
from largo.manifests import trainjob as build
from largo.manifests.names import (
    CHECKPOINT_VOLUME,
    LABEL_ATTEMPT,
    LABEL_EXCLUSIVE,
    LABEL_JOB_NAME,
    LABEL_MEMBER,
    LABEL_REPLICA,
    LABEL_SERVICE,
)
from largo.policy.conditions import parse_timestamp
from largo.policy.trainjob import gang_position, status_attempt, status_placement, status_succeeded_ranks
from largo.sched import inventory
from largo.sched.types import GangRequest, checkpoint_key, checkpoint_key_of

JobKey = tuple[str, str]  # (namespace, name); for a replica group (namespace, <service>#r<replica>)


@dataclass(frozen=True, slots=True)
class PodUsage:
    """A bound pod that holds resources on its node; for largo's pods, whose gang rank it is."""

    uid: str
    requests: Mapping[str, int]
    job: JobKey | None = None
    attempt: int | None = None
    rank: int | None = None
    # A pod of an exclusiveNodes gang: its node is held whole.
    exclusive: bool = False
    # The checkpoint directory a TrainJob's pod mounts (``checkpoint_key``): held while the pod is.
    checkpoint: str | None = None
    # A DaemonSet's or a static pod: what it holds is never free, even on an otherwise empty cluster.
    resident: bool = False
    # The uid of the object controlling it (a TrainJob or an InferenceService): the pods of a deleted one
    # still stopping are not the ranks of a new one of the same name.
    owner: str | None = None


# Admitted once and not finished or suspended since: a released or restarting gang queues again, and
# keeps its directory meanwhile (the next job there would resume from its checkpoint mid-run).
_HOLDING_CHECKPOINT = frozenset(
    {Phase.QUEUED, Phase.STARTING, Phase.RUNNING, Phase.RESTARTING, Phase.SUSPENDING}
)
# Before ``status.checkpointDirectory`` was recorded, a job with pods admitted held its spec's.
_ADMITTED = frozenset({Phase.STARTING, Phase.RUNNING, Phase.RESTARTING, Phase.SUSPENDING})


@dataclass(frozen=True, slots=True)
class JobEntry:
    key: JobKey
    uid: str
    resource_version: str
    phase: str | None
    attempt: int
    placement: tuple[str, ...] | None
    request: GangRequest | None  # None when the spec is invalid: such a job is never admitted
    queue: Mapping[str, Any]
    body: Mapping[str, Any]
    # The spec parsed once per version of the object, or why it cannot be run.
    job: TrainJob | None
    invalid: str | None
    # Epoch seconds before which a released gang is not admitted again (its backoff), if any.
    admissible_from: float | None = None
    # The placed ranks that finished (``placement.succeededRanks``): they hold nothing any more.
    succeeded_ranks: frozenset[int] = frozenset()

    @property
    def per_pod(self) -> Mapping[str, int]:
        return self.request.per_pod if self.request is not None else {}

    @property
    def queued_since(self) -> float:
        """When it began to wait for its first admission: its creation, or its resumption (a job
        created suspended waits from then on, not while it was suspended)."""
        arrival = self.request.arrival if self.request is not None else 0.0
        resumed = next(
            (
                parse_timestamp(c.get("lastTransitionTime"))
                for c in (self.body.get("status") or {}).get("conditions") or []
                if c.get("type") == ConditionType.SUSPENDED and c.get("status") == "False"
            ),
            None,
        )
        return max(arrival, resumed or 0.0)

    @property
    def queue_name(self) -> str:
        return self.job.spec.scheduling.queue if self.job is not None else ""

    @property
    def suspended(self) -> bool:
        return self.job is not None and self.job.spec.suspend

    @property
    def admissible(self) -> bool:
        """Waiting for admission: queued, or new (a job that fits at once skips the Queued round trip),
        and not being deleted (a foreground deletion keeps the object a while)."""
        return (
            self.request is not None
            and not self.suspended
            and self.phase in (None, Phase.QUEUED)
            and not _deleting(self.body)
        )

    def due(self, now: float) -> bool:
        """Past any backoff of a released gang."""
        return self.admissible_from is None or self.admissible_from <= now

    @property
    def active(self) -> bool:
        return self.phase in (Phase.STARTING, Phase.RUNNING) and self.placement is not None

    @property
    def admitted_checkpoint(self) -> str | None:
        """The checkpoint directory (key) the gang was last admitted with, if it may still write it:
        its pods run, or will again, or may still be stopping. ``holds_checkpoint`` says whether it
        does without its pods' help."""
        recorded = (self.body.get("status") or {}).get("checkpointDirectory")
        if isinstance(recorded, str) and recorded:
            held = checkpoint_key_of(self.key[0], recorded)
            # Queued again after an edit of its checkpoint, the job will never write the old directory
            # (pods still stopping hold it themselves); holding it would keep it from everyone, and two
            # jobs whose directories were swapped would wait for each other for ever.
            if self.phase == Phase.QUEUED and self.request is not None and self.request.checkpoint != held:
                return None
            return held
        if self.phase in _ADMITTED and self.request is not None:
            return self.request.checkpoint
        return None

    @property
    def holds_checkpoint(self) -> bool:
        return self.phase in _HOLDING_CHECKPOINT


def parse(body: Mapping[str, Any]) -> TrainJob:
    """Raises pydantic.ValidationError with field-level messages for a spec the operator cannot run.

    Only metadata and spec are validated: the status is the operator's own and read field by field.
    """
    return TrainJob.from_body({"metadata": body.get("metadata") or {}, "spec": body.get("spec") or {}})


def pod_usage(pod: Mapping[str, Any]) -> PodUsage | None:
    node = (pod.get("spec") or {}).get("nodeName")
    if not node or not inventory.pod_holds_resources(pod):
        return None
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    job: JobKey | None = None
    attempt: int | None = None
    rank: int | None = None
    position = gang_position(labels)
    member = service_pod_position(labels, str(metadata.get("namespace")))
    checkpoint: str | None = None
    if LABEL_JOB_NAME in labels and position is not None:
        rank, attempt = position
        job = (str(metadata.get("namespace")), str(labels[LABEL_JOB_NAME]))
        checkpoint = _mounted_checkpoint(job[0], pod.get("spec") or {})
    elif member is not None:
        job, attempt, rank = member
    return PodUsage(
        uid=str(metadata.get("uid")),
        requests=inventory.held(pod),
        job=job,
        attempt=attempt,
        rank=rank,
        exclusive=labels.get(LABEL_EXCLUSIVE) == "true",
        checkpoint=checkpoint,
        resident=inventory.resident(pod),
        owner=controller_uid(metadata),
    )


# (gang, its object's uid, attempt, rank) of each bound pod of a gang (``bound_rank``).
BoundRanks = set[tuple[JobKey, str | None, int, int]]


def bound_rank(bound: BoundRanks, pod: PodUsage) -> None:
    if pod.job is not None and pod.attempt is not None and pod.rank is not None:
        bound.add((pod.job, pod.owner, pod.attempt, pod.rank))


def is_bound(bound: BoundRanks, gang: JobKey, uid: str, attempt: int, rank: int) -> bool:
    """Whether the rank of the gang of object ``uid`` has its pod bound: a pod of a deleted object of
    the same name (stopping, still in the index) is not, nor one without an owner (orphaned by hand,
    ``--cascade=orphan``): it holds what it asks for, as any pod does, for no gang."""
    return (gang, uid, attempt, rank) in bound


def controller_uid(metadata: Mapping[str, Any]) -> str | None:
    """The uid of the object that controls this one (its owner reference marked controller), if any."""
    for reference in metadata.get("ownerReferences") or []:
        if reference.get("controller"):
            return str(reference.get("uid"))
    return None


def _mounted_checkpoint(namespace: str, spec: Mapping[str, Any]) -> str | None:
    """The checkpoint directory a trainer pod mounts, as its gang's builder put it there."""
    claims = [
        (volume.get("persistentVolumeClaim") or {}).get("claimName")
        for volume in spec.get("volumes") or []
        if volume.get("name") == CHECKPOINT_VOLUME
    ]
    if not claims or not isinstance(claims[0], str):
        return None
    sub_paths = [
        mount.get("subPath")
        for container in spec.get("containers") or []
        for mount in container.get("volumeMounts") or []
        if mount.get("name") == CHECKPOINT_VOLUME
    ]
    return checkpoint_key(namespace, claims[0], sub_paths[0] if sub_paths else None)


def _deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def job_entry(body: Mapping[str, Any]) -> JobEntry:
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    key = (str(metadata.get("namespace")), str(metadata.get("name")))
    request: GangRequest | None = None
    job: TrainJob | None = None
    invalid: str | None = None
    try:
        job = parse(body)
    except pydantic.ValidationError as error:
        invalid = "; ".join(validation_messages(error))
    else:
        request = gang_request(job, key, metadata)
    return JobEntry(
        key=key,
        uid=str(metadata.get("uid")),
        resource_version=str(metadata.get("resourceVersion")),
        phase=status.get("phase"),
        attempt=status_attempt(status),
        placement=status_placement(status),
        request=request,
        queue=status.get("queue") or {},
        body=dict(body),
        job=job,
        invalid=invalid,
        admissible_from=parse_timestamp(status.get("nextAdmissionTime")),
        succeeded_ranks=status_succeeded_ranks(status),
    )


def gang_key(key: JobKey) -> str:
    return f"{key[0]}/{key[1]}"


def gang_request(job: TrainJob, key: JobKey, metadata: Mapping[str, Any]) -> GangRequest:
    spec = job.spec
    template = spec.pod_template
    scheduling = spec.scheduling
    return GangRequest(
        key=gang_key(key),
        priority=scheduling.priority,
        arrival=parse_timestamp(metadata.get("creationTimestamp")) or 0.0,
        pod_count=spec.num_nodes,
        # Each pod also takes one of the node's pod slots.
        per_pod={**build.per_pod_requests(spec), inventory.POD_SLOTS: 1},
        node_selector=dict(template.node_selector),
        # The builder adds a toleration of the GPU taint to GPU pods: the scheduler must see it too.
        tolerations=inventory.tolerations_from(build.pod_tolerations(job)),
        required_topology_key=scheduling.topology_key,
        preferred_topology_key=scheduling.preferred_topology_key,
        exclusive=scheduling.exclusive_nodes,
        checkpoint=(
            checkpoint_key(key[0], spec.checkpoint.claim_name, spec.checkpoint.sub_path)
            if spec.checkpoint is not None
            else None
        ),
    )


# -- InferenceServices: each replica group is a gang of its own ------------------------------------


def group_gang_id(name: str, replica: int) -> str:
    """The gang name of one replica group; '#' cannot occur in an object name, so it never collides with
    a TrainJob's."""
    return f"{name}#r{replica}"


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """What the scheduler reads of one group in status.groups."""

    replica: int
    attempt: int
    nodes: tuple[str, ...]
    retiring: bool
    queued_at: float
    restart_after: float | None
    queue: Mapping[str, Any]

    def gang(self, namespace: str, name: str) -> JobKey:
        return (namespace, group_gang_id(name, self.replica))


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    key: JobKey
    uid: str
    resource_version: str
    body: Mapping[str, Any]
    service: InferenceService | None
    invalid: str | None
    groups: tuple[GroupRecord, ...]

    @property
    def per_pod(self) -> Mapping[str, int]:
        if self.service is None:
            return {}
        return {**serve_build.per_pod_requests(self.service.spec), inventory.POD_SLOTS: 1}

    @property
    def exclusive(self) -> bool:
        return self.service is not None and self.service.spec.scheduling.exclusive_nodes

    def placed(self) -> list[GroupRecord]:
        """Groups the scheduler placed: their nodes are held until the group goes."""
        return [group for group in self.groups if group.nodes]

    def unplaced(self) -> list[GroupRecord]:
        """Groups to admit, now or after their back-off: no nodes, not retiring; none while the service
        is being deleted (a foreground deletion keeps it while its pods drain)."""
        if self.service is None or _deleting(self.body):
            return []
        return [group for group in self.groups if not group.nodes and not group.retiring]

    def waiting(self, now: float) -> list[GroupRecord]:
        """Groups to admit now: unplaced, any restart back-off over."""
        return [g for g in self.unplaced() if g.restart_after is None or g.restart_after <= now]

    def backing_off(self, now: float) -> list[GroupRecord]:
        """Groups to admit once their restart back-off ends (``restart_after`` still to come)."""
        return [g for g in self.unplaced() if g.restart_after is not None and g.restart_after > now]

    def request(self, group: GroupRecord) -> GangRequest:
        assert self.service is not None
        spec = self.service.spec
        scheduling = spec.scheduling
        namespace, name = self.key
        return GangRequest(
            key=gang_key(group.gang(namespace, name)),
            priority=scheduling.priority,
            arrival=group.queued_at,
            pod_count=spec.nodes_per_replica,
            per_pod=self.per_pod,
            node_selector=dict(spec.pod_template.node_selector),
            tolerations=inventory.tolerations_from(serve_build.pod_tolerations(self.service)),
            required_topology_key=scheduling.topology_key,
            preferred_topology_key=scheduling.preferred_topology_key,
            exclusive=scheduling.exclusive_nodes,
        )


def service_entry(body: Mapping[str, Any]) -> ServiceEntry:
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    key = (str(metadata.get("namespace")), str(metadata.get("name")))
    service: InferenceService | None = None
    invalid: str | None = None
    try:
        service = InferenceService.from_body(body)
    except pydantic.ValidationError as error:
        invalid = "; ".join(validation_messages(error))
    created = parse_timestamp(metadata.get("creationTimestamp")) or 0.0
    groups = []
    for raw in status.get("groups") or []:
        try:
            replica, attempt = int(raw["replica"]), int(raw.get("attempt") or 0)
        except (KeyError, TypeError, ValueError):
            continue  # a malformed entry holds nothing; the reconcile rewrites the list
        groups.append(
            GroupRecord(
                replica=replica,
                attempt=attempt,
                nodes=tuple(str(n) for n in raw.get("nodes") or []),
                retiring=bool(raw.get("retiring")),
                queued_at=parse_timestamp(raw.get("queuedAt")) or created,
                restart_after=parse_timestamp(raw.get("restartAfter")),
                queue=raw.get("queue") or {},
            )
        )
    return ServiceEntry(
        key=key,
        uid=str(metadata.get("uid")),
        resource_version=str(metadata.get("resourceVersion")),
        body=dict(body),
        service=service,
        invalid=invalid,
        groups=tuple(groups),
    )


def service_pod_position(labels: Mapping[str, str], namespace: str) -> tuple[JobKey, int, int] | None:
    """(gang, attempt, member) of an InferenceService member pod; None for any other pod."""
    try:
        name, replica = labels[LABEL_SERVICE], int(labels[LABEL_REPLICA])
        return (
            (namespace, group_gang_id(name, replica)),
            int(labels[LABEL_ATTEMPT]),
            int(labels[LABEL_MEMBER]),
        )
    except (KeyError, ValueError):
        return None
