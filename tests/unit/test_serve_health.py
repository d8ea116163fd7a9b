"""The server's probes while its engine is stalled: a pipeline member hung in a step held the leader's
requests for the pipeline timeout (10 minutes) while it stayed ready and alive."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest
from largo.runtime import engine_process, serve
from largo.runtime.engine_process import (
    STALLED_DEAD_SECONDS,
    STALLED_UNREADY_SECONDS,
    EngineClient,
    EngineStats,
    Progress,
    Submission,
)
from largo.runtime.serve import Metrics, Server
from prometheus_client import CollectorRegistry


def _probe(probe: Any) -> tuple[int, str]:
    answer = asyncio.run(probe(None))
    return answer.status, answer.text


def test_an_engine_silent_with_requests_in_it_is_unready_then_not_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    for module in (engine_process, serve):
        monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    ours, _theirs = multiprocessing.Pipe()
    engine = EngineClient(None, ours, limit=4)  # type: ignore[arg-type]
    server = Server("tiny", engine, Metrics(CollectorRegistry()))
    now[0] += 3600  # idle for an hour: no stall
    assert _probe(server.readyz)[0] == _probe(server.healthz)[0] == 200
    submission = Submission(engine.next_id(), b"def ", 8, 0.0, 1.0, None, (), False)
    assert engine.submit(submission, lambda output: None)
    now[0] += STALLED_UNREADY_SECONDS + 1
    status, text = _probe(server.readyz)
    assert status == 503
    assert "no progress for 31s with 1 request(s) in it" in text
    assert _probe(server.healthz)[0] == 200
    engine._handle(Progress([], [1], EngineStats(1, 0, 4, 64)))  # it moves again
    assert _probe(server.readyz)[0] == 200
    now[0] += STALLED_DEAD_SECONDS + 1
    assert _probe(server.healthz)[0] == 503  # its group is restarted
