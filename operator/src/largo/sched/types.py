"""Value types for gang scheduling decisions.

Resources are ``Mapping[str, int]`` in canonical units: ``cpu`` in millicores, ``memory`` in bytes,
every other resource as an integer count (or bytes).
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

GPU = "nvidia.com/gpu"
CPU = "cpu"
MEMORY = "memory"

# Taint effects that keep pods off a node; PreferNoSchedule is only a scoring hint.
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
# The taint an administrator sets on a node that is shut down (non-graceful node shutdown).
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True, slots=True)
class Toleration:
    key: str | None
    operator: str = "Equal"
    value: str = ""
    effect: str | None = None

    def tolerates(self, taint: Taint) -> bool:
        """Mirror Kubernetes ``Toleration.ToleratesTaint``.

        An empty key with ``Exists`` matches every taint; an empty effect matches every effect.
        """
        if self.effect and self.effect != taint.effect:
            return False
        if self.key and self.key != taint.key:
            return False
        if self.operator == "Exists":
            return True
        if self.operator in ("Equal", ""):
            return (self.value or "") == taint.value
        return False


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    allocatable: Mapping[str, int]
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    ready: bool = True
    unschedulable: bool = False
    # When Ready stopped being True (the condition's lastTransitionTime), while it is not True; None if
    # the node is Ready or the time is unknown.
    not_ready_since: float | None = None
    # Tainted ``node.kubernetes.io/out-of-service``: an administrator says the node is shut down, so
    # its pods are dead whatever its Ready condition says.
    out_of_service: bool = False

    @property
    def usable(self) -> bool:
        """A node new pods may land on: Ready, not cordoned and not out of service (a taint left on
        after the node came back would otherwise take gangs whose pods are lost as soon as placed)."""
        return self.ready and not self.unschedulable and not self.out_of_service

    def lost_at(self, grace: float) -> float | None:
        """When the pods on this node count as dead: ``grace`` seconds after it stopped being Ready (a
        kubelet or runtime hiccup heals within it, and restarting a gang for one costs the steps since
        its last checkpoint), at once when it is out of service or the time is unknown, None while
        it is Ready."""
        if self.out_of_service:
            return -math.inf
        if self.ready:
            return None
        return -math.inf if self.not_ready_since is None else self.not_ready_since + grace


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """Which of a workload's nodes are lost (their pods are dead: gone, out of service, or not Ready
    for the grace period) and unusable (no new pod may land there), and when each node that is not
    Ready yet not lost will count as lost."""

    lost: frozenset[str]
    unusable: frozenset[str]
    lost_at: Mapping[str, float] = field(default_factory=dict)

    def recheck_after(self, now: float) -> float | None:
        """Seconds until the next node counts as lost (look again then: no node event may come)."""
        return max(0.0, min(self.lost_at.values()) - now) if self.lost_at else None


def node_health(
    names: Iterable[str], lookup: Callable[[str], NodeInfo | None], now: float, grace: float
) -> NodeHealth:
    """The health of the nodes ``names`` as ``lookup`` finds them (None: the Node is gone)."""
    lost, unusable, pending = set(), set(), {}
    for name in names:
        info = lookup(name)
        if info is None or not info.usable:
            unusable.add(name)
        at = None if info is None else info.lost_at(grace)
        if info is None or (at is not None and at <= now):
            lost.add(name)
        elif at is not None:
            pending[name] = at
    return NodeHealth(frozenset(lost), frozenset(unusable), pending)


@dataclass(frozen=True, slots=True)
class GangRequest:
    """A job whose ``pod_count`` identical pods must all be placed at once or not at all."""

    key: str
    priority: int
    arrival: float
    pod_count: int
    per_pod: Mapping[str, int]
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    required_topology_key: str | None = None
    preferred_topology_key: str | None = None
    # One pod per node, on nodes with no GPU in use, each holding all of its node's GPUs.
    exclusive: bool = False
    # Where the gang writes its checkpoints (``<namespace>/<claim>/<subPath>``, see ``checkpoint_key``):
    # two gangs writing one directory would mix their checkpoints, so one such gang runs at a time.
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.pod_count < 1:
            raise ValueError(f"{self.key}: pod_count must be >= 1, got {self.pod_count}")
        negative = sorted(name for name, amount in self.per_pod.items() if amount < 0)
        if negative:
            raise ValueError(f"{self.key}: negative per-pod request for {', '.join(negative)}")


def checkpoint_key(namespace: str, claim: str, sub_path: str | None) -> str:
    """One directory of one claim, however its sub-path is written (``a/``, ``./a``, ``a//b/..``)."""
    directory = posixpath.normpath(sub_path) if sub_path else "."
    return f"{namespace}/{claim}/{'' if directory == '.' else directory}"


def checkpoint_directory(key: str) -> str:
    """The key without its namespace, as the job's status names it: ``claim`` or ``claim/subPath``."""
    _namespace, claim, directory = key.split("/", 2)
    return f"{claim}/{directory}" if directory else claim


def checkpoint_key_of(namespace: str, directory: str) -> str:
    """The key of a directory named as ``checkpoint_directory`` names it (claim names have no ``/``)."""
    claim, _, sub_path = directory.partition("/")
    return checkpoint_key(namespace, claim, sub_path or None)


def describe_checkpoint(key: str) -> str:
    _namespace, claim, directory = key.split("/", 2)
    return f"claim {claim}" + (f", subPath {directory}" if directory else "")


@dataclass(frozen=True, slots=True)
class Placement:
    """``nodes[i]`` is the node for pod rank ``i``; pods sharing a node have consecutive ranks."""

    key: str
    nodes: tuple[str, ...]


class WaitReason(StrEnum):
    # Fits in the empty cluster, but not in the free capacity right now.
    InsufficientCapacity = "InsufficientCapacity"
    # Would fit right now, but the head of the queue (a job ahead of it in priority, then arrival
    # order, whatever its priority) does not fit yet: strict order, so big gangs are not starved.
    QueuedBehindHead = "QueuedBehindHead"
    # Cannot fit even if every usable, matching, tolerated node were empty.
    Unschedulable = "Unschedulable"
    # Another admitted gang writes its checkpoint directory: it waits for that one, blocking nobody.
    CheckpointInUse = "CheckpointInUse"


@dataclass(frozen=True, slots=True)
class Waiting:
    key: str
    # Place in the admission order, 1 the head; None for a gang that blocks nobody: one that can never
    # fit, or one that waits for another gang's checkpoint directory.
    position: int | None
    reason: WaitReason
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: tuple[Placement, ...]
    waiting: tuple[Waiting, ...]
