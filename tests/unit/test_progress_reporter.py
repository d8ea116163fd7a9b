"""Rank 0's progress reporter: the last report always goes out, even when it arrives while an earlier
one is still being sent (a short job's final step and checkpoint, which a service may follow)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from largo.runtime.progress import REPORT_KEY, ProgressReporter


class SlowApi:
    """Records each ConfigMap patch; the first one blocks until released."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def patch_namespaced_config_map(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        if not self.patches:
            self.first_started.set()
            assert self.release.wait(10)
        self.patches.append(json.loads(body["data"][REPORT_KEY]))


def test_a_report_made_while_another_is_sent_is_sent_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGO_PROGRESS_CONFIGMAP", "job-progress")
    monkeypatch.setenv("LARGO_JOB_NAMESPACE", "ns")
    api = SlowApi()
    monkeypatch.setattr(ProgressReporter, "_client", lambda self: api)
    reporter = ProgressReporter(interval=60)
    reporter.report({"step": 25})
    assert api.first_started.wait(10)
    reporter.report({"step": 30, "checkpointStep": 30})  # the final step, during the first send
    closing = threading.Thread(target=reporter.close)
    closing.start()
    api.release.set()
    closing.join(10)
    assert api.patches == [{"step": 25}, {"step": 30, "checkpointStep": 30}]


def test_nothing_new_means_nothing_sent_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGO_PROGRESS_CONFIGMAP", "job-progress")
    monkeypatch.setenv("LARGO_JOB_NAMESPACE", "ns")
    api = SlowApi()
    api.release.set()
    monkeypatch.setattr(ProgressReporter, "_client", lambda self: api)
    reporter = ProgressReporter(interval=60)
    reporter.report({"step": 1})
    assert api.first_started.wait(10)
    reporter.close()
    assert api.patches == [{"step": 1}]
