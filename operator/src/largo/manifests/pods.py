"""Pieces every largo pod shares, whichever kind it belongs to."""

from __future__ import annotations

from typing import Any

from largo.api.v1alpha1 import PodTemplate

JSON = dict[str, Any]


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
    if template.termination_grace_period_seconds is not None:
        pod_spec["terminationGracePeriodSeconds"] = template.termination_grace_period_seconds
    if template.security_context is not None:
        pod_spec["securityContext"] = dict(template.security_context)
    if template.priority_class_name is not None:
        pod_spec["priorityClassName"] = template.priority_class_name
    if scheduler_name is not None:
        pod_spec["schedulerName"] = scheduler_name
    return pod_spec
