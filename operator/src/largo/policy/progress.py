"""Progress reports from the training runtime, read defensively (pure).

Rank 0 writes its report as JSON into the job's progress ConfigMap, which is all its identity may
write. Whatever it wrote, the operator either accepts a report that fits ``ProgressReport`` or refuses
it with a one-line reason: a report never raises, never reaches the lifecycle, and never touches any
status field but ``progress``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from largo.api.v1alpha1 import ProgressReport

# The ConfigMap key the runtime writes; the rest of the ConfigMap is ignored.
REPORT_KEY = "progress"
# A report is a few hundred bytes; anything much larger is not a progress report.
MAX_REPORT_BYTES = 4096


@dataclass(frozen=True, slots=True)
class ReadReport:
    """One read of the ConfigMap: the accepted status.progress, or why the report was refused."""

    progress: dict[str, Any] | None = None
    refused: str | None = None


def _utc(moment: datetime.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_report(data: Mapping[str, Any] | None) -> ReadReport | None:
    """The report in a progress ConfigMap's ``data``; None when the runtime has not reported yet."""
    raw = (data or {}).get(REPORT_KEY)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        return ReadReport(refused=f"data.{REPORT_KEY} is not a string")
    size = len(raw.encode())
    if size > MAX_REPORT_BYTES:
        return ReadReport(refused=f"report of {size} bytes is larger than {MAX_REPORT_BYTES}")
    try:
        parsed = json.loads(raw)
    except ValueError as error:
        return ReadReport(refused=f"report is not JSON: {error}")
    if not isinstance(parsed, dict):
        return ReadReport(refused=f"report is a JSON {type(parsed).__name__}, not an object")
    try:
        report = ProgressReport.model_validate(parsed)
    except pydantic.ValidationError as error:
        problems = [
            f"{'.'.join(str(part) for part in problem['loc']) or 'report'}: {problem['msg']}"
            for problem in error.errors()
        ]
        return ReadReport(refused="; ".join(problems)[:500])
    progress = report.model_dump(mode="json", by_alias=True, exclude_none=True)
    try:
        progress["updatedAt"] = _utc(report.updated_at)
        if report.checkpointed_at is not None:
            progress["checkpointedAt"] = _utc(report.checkpointed_at)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is past year 9999 in UTC
        return ReadReport(refused="a timestamp is out of range once in UTC")
    progress["stale"] = False
    return ReadReport(progress=progress)
