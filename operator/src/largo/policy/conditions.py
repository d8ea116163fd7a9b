"""Kubernetes-style conditions: set one, keep ``lastTransitionTime`` unless the status really changed."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any


def timestamp(epoch: float) -> str:
    """RFC 3339 in UTC with second precision, as the API server writes times."""
    return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: object) -> float | None:
    """Epoch seconds of an RFC 3339 time; None for a missing or malformed one (never raises: status
    fields may have been written by hand)."""
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


# metav1.Condition's limit on a message; the CRD schema enforces it.
MESSAGE_LIMIT = 32768


def listed(names: Sequence[object], most: int = 8) -> str:
    """``names`` joined for a message, the first ``most`` of them and a count of the rest: a gang's
    thousand nodes would not fit a condition (nor be read)."""
    shown = ", ".join(str(name) for name in names[:most])
    return f"{shown}, … ({len(names) - most} more)" if len(names) > most else shown


def _bounded(message: str) -> str:
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 1] + "…"


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: float,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new condition list with ``type_`` set; the order of the other conditions is kept."""
    value = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for condition in conditions:
        if condition.get("type") != type_:
            out.append(dict(condition))
            continue
        found = True
        changed = condition.get("status") != value
        out.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": _bounded(message),
                "lastTransitionTime": timestamp(now) if changed else condition.get("lastTransitionTime"),
                **({"observedGeneration": generation} if generation is not None else {}),
            }
        )
    if not found:
        out.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": _bounded(message),
                "lastTransitionTime": timestamp(now),
                **({"observedGeneration": generation} if generation is not None else {}),
            }
        )
    return out


def condition_status(conditions: Sequence[Mapping[str, Any]], type_: str) -> str | None:
    for condition in conditions:
        if condition.get("type") == type_:
            value = condition.get("status")
            return str(value) if value is not None else None
    return None
