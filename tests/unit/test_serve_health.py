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
                ("GET", "/v1/chat/completions", None),
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


def _answers(server: Server, requests: list[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    from aiohttp.test_utils import TestClient, TestServer

    async def scenario() -> list[tuple[int, Any]]:
        async with TestClient(TestServer(server.app())) as client:
            answers = []
            for method, path, body in requests:
                async with client.request(method, path, json=body) as response:
                    answers.append((response.status, await response.json()))
            return answers

    return asyncio.run(asyncio.wait_for(scenario(), 30))  # one taken as valid would wait for the engine


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [300]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": "hi", "stop": ["\udc00"]}, "stop"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 100}, "max_tokens"),  # past the context
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "seed": 1.5}, "seed"),
        ({"prompt": "hi", "stop": [1]}, "stop"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "hi", "n": 2}, "n"),
        ({"prompt": "hi", "n": True}, "n"),  # true equals 1 in Python: no count
        ({"prompt": "hi", "best_of": True}, "best_of"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "presence_penalty": True}, "presence_penalty"),
        ({"prompt": "hi", "logit_bias": {"1": 2}}, "logit_bias"),
    ],
)
def test_a_refused_request_names_the_field_at_fault(body: dict[str, Any], param: str) -> None:
    """OpenAI's clients show an error's ``param``: it was always null."""
    ours, _theirs = multiprocessing.Pipe()
    engine = EngineClient(None, ours, limit=4)  # type: ignore[arg-type]
    engine.context = 32
    [(status, answer)] = _answers(
        Server("tiny", engine, Metrics(CollectorRegistry())), [("POST", "/v1/completions", body)]
    )
    assert status == 400
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"
    assert not _theirs.poll()  # nothing reached the engine


def test_one_model_is_served_by_its_id_and_another_is_not_found() -> None:
    ours, _theirs = multiprocessing.Pipe()
    server = Server("tiny", EngineClient(None, ours, limit=4), Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    (listed, one, other, asked) = _answers(
        server,
        [
            ("GET", "/v1/models", None),
            ("GET", "/v1/models/tiny", None),
            ("GET", "/v1/models/gpt-9", None),
            ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}),
        ],
    )
    assert listed[0] == one[0] == 200
    assert (
        one[1]
        == listed[1]["data"][0]
        == {"id": "tiny", "object": "model", "created": server.created, "owned_by": "largo"}
    )
    for status, answer in (other, asked):
        assert status == 404
        assert answer["error"]["code"] == "model_not_found"
        assert answer["error"]["param"] == "model"
    # Before its model is loaded a server lists none, and has none by its id.
    loading = Server("tiny", None, Metrics(CollectorRegistry()), problem="loading")
    (listed, one) = _answers(loading, [("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None)])
    assert listed == (200, {"object": "list", "data": []})
    assert one[0] == 404


def test_every_chunk_of_a_stream_carries_its_request_s_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``created`` was read from the clock for each chunk: a stream running across a second's turn
    changed it mid-way, which OpenAI's chunks never do."""
    import json

    from aiohttp.test_utils import TestClient, TestServer
    from largo.runtime.engine_process import Output

    clock = [1_000_000.0]
    monkeypatch.setattr(serve.time, "time", lambda: clock[0])
    ours, theirs = multiprocessing.Pipe()
    engine = EngineClient(None, ours, limit=4)  # type: ignore[arg-type]
    engine.context = 32
    server = Server("tiny", engine, Metrics(CollectorRegistry()))

    async def scenario() -> str:
        async with TestClient(TestServer(server.app())) as client:
            body = {"prompt": "hi", "max_tokens": 3, "stream": True}
            answer = asyncio.ensure_future(client.post("/v1/completions", json=body))
            assert await asyncio.to_thread(theirs.poll, 10)  # the request reached the engine
            submission = theirs.recv()
            events = []
            response = None
            for generated, (text, finish) in enumerate(((b"a", None), (b"b", None), (b"c", "length")), 1):
                clock[0] += 1  # each token a second after the one before
                output = Output(submission.id, text, finish, generated, None)
                engine._handle(Progress([output], [], EngineStats(1, 0, 3, 32)))
                response = response or await answer  # its headers come with the first chunk
                events.append((await response.content.readuntil(b"\n\n")).decode())
            assert response is not None
            return "".join(events) + await response.text()

    text = asyncio.run(asyncio.wait_for(scenario(), 30))
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "abc"
    assert {chunk["created"] for chunk in chunks} == {1_000_000}
