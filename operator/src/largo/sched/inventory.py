"""Turn raw Kubernetes objects (plain camelCase dicts, as kopf delivers them) into scheduling inputs.

Everything here is pure: callers fetch nodes and pods, these functions only interpret them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from largo.policy.conditions import parse_timestamp
from largo.sched.quantity import parse_resources
from largo.sched.types import OUT_OF_SERVICE_TAINT, NodeInfo, Taint, Toleration

Resources = Mapping[str, int]
Usage = Mapping[str, Mapping[str, int]]

_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
# The node's allocatable count of pods: each pod takes one, as kube-scheduler counts it.
POD_SLOTS = "pods"


def _get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    """Nested lookup that treats missing keys and explicit nulls alike."""
    current: Any = obj
    for part in path:
        if not isinstance(current, Mapping):
            return None
        current = current.get(part)
    return current


def taints_from(raw: Iterable[Mapping[str, Any]] | None) -> tuple[Taint, ...]:
    """Convert ``node.spec.taints``."""
    return tuple(
        Taint(key=str(t.get("key") or ""), value=str(t.get("value") or ""), effect=str(t.get("effect") or ""))
        for t in raw or ()
    )


def tolerations_from(raw: Iterable[Mapping[str, Any]] | None) -> tuple[Toleration, ...]:
    """Convert ``pod.spec.tolerations``; absent operator means ``Equal`` as in Kubernetes."""
    return tuple(
        Toleration(
            key=t.get("key") or None,
            operator=str(t.get("operator") or "Equal"),
            value=str(t.get("value") or ""),
            effect=t.get("effect") or None,
        )
        for t in raw or ()
    )


def node_info(node: Mapping[str, Any]) -> NodeInfo:
    """Interpret a Node object. Raises ValueError on a malformed allocatable quantity."""
    conditions = _get(node, "status", "conditions") or ()
    readiness = next((c for c in conditions if c.get("type") == "Ready"), None) or {}
    ready = readiness.get("status") == "True"
    taints = taints_from(_get(node, "spec", "taints"))
    return NodeInfo(
        name=str(_get(node, "metadata", "name") or ""),
        allocatable=parse_resources(_get(node, "status", "allocatable")),
        labels=dict(_get(node, "metadata", "labels") or {}),
        taints=taints,
        ready=ready,
        unschedulable=bool(_get(node, "spec", "unschedulable")),
        not_ready_since=None if ready else parse_timestamp(readiness.get("lastTransitionTime")),
        out_of_service=any(taint.key == OUT_OF_SERVICE_TAINT for taint in taints),
    )


def noticed_not_ready(info: NodeInfo, first_seen: float | None) -> NodeInfo:
    """``info`` whose ``not_ready_since`` is no later than ``first_seen``, when this operator first saw
    the node not Ready. A kubelet stamps its own Ready transitions with the node's clock, which on a
    broken node may run ahead and would stretch the grace; an unknown time becomes ``first_seen``."""
    if info.ready or first_seen is None:
        return info
    since = first_seen if info.not_ready_since is None else min(info.not_ready_since, first_seen)
    return dataclasses.replace(info, not_ready_since=since)


def _container_requests(container: Mapping[str, Any]) -> dict[str, int]:
    # The API server defaults a missing request to the limit, per resource.
    merged = dict(_get(container, "resources", "limits") or {})
    merged.update(_get(container, "resources", "requests") or {})
    return parse_resources(merged)


def _add_into(total: dict[str, int], extra: Mapping[str, int]) -> None:
    for name, amount in extra.items():
        total[name] = total.get(name, 0) + amount


def _max_into(total: dict[str, int], other: Mapping[str, int]) -> None:
    for name, amount in other.items():
        if amount > total.get(name, 0):
            total[name] = amount


def pod_requests(pod: Mapping[str, Any]) -> dict[str, int]:
    """Effective requests of a pod as kube-scheduler computes them.

    Sum of app containers, at least the peak of any init container (sidecar init containers with
    ``restartPolicy: Always`` keep running, so they add to the app containers and to every later
    init container), the pod-level requests (``spec.resources``) in place of those for what they name,
    plus ``spec.overhead``. Not the pod slot it takes (``held``).
    """
    spec = _get(pod, "spec") or {}
    total: dict[str, int] = {}
    for container in spec.get("containers") or ():
        _add_into(total, _container_requests(container))

    sidecars: dict[str, int] = {}
    init_peak: dict[str, int] = {}
    for container in spec.get("initContainers") or ():
        own = _container_requests(container)
        if container.get("restartPolicy") == "Always":
            _add_into(total, own)
            _add_into(sidecars, own)
            step = dict(sidecars)
        else:
            step = dict(own)
            _add_into(step, sidecars)
        _max_into(init_peak, step)
    _max_into(total, init_peak)
    # Pod-level requests (PodLevelResources, on by default from Kubernetes 1.34) stand for the
    # containers' of what they name: cpu, memory and huge pages.
    for name, amount in parse_resources((spec.get("resources") or {}).get("requests")).items():
        if name in ("cpu", "memory") or name.startswith("hugepages-"):
            total[name] = amount

    _add_into(total, parse_resources(spec.get("overhead")))
    return total


def held(pod: Mapping[str, Any]) -> dict[str, int]:
    """What a bound pod holds of its node: its requests and one of the node's pod slots (allocatable
    ``pods``, which a gang's request counts too: a node full of pods fits no gang, whatever GPUs it has
    free)."""
    return {**pod_requests(pod), POD_SLOTS: 1}


def resident(pod: Mapping[str, Any]) -> bool:
    """A pod that stays on its node as long as the node does: a DaemonSet's, or a static pod (its
    mirror names the annotation kubelet sets, and the Node as its owner). What it holds is never free
    for a gang, even on an otherwise empty cluster. One being deleted is not: it leaves (a DaemonSet's
    rolling update creates its replacement, counted then), and what it holds till then is usage, not a
    limit on what could ever fit."""
    metadata = pod.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return False
    if "kubernetes.io/config.mirror" in (metadata.get("annotations") or {}):
        return True
    return any(
        owner.get("controller") and owner.get("kind") in ("DaemonSet", "Node")
        for owner in metadata.get("ownerReferences") or ()
    )


def pod_holds_resources(pod: Mapping[str, Any]) -> bool:
    """A pod holds its requests until it is terminal; a terminating pod still holds until gone."""
    return _get(pod, "status", "phase") not in _TERMINAL_PHASES


def add_usage(usage: MutableMapping[str, dict[str, int]], node: str, resources: Resources) -> None:
    """Add ``resources`` to ``usage[node]`` in place."""
    _add_into(usage.setdefault(node, {}), resources)


def usage_by_node(pods: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Requests of resource-holding pods summed per ``spec.nodeName``; unbound pods are skipped."""
    usage: dict[str, dict[str, int]] = {}
    for pod in pods:
        node = _get(pod, "spec", "nodeName")
        if node and pod_holds_resources(pod):
            add_usage(usage, str(node), held(pod))
    return usage


def free_by_node(nodes: Iterable[NodeInfo], usage: Usage) -> dict[str, dict[str, int]]:
    """Allocatable minus usage per node, floored at zero.

    Only allocatable resources appear; an over-committed resource reads as 0 free rather than
    negative so that a zero request still fits.
    """
    free: dict[str, dict[str, int]] = {}
    for node in nodes:
        used = usage.get(node.name, {})
        free[node.name] = {
            name: max(0, amount - used.get(name, 0)) for name, amount in node.allocatable.items()
        }
    return free
