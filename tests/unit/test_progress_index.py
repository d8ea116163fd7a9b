"""The progress reports' index: only a job's own ConfigMap speaks for it."""

from __future__ import annotations

import asyncio
from typing import Any

from largo.controllers.handlers import progress_reports
from largo.manifests.names import LABEL_PROGRESS_OF


def _indexed(name: str, of: str) -> dict[Any, Any]:
    body = {"metadata": {"name": name, "namespace": "ns"}, "data": {"progress": "{}"}}
    indexed: dict[Any, Any] = asyncio.run(
        progress_reports(namespace="ns", name=name, labels={LABEL_PROGRESS_OF: of}, body=body)
    )
    return indexed


def test_a_job_s_own_progress_configmap_is_its_report() -> None:
    assert _indexed("train-progress", "train") == {("ns", "train"): {"progress": "{}"}}


def test_a_configmap_relabelled_to_speak_for_another_job_is_ignored() -> None:
    """A trainer may patch its own ConfigMap, labels included: relabelled, it must not feed (or break)
    another job's status."""
    assert _indexed("train-progress", "victim") == {}
