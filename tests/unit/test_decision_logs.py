"""Every decision largo announces as an event is also one log line with the job's key, in text or JSON."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

from largo.controllers.kube import Kube
from largo.controllers.leader import LeaderGate
from largo.controllers.main import log_handler

JOB = {
    "apiVersion": "largo.dev/v1alpha1",
    "kind": "TrainJob",
    "metadata": {"name": "llm", "namespace": "team-a", "uid": "u"},
}


class FakeCore:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def create_namespaced_event(
        self, namespace: str, body: Any, field_manager: str, _request_timeout: tuple[float, float]
    ) -> None:
        self.events.append(body)


def _post_event(handler: logging.Handler) -> FakeCore:
    kube = Kube.__new__(Kube)
    core = FakeCore()
    kube.core = core  # type: ignore[assignment]
    kube.gate = LeaderGate()
    kube.field_manager = "largo-operator"
    kube.on_event = lambda reason, type_: None
    logger = logging.getLogger("largo.controllers.kube")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        asyncio.run(
            kube.event(JOB, "Warning", "PodFailed", "pod llm-node-1 (rank 1) failed with exit code 1")
        )
    finally:
        logger.removeHandler(handler)
    return core


def test_a_decision_is_one_text_line_with_the_job_s_key() -> None:
    handler = log_handler("text")
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    core = _post_event(handler)
    (line,) = stream.getvalue().splitlines()
    assert "WARNING largo.controllers.kube: team-a/llm PodFailed: pod llm-node-1 (rank 1) failed" in line
    assert [event["reason"] for event in core.events] == ["PodFailed"]


def test_json_logs_carry_the_object_and_the_reason_as_fields() -> None:
    handler = log_handler("json")
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    _post_event(handler)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "WARNING"
    assert record["logger"] == "largo.controllers.kube"
    assert record["object"] == "team-a/llm"
    assert record["reason"] == "PodFailed"
    assert "failed with exit code 1" in record["message"]
    assert "time" in record
