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


def test_every_refusal_of_the_api_is_in_the_openai_error_shape() -> None:
    """An integer of more digits than Python converts (4,300) raised a ValueError past the JSON
    errors: aiohttp answered a plain-text 500. Its own 404 and 405 were plain text too."""
    from aiohttp.test_utils import TestClient, TestServer

    ours, _theirs = multiprocessing.Pipe()
    server = Server("tiny", EngineClient(None, ours, limit=4), Metrics(CollectorRegistry()))  # type: ignore[arg-type]

    async def scenario() -> list[tuple[int, str, Any, str | None]]:
        async with TestClient(TestServer(server.app())) as client:
            answers = []
            for method, path, body in (
                ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
                ("GET", "/v1/models/tiny", None),
                ("GET", "/v1/completions", None),
            ):
                async with client.request(method, path, data=body) as response:
                    allowed = response.headers.get("Allow")
                    answers.append((response.status, response.content_type, await response.json(), allowed))
            return answers

    (big, missing, method) = asyncio.run(scenario())
    assert big[:2] == (400, "application/json")
    assert big[2]["error"]["message"] == "the request body is not valid JSON"
    assert missing[:2] == (404, "application/json")
    assert missing[2]["error"]["type"] == "not_found_error"
    assert method[:2] == (405, "application/json")
    assert method[3] == "POST"
    assert set(method[2]["error"]) == {"message", "type", "param", "code"}


def test_the_requests_a_failed_engine_ended_are_told_why() -> None:
    """The engine sends the ended requests' outputs, then its failure: a handler woken by its output
    read the failure before it came, and its client was told "the model failed: unknown"."""
    from largo.runtime.engine_process import Output

    ours, _theirs = multiprocessing.Pipe()
    engine = EngineClient(None, ours, limit=4)  # type: ignore[arg-type]
    server = Server("tiny", engine, Metrics(CollectorRegistry()))
    told: list[str] = []
    submission = Submission(engine.next_id(), b"def ", 8, 0.0, 1.0, None, (), False)
    assert engine.submit(submission, lambda output: told.append(server._failed()))
    reason = "RuntimeError: invalid multinomial distribution"
    ended = Output(submission.id, b"", "error", 0, None)
    engine._handle(Progress([ended], [], EngineStats(0, 0, 0, 64), reason))
    assert told == [f"the model failed: {reason}"]
    # Failed itself, or the pipe's loss, still ends the rest: it is not taken as said.
    assert engine.failure is None
