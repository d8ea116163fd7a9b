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
from largo.build import trainjob as build
from largo.build.names import LABEL_ATTEMPT, LABEL_JOB_NAME, LABEL_NODE_RANK
from largo.policy.conditions import parse_timestamp
from largo.policy.trainjob import JobView
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


@dataclass(frozen=True, slots=True)
class JobEntry:
    key: JobKey
    uid: str
    resource_version: str
    phase: str | None
    attempt: int
    placement: tuple[str, ...] | None
    per_pod: Mapping[str, int]
    request: GangRequest | None  # None when the spec is invalid: such a job is never admitted
    queue_name: str
    queue: Mapping[str, Any]
    body: Mapping[str, Any]
    # The spec parsed once per version of the object, or why it cannot be run.
    job: TrainJob | None
    invalid: str | None
    suspended: bool = False

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
    if LABEL_JOB_NAME in labels:
        try:
            attempt, rank = int(labels[LABEL_ATTEMPT]), int(labels[LABEL_NODE_RANK])
            job = (str(metadata.get("namespace")), str(labels[LABEL_JOB_NAME]))
        except (KeyError, ValueError):
            job = None
    return PodUsage(
        uid=str(metadata.get("uid")),
        requests=inventory.pod_requests(pod),
        job=job,
        attempt=attempt,
        rank=rank,
    )


def job_entry(body: Mapping[str, Any]) -> JobEntry:
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    key = (str(metadata.get("namespace")), str(metadata.get("name")))
    view = JobView(num_nodes=1, gpus_per_node=0, status=status)
    request: GangRequest | None = None
    per_pod: Mapping[str, int] = {}
    queue_name = ""
    job: TrainJob | None = None
    invalid: str | None = None
    try:
        job = parse(body)
    except pydantic.ValidationError as error:
        invalid = "; ".join(validation_messages(error))
    else:
        request = gang_request(job, key, metadata)
        per_pod = request.per_pod
        queue_name = job.spec.scheduling.queue
    return JobEntry(
        key=key,
        uid=str(metadata.get("uid")),
        resource_version=str(metadata.get("resourceVersion")),
        phase=status.get("phase"),
        attempt=view.attempt,
        placement=view.placement_nodes,
        per_pod=per_pod,
        request=request,
        queue_name=queue_name,
        queue=status.get("queue") or {},
        body=dict(body),
        job=job,
        invalid=invalid,
        suspended=bool(job and job.spec.suspend),
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
    )
