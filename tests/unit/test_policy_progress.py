"""Progress reports from the runtime: accepted only when well-formed, refused with a reason otherwise,
and never able to change anything but status.progress."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from largo.api.v1alpha1 import Phase
from largo.policy.conditions import condition_status, timestamp
from largo.policy.progress import MAX_REPORT_BYTES, REPORT_KEY, read_report
from largo.policy.trainjob import JobView, PodView, plan
from largo.runtime.progress import progress_fields

NOW = 1_800_000_000.0
NONE: frozenset[str] = frozenset()


def good(**changes: Any) -> dict[str, Any]:
    report = progress_fields(40, 100, 1.25, 5000.0, 2.0, NOW - 5)
    report.update(changes)
    return report


def data(report: Any) -> dict[str, str]:
    return {REPORT_KEY: report if isinstance(report, str) else json.dumps(report)}


def test_the_runtime_s_own_report_is_accepted_as_written() -> None:
    read = read_report(data(good()))
    assert read is not None
    assert read.refused is None
    assert read.progress is not None
    assert read.progress["step"] == 40
    assert read.progress["totalSteps"] == 100
    assert read.progress["percent"] == 40
    assert read.progress["updatedAt"] == timestamp(NOW - 5)
    assert read.progress["summary"].startswith("40% 40/100 loss 1.250")
    assert read.progress["stale"] is False


def test_no_report_yet_is_not_a_refusal() -> None:
    assert read_report(None) is None
    assert read_report({}) is None
    assert read_report({REPORT_KEY: ""}) is None


def test_offset_times_are_written_in_utc() -> None:
    read = read_report(data(good(updatedAt="2027-01-15T09:00:00+01:00")))
    assert read is not None
    assert read.progress is not None
    assert read.progress["updatedAt"] == "2027-01-15T08:00:00Z"


@pytest.mark.parametrize(
    ("report", "says"),
    [
        (good(updatedAt="yesterday-ish"), "updatedAt"),
        (good(step="forty"), "step"),
        (good(step=-1), "step"),
        # int64 in the API server: a larger count would fail every status write carrying it.
        (good(step=2**63), "step"),
        (good(etaSeconds=10**30), "etaSeconds"),
        # Past year 9999 once in UTC: it raised, and failed every reconcile and scheduling pass.
        (good(updatedAt="9999-12-31T23:59:59-01:00"), "out of range once in UTC"),
        (good(percent=250), "percent"),
        (good(loss="NaN"), "loss"),
        (good(summary="x" * 201), "summary"),
        ({"step": 1}, "totalSteps"),
        ([1, 2, 3], "not an object"),
        ("{not json", "not JSON"),
        ("x" * (1024 * 1024), f"larger than {MAX_REPORT_BYTES}"),
    ],
)
def test_malformed_reports_are_refused_with_a_reason(report: Any, says: str) -> None:
    read = read_report(data(report))
    assert read is not None
    assert read.progress is None
    assert read.refused is not None
    assert says in read.refused


def test_a_report_that_is_not_a_string_is_refused() -> None:
    read = read_report({REPORT_KEY: 42})
    assert read is not None
    assert read.refused == "data.progress is not a string"


def _running(**status: Any) -> dict[str, Any]:
    return {
        "phase": Phase.RUNNING,
        "attempt": 0,
        "placement": {"attempt": 0, "nodes": ["n0", "n1"]},
        "startTime": timestamp(NOW - 60),
        **status,
    }


def _pods(phase: str = "Running") -> list[PodView]:
    return [PodView(name=f"j-node-{r}", rank=r, attempt=0, phase=phase, node_name=f"n{r}") for r in (0, 1)]


def _plan(status: dict[str, Any], report: Any, pods_phase: str = "Running", now: float = NOW) -> Any:
    view = JobView(num_nodes=2, gpus_per_node=8, status=status, report=read_report(data(report)))
    return plan(view, _pods(pods_phase), NONE, NONE, now)


def test_an_accepted_report_becomes_status_progress() -> None:
    result = _plan(_running(), good())
    assert result.status["progress"]["step"] == 40
    assert condition_status(result.status["conditions"], "ProgressReported") == "True"
    assert result.events == []


def test_a_refused_report_keeps_the_last_good_one_and_says_why_once() -> None:
    accepted = _plan(_running(), good()).status
    refused = _plan(accepted, good(updatedAt="not a time", step=99))
    assert refused.status["progress"] == accepted["progress"]
    condition = next(c for c in refused.status["conditions"] if c["type"] == "ProgressReported")
    assert condition["status"] == "False"
    assert condition["reason"] == "InvalidProgressReport"
    assert "updatedAt" in condition["message"]
    assert [(e.type, e.reason) for e in refused.events] == [("Warning", "InvalidProgressReport")]
    again = _plan(refused.status, good(updatedAt="not a time", step=99))
    assert again.events == []  # the same refusal is not announced twice
    assert again.status == refused.status


@pytest.mark.parametrize(
    "report",
    [
        {"phase": "Succeeded", "placement": {"nodes": ["elsewhere"]}, "conditions": []},
        good(phase="Failed", restarts=99, placement={"attempt": 0, "nodes": ["x", "y"]}),
        "x" * (1024 * 1024),
    ],
)
def test_no_report_reaches_beyond_progress(report: Any) -> None:
    status = _running()
    result = _plan(status, report)
    for field in ("phase", "placement", "attempt", "restarts", "startTime"):
        assert result.status.get(field) == status.get(field) or field == "restarts"
    assert result.status.get("restarts") == 0
    assert "phase" not in (result.status.get("progress") or {})


def test_garbage_progress_does_not_stop_the_lifecycle() -> None:
    garbage = {REPORT_KEY: "x" * (1024 * 1024)}
    status = _running(progress={"step": 1, "updatedAt": "garbage", "summary": "?"})
    view = JobView(num_nodes=2, gpus_per_node=8, status=status, report=read_report(garbage))
    done = plan(view, _pods("Succeeded"), NONE, NONE, NOW)
    assert done.status["phase"] == Phase.SUCCEEDED


def test_a_stale_report_is_not_replaced_by_the_same_report() -> None:
    report = good()
    first = _plan(_running(), report)
    stale = _plan(first.status, report, now=NOW + 1000)
    assert stale.status["progress"]["stale"] is True
    still = _plan(stale.status, report, now=NOW + 1001)
    assert still.status["progress"]["stale"] is True
    fresh = _plan(stale.status, good(step=41, updatedAt=timestamp(NOW + 1000)), now=NOW + 1001)
    assert fresh.status["progress"]["stale"] is False
    assert fresh.status["progress"]["step"] == 41


def test_a_report_carries_the_newest_checkpoint() -> None:
    report = progress_fields(40, 100, 1.25, 5000.0, 2.0, NOW, checkpoint=(30, NOW - 120))
    read = read_report(data(report))
    assert read is not None
    assert read.progress is not None
    assert read.progress["checkpointStep"] == 30
    assert read.progress["checkpointedAt"] == timestamp(NOW - 120)
    without = progress_fields(40, 100, 1.25, 5000.0, 2.0, NOW)
    assert "checkpointedAt" not in without


@pytest.mark.parametrize("loss", [math.nan, math.inf, None])
def test_a_loss_that_is_no_number_is_sent_as_null_and_the_report_is_taken(loss: float | None) -> None:
    """A diverged run's NaN once made the operator refuse every report from then on: the progress froze
    at the last finite step, then read as stale, and the last report's checkpoint never arrived."""
    report = progress_fields(40, 100, loss, 5000.0, 2.0, NOW, checkpoint=(30, NOW - 120))
    assert report["loss"] is None
    read = read_report(data(json.dumps(report, allow_nan=False)))
    assert read.progress is not None
    assert read.progress["step"] == 40
    assert read.progress["checkpointStep"] == 30
