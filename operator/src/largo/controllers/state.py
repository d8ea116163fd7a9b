"""What the kopf indexes hold: small, immutable summaries of nodes, pods and TrainJobs.

The index handlers turn raw objects into these; the gang scheduler reads only them. Everything here
is rebuilt from the cluster whenever the operator starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from largo.api.v1alpha1 import Phase, TrainJob, validation_messages
from largo.manifests import trainjob as build
from largo.manifests.names import LABEL_EXCLUSIVE, LABEL_JOB_NAME
from largo.policy.conditions import parse_timestamp
from largo.policy.trainjob import gang_position, status_attempt, status_placement
from largo.sched import inventory
from largo.sched.types import GangRequest

JobKey = tuple[str, str]  # (namespace, name)


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

    @property
    def per_pod(self) -> Mapping[str, int]:
        return self.request.per_pod if self.request is not None else {}

    @property
    def queue_name(self) -> str:
        return self.job.spec.scheduling.queue if self.job is not None else ""

    @property
    def suspended(self) -> bool:
        return self.job is not None and self.job.spec.suspend

    @property
    def admissible(self) -> bool:
        """Waiting for admission: queued, or new (a job that fits at once skips the Queued round trip)."""
        return self.request is not None and not self.suspended and self.phase in (None, Phase.QUEUED)

    @property
    def active(self) -> bool:
        return self.phase in (Phase.STARTING, Phase.RUNNING) and self.placement is not None


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
    job, attempt, rank = None, None, None
    position = gang_position(labels)
    if LABEL_JOB_NAME in labels and position is not None:
        rank, attempt = position
        job = (str(metadata.get("namespace")), str(labels[LABEL_JOB_NAME]))
    return PodUsage(
        uid=str(metadata.get("uid")),
        requests=inventory.pod_requests(pod),
        job=job,
        attempt=attempt,
        rank=rank,
        exclusive=labels.get(LABEL_EXCLUSIVE) == "true",
    )


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
        per_pod={**build.per_pod_requests(spec), "pods": 1},
        node_selector=dict(template.node_selector),
        # The builder adds a toleration of the GPU taint to GPU pods: the scheduler must see it too.
        tolerations=inventory.tolerations_from(build.pod_tolerations(job)),
        required_topology_key=scheduling.topology_key,
        preferred_topology_key=scheduling.preferred_topology_key,
        exclusive=scheduling.exclusive_nodes,
    )
