"""What a pod's status says (pure), for the TrainJob and InferenceService plans."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

# The kubelet's reasons for a container that waits and will not start by waiting (the spec, an image
# or a referenced object must change): told on the workload rather than left as a silent Pending.
CANNOT_START = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


def cannot_start(status: Mapping[str, Any], container: str) -> str | None:
    """Why ``container`` of a pod with this status cannot start (``CANNOT_START``, with the kubelet's
    message), or None."""
    for state in status.get("containerStatuses") or []:
        waiting = (state.get("state") or {}).get("waiting") or {}
        if state.get("name") == container and waiting.get("reason") in CANNOT_START:
            return f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
    return None


class _Unschedulable(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def uid(self) -> str: ...
    @property
    def unschedulable_since(self) -> float | None: ...


View = TypeVar("View", bound=_Unschedulable)


def unschedulable_as_seen(
    views: Sequence[View], first_seen: Mapping[str, float], now: float
) -> tuple[list[View], dict[str, float]]:
    """``views`` whose ``unschedulable_since`` is no earlier than when this operator first saw each
    pod unschedulable (``first_seen``, by pod uid, as a name comes back with the next attempt; a pod seen
    so for the first time is seen ``now``),
    and the sightings to pass next time (only the pods unschedulable now). kube-scheduler stamps
    PodScheduled with its own clock: one behind the operator's by more than the binding timeout would
    release a gang as soon as its pods wait. An operator that restarts counts the wait again."""
    seen: dict[str, float] = {}
    out: list[View] = []
    for view in views:
        since = view.unschedulable_since
        if since is not None:
            key = view.uid or view.name
            seen[key] = first_seen.get(key, now)
            if since < seen[key]:
                view = dataclasses.replace(view, unschedulable_since=seen[key])  # type: ignore[type-var]
        out.append(view)
    return out, seen
