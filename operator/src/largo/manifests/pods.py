"""Pieces every largo pod shares, whichever kind it belongs to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from largo.api.v1alpha1 import GPU_RESOURCE, PodTemplate, Scheduling
from largo.manifests import names

JSON = dict[str, Any]


def carried_scheduling(scheduling: Scheduling) -> JSON:
    """The scheduling fields a pod carries (its schedulerName, the exclusive-node label) that are set,
    for a hash of what shapes the pods: empty when neither is, so that a spec without them hashes as
    it did before they counted."""
    return scheduling.model_dump(
        mode="json", by_alias=True, exclude_defaults=True, include={"scheduler_name", "exclusive_nodes"}
    )


def equal_resources(resources_per_node: Mapping[str, Any]) -> JSON:
    """Requests equal to limits: extended resources (GPUs) must be limits, and a gang member that can
    be throttled or evicted for exceeding its requests stalls every other one. Empty when none."""
    quantities = {k: str(v) for k, v in sorted(resources_per_node.items())}
    return {"requests": dict(quantities), "limits": dict(quantities)} if quantities else {}


def gpu_tolerations(template: PodTemplate, gpus: int) -> list[JSON]:
    """The user's tolerations, plus the GPU taint's for pods that ask for GPUs: GPU nodes are commonly
    tainted with the resource name, and a pod that asks for GPUs wants them."""
    tolerations = [dict(t) for t in template.tolerations]
    if gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def image_pull_secrets(template: PodTemplate) -> list[JSON]:
    """The pod template's pull secrets as core/v1 LocalObjectReferences."""
    return [{"name": secret.name} for secret in template.image_pull_secrets or ()]


def add_shared_memory(volumes: list[JSON], mounts: list[JSON]) -> None:
    """A memory-backed /dev/shm unless the user mounts one: the container runtime's 64Mi is too small
    for NCCL, DataLoader workers and vLLM's."""
    if not any(m.get("mountPath") == "/dev/shm" for m in mounts):
        volumes.append({"name": names.SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": names.SHM_VOLUME, "mountPath": "/dev/shm"})


def pinned_pod_spec(
    *,
    hostname: str,
    subdomain: str,
    node_name: str,
    container: JSON,
    volumes: list[JSON],
    template: PodTemplate,
    tolerations: list[JSON],
    scheduler_name: str | None,
) -> JSON:
    """A pod spec pinned to ``node_name`` (chosen by largo's gang placement), with the pod template's
    pass-through settings.

    Pinning uses required node affinity rather than spec.nodeName so the kube-scheduler still runs its
    admission checks (resources, taints) and reports a clear reason when the node cannot fit the pod.
    Pods never restart in place: a member that exits ends its pod, and largo restarts the whole gang.
    """
    pod_spec: JSON = {
        "hostname": hostname,
        "subdomain": subdomain,
        "restartPolicy": "Never",
        # Service links would inject <SVC>_PORT-style variables, which can collide with the contract.
        "enableServiceLinks": False,
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node_name]}]}
                    ]
                }
            }
        },
        "containers": [container],
        "volumes": volumes,
    }
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if template.service_account_name is not None:
        pod_spec["serviceAccountName"] = template.service_account_name
    if template.image_pull_secrets:
        pod_spec["imagePullSecrets"] = image_pull_secrets(template)
    if template.termination_grace_period_seconds is not None:
        pod_spec["terminationGracePeriodSeconds"] = template.termination_grace_period_seconds
    if template.security_context is not None:
        pod_spec["securityContext"] = dict(template.security_context)
    if template.priority_class_name is not None:
        pod_spec["priorityClassName"] = template.priority_class_name
    if scheduler_name is not None:
        pod_spec["schedulerName"] = scheduler_name
    return pod_spec
