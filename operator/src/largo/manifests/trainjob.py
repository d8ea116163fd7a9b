"""Pure builders: TrainJob -> the Kubernetes objects of its gang, as plain JSON-shaped dicts.

Nothing here talks to the API server; owner references are added by the caller (``objects.owned``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from largo.api.v1alpha1 import GPU_RESOURCE, Backend, TrainJob, TrainJobSpec
from largo.manifests import names
from largo.manifests.pods import (
    add_shared_memory,
    carried_scheduling,
    equal_resources,
    gpu_tolerations,
    pinned_pod_spec,
)
from largo.sched.quantity import parse_resources

# Defaults that only make logs more useful; any of them is dropped when the user sets it in env.
NCCL_DEFAULT_ENV: dict[str, str] = {"NCCL_DEBUG": "WARN"}
COMMON_DEFAULT_ENV: dict[str, str] = {"PYTHONUNBUFFERED": "1"}

JSON = dict[str, Any]


# --- resolution of "auto" values -------------------------------------------------------------


def gpus_per_node(spec: TrainJobSpec) -> int:
    return int(spec.resources_per_node.get(GPU_RESOURCE, 0))


def total_gpus(spec: TrainJobSpec) -> int:
    return gpus_per_node(spec) * spec.num_nodes


def resolved_procs_per_node(spec: TrainJobSpec) -> int:
    """`auto` starts one worker per GPU, or a single worker on CPU-only pods."""
    if isinstance(spec.procs_per_node, int):
        return spec.procs_per_node
    return max(gpus_per_node(spec), 1)


def reporting_pod(spec: TrainJobSpec) -> int:
    """The rank of the pod whose process reports the loss, progress and metrics: the first rank of the
    last pipeline stage (largo.runtime.parallel.Layout.reporter), rank 0 without pipeline stages."""
    procs = resolved_procs_per_node(spec)
    stages = spec.parallelism.pipeline
    return (stages - 1) * (procs * spec.num_nodes // stages) // procs


def resolved_backend(spec: TrainJobSpec) -> Backend:
    """`auto` is nccl when the pods get GPUs (gloo cannot use them efficiently), else gloo."""
    if spec.backend is not Backend.AUTO:
        return spec.backend
    return Backend.NCCL if gpus_per_node(spec) > 0 else Backend.GLOO


def per_pod_requests(spec: TrainJobSpec) -> dict[str, int]:
    """What one pod of the gang asks the node for, in the scheduler's canonical units: cpu in
    millicores, everything else in base units, rounded up as kube-scheduler does."""
    return parse_resources(dict(sorted(spec.resources_per_node.items())))


def pod_spec_hash(spec: TrainJobSpec) -> str:
    """A hash of the mutable fields that shape the pods (the others are immutable): pods built from
    the same spec carry the same hash, so one attempt never mixes two versions of the spec."""
    shaping = spec.model_dump(
        mode="json",
        by_alias=True,
        exclude_none=True,
        include={"command", "args", "env", "checkpoint", "pod_template"},
    )
    placed = carried_scheduling(spec.scheduling)
    if placed:
        shaping["scheduling"] = placed
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


# --- objects ---------------------------------------------------------------------------------


def _namespace(job: TrainJob) -> str:
    if not job.metadata.namespace:
        raise ValueError(f"TrainJob {job.metadata.name} has no metadata.namespace")
    return job.metadata.namespace


def build_service(job: TrainJob) -> JSON:
    """The headless Service that publishes `<job>-node-<rank>.<job>` for every pod, ready or not,
    so workers can resolve rank 0 while it is still starting."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.service_name(name),
            "namespace": _namespace(job),
            "labels": names.job_selector(name),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.job_selector(name),
            "ports": [
                {
                    "name": names.RENDEZVOUS_PORT_NAME,
                    "port": names.MASTER_PORT,
                    "targetPort": names.MASTER_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_progress_configmap(job: TrainJob) -> JSON:
    """The ConfigMap rank 0 reports progress into; the operator validates each report and copies it
    into ``status.progress``. Created empty with the gang; the runtime only patches it."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": names.progress_configmap(name),
            "namespace": _namespace(job),
            "labels": {names.LABEL_PROGRESS_OF: name},
        },
    }


def contract_env(job: TrainJob, rank: int, attempt: int) -> list[JSON]:
    """The variables largo promises every trainer container (docs/rendezvous.md).

    PET_* are read by torchrun as its command-line options; WORLD_SIZE, RANK and friends are left
    to torchrun, which sets them per worker process.
    """
    spec = job.spec
    name = job.metadata.name
    namespace = _namespace(job)
    values: dict[str, str] = {
        "PET_NNODES": str(spec.num_nodes),
        "PET_NPROC_PER_NODE": str(resolved_procs_per_node(spec)),
        "PET_NODE_RANK": str(rank),
        "PET_MASTER_ADDR": names.master_addr(name, namespace),
        "PET_MASTER_PORT": str(names.MASTER_PORT),
        "LARGO_JOB_NAME": name,
        "LARGO_JOB_NAMESPACE": namespace,
        "LARGO_NODE_RANK": str(rank),
        "LARGO_NUM_NODES": str(spec.num_nodes),
        "LARGO_BACKEND": resolved_backend(spec).value,
        "LARGO_TENSOR_PARALLEL": str(spec.parallelism.tensor),
        "LARGO_PIPELINE_PARALLEL": str(spec.parallelism.pipeline),
        "LARGO_ATTEMPT": str(attempt),
        "LARGO_PROGRESS_CONFIGMAP": names.progress_configmap(name),
        "LARGO_METRICS_PORT": str(names.METRICS_PORT),
    }
    if spec.checkpoint is not None:
        values["LARGO_CHECKPOINT_DIR"] = spec.checkpoint.path
    grace = spec.pod_template.termination_grace_period_seconds
    if grace is not None:
        # torchrun kills its workers 30 s after a SIGTERM, whatever the pod's grace period: a longer
        # one is for writing a last checkpoint, which torchrun must then wait for.
        values["PET_SHUTDOWN_TIMEOUT"] = str(grace)
    return [{"name": k, "value": v} for k, v in values.items()]


def build_env(job: TrainJob, rank: int, attempt: int) -> list[JSON]:
    """Contract first so user values can reference it as $(VAR), then overridable defaults, then
    the user's own variables."""
    spec = job.spec
    user = [e.model_dump(by_alias=True, exclude_none=True) for e in spec.env]
    user_names = {e.name for e in spec.env}
    defaults = dict(COMMON_DEFAULT_ENV)
    if resolved_backend(spec) is Backend.NCCL:
        defaults.update(NCCL_DEFAULT_ENV)
    default_env = [{"name": k, "value": v} for k, v in defaults.items() if k not in user_names]
    return [*contract_env(job, rank, attempt), *default_env, *user]


def pod_tolerations(job: TrainJob) -> list[JSON]:
    """The user's tolerations, plus the GPU taint's for GPU pods."""
    return gpu_tolerations(job.spec.pod_template, gpus_per_node(job.spec))


def build_pod(job: TrainJob, rank: int, node_name: str, attempt: int) -> JSON:
    """Pod `rank` of gang `attempt`, pinned to `node_name` (chosen by largo's gang placement).

    Pinning uses required node affinity rather than spec.nodeName so the kube-scheduler still runs
    its admission checks (resources, taints) and reports a clear reason when the node cannot fit it.
    """
    spec = job.spec
    if not 0 <= rank < spec.num_nodes:
        raise ValueError(f"rank {rank} is outside 0..{spec.num_nodes - 1}")
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    name = job.metadata.name
    template = spec.pod_template

    labels = {
        **template.labels,
        names.LABEL_JOB_NAME: name,
        names.LABEL_NODE_RANK: str(rank),
        names.LABEL_ATTEMPT: str(attempt),
        **({names.LABEL_EXCLUSIVE: "true"} if spec.scheduling.exclusive_nodes else {}),
    }
    reporting = rank == reporting_pod(spec)
    if reporting:
        labels[names.LABEL_REPORTING] = "true"
    # The reporting pod serves the trainer's metrics: Prometheus' pod discovery finds it by these
    # annotations (docs/observability.md); the user's own annotations win.
    scrape = (
        {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(names.METRICS_PORT),
            "prometheus.io/path": "/metrics",
        }
        if reporting
        else {}
    )
    annotations = {
        **scrape,
        **template.annotations,
        names.ANNOTATION_PLACEMENT_NODE: node_name,
        names.ANNOTATION_SPEC_HASH: pod_spec_hash(spec),
    }

    volumes = [dict(v) for v in template.volumes]
    mounts = [dict(m) for m in template.volume_mounts]
    if spec.checkpoint is not None:
        volumes.append(
            {
                "name": names.CHECKPOINT_VOLUME,
                "persistentVolumeClaim": {"claimName": spec.checkpoint.claim_name},
            }
        )
        mount: JSON = {"name": names.CHECKPOINT_VOLUME, "mountPath": spec.checkpoint.path}
        if spec.checkpoint.sub_path is not None:
            mount["subPath"] = spec.checkpoint.sub_path
        mounts.append(mount)
    add_shared_memory(volumes, mounts)

    container: JSON = {
        "name": names.CONTAINER_NAME,
        "image": spec.image,
        "env": build_env(job, rank, attempt),
        "ports": [
            {"name": names.RENDEZVOUS_PORT_NAME, "containerPort": names.MASTER_PORT, "protocol": "TCP"},
            *(
                [{"name": names.METRICS_PORT_NAME, "containerPort": names.METRICS_PORT, "protocol": "TCP"}]
                if reporting
                else []
            ),
        ],
        "volumeMounts": mounts,
    }
    if template.container_security_context is not None:
        container["securityContext"] = dict(template.container_security_context)
    if spec.command is not None:
        container["command"] = list(spec.command)
    if spec.args is not None:
        container["args"] = list(spec.args)
    resources = equal_resources(spec.resources_per_node)
    if resources:
        container["resources"] = resources

    tolerations = pod_tolerations(job)

    pod_spec = pinned_pod_spec(
        hostname=names.hostname(name, rank),
        subdomain=names.subdomain(name),
        node_name=node_name,
        container=container,
        volumes=volumes,
        template=template,
        tolerations=tolerations,
        scheduler_name=spec.scheduling.scheduler_name,
    )

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": names.pod_name(name, rank),
            "namespace": _namespace(job),
            "labels": labels,
            "annotations": annotations,
        },
        "spec": pod_spec,
    }


def build_pods(job: TrainJob, nodes: Sequence[str], attempt: int) -> list[JSON]:
    """The whole gang: `nodes[rank]` hosts rank `rank` (status.placement.nodes has this shape)."""
    if len(nodes) != job.spec.num_nodes:
        raise ValueError(f"placement has {len(nodes)} nodes, spec.numNodes is {job.spec.num_nodes}")
    return [build_pod(job, rank, node, attempt) for rank, node in enumerate(nodes)]
