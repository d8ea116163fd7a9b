"""What a pod's status says of its containers (pure), for the TrainJob and InferenceService plans."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
