"""The router's activator, on a real socket, while no replica is ready: a long request is held like
any other (not refused at aiohttp's 1 MiB default), one over the per-request cap gets an OpenAI-style
413, and the bytes held in all are bounded; a held streaming request gets keepalive comments, then the
replica's events or an error event; a held request whose client left is let go. And the admin socket
of a wedged HAProxy times out."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from largo.router.agent import (
    PARSED_BODY_BYTES,
    Router,
    RuntimeApi,
    activator_app,
    activator_runner,
    answer_as_event,
    forwarding_session,
    parse_args,
    wants_stream,
)
from largo.router.haproxy import Replica, State
from prometheus_client import CollectorRegistry

MIB = 1024 * 1024


def _router(*flags: str) -> Router:
    router = Router(
        parse_args(["--namespace=ml", "--service=chat", "--hold-timeout=0.3", *flags]), CollectorRegistry()
    )
    shutil.rmtree(router.workdir)  # HAProxy's directory: not used here
    return router


async def _post(router: Router, size: int, concurrently: int = 1) -> list[tuple[int, Any]]:
    async with TestServer(activator_app(router)) as server, aiohttp.ClientSession() as session:

        async def one() -> tuple[int, Any]:
            async with session.post(server.make_url("/v1/completions"), data=b"x" * size) as response:
                return response.status, await response.json()

        return list(await asyncio.gather(*(one() for _ in range(concurrently))))


def test_a_request_over_a_mib_is_held_then_timed_out_like_any_other() -> None:
    router = _router()
    ((status, body),) = asyncio.run(_post(router, 2 * MIB))
    assert status == 503
    assert "became ready within 0.3s" in body["error"]["message"]
    assert router.held_bytes == 0
    assert router.registry.get_sample_value("largo_router_requests_held") == 0


def test_a_request_over_the_per_request_cap_gets_a_413_that_says_so() -> None:
    ((status, body),) = asyncio.run(_post(_router("--hold-max-body-bytes=1000"), 1001))
    assert status == 413
    assert body["error"]["code"] == 413
    assert "1000 bytes" in body["error"]["message"]


def test_the_bytes_held_in_all_are_bounded() -> None:
    router = _router("--hold-max-bytes=2500")
    answers = asyncio.run(_post(router, 1000, concurrently=3))
    # Two fit (and time out after the hold); the third is refused at once with Retry-After's 503.
    messages = sorted(body["error"]["message"] for _, body in answers)
    assert [status for status, _ in answers] == [503, 503, 503]
    assert sum("holds as much as it can" in m for m in messages) == 1
    assert router.held_bytes == 0


def test_a_wedged_admin_socket_times_out() -> None:
    async def scenario(path: Path) -> None:
        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)

        server = await asyncio.start_unix_server(never_answer, str(path))
        async with server:
            with pytest.raises(TimeoutError):
                await RuntimeApi(path, answer_within=0.2).call("show servers state replicas")

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(Path(directory) / "admin.sock"))


def test_bytes_still_arriving_count_against_the_budget() -> None:
    """A body was counted only once read whole: concurrent uploads all buffered in full before any
    was checked (8 prompts of 60 MiB overran the router's 512 MiB). Chunked uploads, whose length is
    not declared, are counted as they arrive: the third of three is refused while all three are
    still sending, before any body is complete."""
    router = _router("--hold-max-bytes=2500")

    async def scenario() -> tuple[int, list[int]]:
        finish = asyncio.Event()
        async with TestServer(activator_app(router)) as server, aiohttp.ClientSession() as session:

            async def chunked() -> Any:
                yield b"x" * 900
                await finish.wait()  # the rest only once one of them was refused
                yield b"x" * 100

            async def one() -> int:
                async with session.post(server.make_url("/v1/completions"), data=chunked()) as response:
                    return response.status

            uploads = [asyncio.create_task(one()) for _ in range(3)]
            done, _ = await asyncio.wait(uploads, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            first = next(iter(done)).result() if done else 0
            finish.set()
            return first, sorted(await asyncio.gather(*uploads))

    first, statuses = asyncio.run(scenario())
    assert first == 503  # refused mid-upload: the budget counts bytes as they come
    assert statuses == [503, 503, 503]  # the other two held, then timed out
    assert router.registry.get_sample_value("largo_router_hold_overflows_total") == 1
    assert router.held_bytes == 0


def test_a_body_that_does_not_arrive_gives_its_reservation_back() -> None:
    """A client that declares a long body and sends none would hold its share of the budget for as
    long as HAProxy keeps it (an hour): the read is bounded by the hold timeout (0.3 s here)."""
    router = _router()

    async def scenario() -> tuple[int, Any]:
        never = asyncio.Event()
        async with TestServer(activator_app(router)) as server, aiohttp.ClientSession() as session:

            async def stalled() -> Any:
                yield b"x" * 10
                await never.wait()
                yield b"x"

            url = server.make_url("/v1/completions")
            async with session.post(url, data=stalled(), headers={"Content-Length": "1000"}) as response:
                return response.status, await response.json()

    status, body = asyncio.run(scenario())
    assert status == 408
    assert "did not arrive within 0.3s" in body["error"]["message"]
    assert router.held_bytes == 0


# Streaming requests held while a model loads: keepalives, then the replica's events.

STREAM = json.dumps({"prompt": "hi", "max_tokens": 2, "stream": True}).encode()
WAITING = b": waiting for a replica of chat"


@pytest.mark.parametrize(
    ("body", "streams"),
    [
        (STREAM, True),
        (b'{"prompt": "hi", "stream": false}', False),
        (b'{"prompt": "hi", "stream": "yes"}', False),
        (b'{"prompt": "hi"}', False),
        (b'[{"stream": true}]', False),
        (b"not json", False),
        (b"\xff\xfe", False),
    ],
)
def test_only_a_json_object_with_stream_true_asks_for_events(body: bytes, streams: bool) -> None:
    assert wants_stream(body) is streams


LONG_IDS = b", ".join([b"100"] * 400_000)  # a prompt of token ids, over PARSED_BODY_BYTES


@pytest.mark.parametrize(
    ("body", "streams"),
    [
        (b'{"prompt": [' + LONG_IDS + b'], "stream": true}', True),
        (b'{"stream" : true, "prompt": [' + LONG_IDS + b"]}", True),
        (b'{"prompt": [' + LONG_IDS + b'], "stream": false}', False),
        # Inside a string its quotes are escaped: not the request's flag.
        (b'{"prompt": "say \\"stream\\": true ' + b"x" * (2 << 20) + b'"}', False),
    ],
)
def test_a_large_body_is_searched_for_stream_not_parsed_whole(body: bytes, streams: bool) -> None:
    """Parsed whole, 64 MiB of token ids took ~600 MiB, past the router container's memory limit."""
    assert len(body) > PARSED_BODY_BYTES
    assert wants_stream(bytearray(body)) is streams


def test_a_replica_s_answer_after_the_events_started_keeps_its_error_or_its_body() -> None:
    refused = {"error": {"message": "max_tokens must be at least 1", "type": "invalid_request_error"}}
    assert answer_as_event(400, json.dumps(refused).encode()) == f"data: {json.dumps(refused)}\n\n".encode()
    whole = {"choices": [{"text": "ok"}]}
    assert answer_as_event(200, json.dumps(whole).encode()) == (
        f"data: {json.dumps(whole)}\n\ndata: [DONE]\n\n".encode()
    )
    (event,) = _events(answer_as_event(502, b"<html>bad gateway</html>"))
    assert event["error"]["code"] == 502
    assert event["error"]["message"] == "the replica answered 502"


def _events(stream: bytes) -> list[Any]:
    """The data events of a server-sent event stream, parsed (``[DONE]`` as itself)."""
    data = [line[len(b"data: ") :] for line in stream.split(b"\n") if line.startswith(b"data: ")]
    return [d.decode() if d == b"[DONE]" else json.loads(d) for d in data]


def _replica_app(status: int) -> web.Application:
    """A replica that streams two events and [DONE], or refuses with ``status`` and an OpenAI error."""

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        if status != 200:
            error = {"error": {"message": "max_tokens must be at least 1", "type": "invalid_request_error"}}
            return web.json_response(error, status=status)
        events = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await events.prepare(request)
        for text in ("a", "b"):
            await events.write(f"data: {json.dumps({'choices': [{'text': text}]})}\n\n".encode())
        await events.write(b"data: [DONE]\n\n")
        await events.write_eof()
        return events

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


async def _held_stream(
    router: Router, body: bytes, replica_status: int | None, ready_after_keepalives: int = 2
) -> tuple[int, str, list[bytes]]:
    """Posts ``body`` while no replica is ready; after ``ready_after_keepalives`` comments a replica
    answering ``replica_status`` becomes ready (None: none ever does). The status, the content type and
    the lines the client read."""
    async with (
        TestServer(_replica_app(replica_status or 200)) as replica_server,
        TestServer(activator_app(router)) as activator,
        aiohttp.ClientSession() as session,
    ):
        router.session = aiohttp.ClientSession()
        try:
            async with session.post(activator.make_url("/v1/completions"), data=body) as response:
                lines: list[bytes] = []
                while line := await response.content.readline():
                    lines.append(line.rstrip(b"\n"))
                    if replica_status is not None and lines.count(WAITING) == ready_after_keepalives:
                        port = replica_server.port
                        assert port is not None
                        router.desired = {"chat-r0": Replica("chat-r0", "127.0.0.1", port, State.READY)}
                        router.ready.set()
                return (response.status, response.content_type, [line for line in lines if line])
        finally:
            await router.session.close()


def test_a_held_stream_gets_keepalives_then_the_replica_s_events() -> None:
    router = _router("--hold-timeout=30", "--hold-keepalive=0.05")
    status, content_type, lines = asyncio.run(_held_stream(router, STREAM, replica_status=200))
    assert (status, content_type) == (200, "text/event-stream")
    assert lines[:2] == [WAITING, WAITING]  # the events started at the first keepalive
    assert _events(b"\n".join(lines[2:])) == [
        {"choices": [{"text": "a"}]},
        {"choices": [{"text": "b"}]},
        "[DONE]",
    ]
    assert router.registry.get_sample_value("largo_router_hold_seconds_count") == 1
    assert router.registry.get_sample_value("largo_router_requests_held") == 0


def test_a_held_stream_that_no_replica_takes_ends_with_an_error_event_at_the_hold_timeout() -> None:
    router = _router("--hold-timeout=0.4", "--hold-keepalive=0.1")
    status, _, lines = asyncio.run(_held_stream(router, STREAM, replica_status=None))
    assert status == 200  # sent with the first keepalive
    assert 2 <= lines.count(WAITING) <= 4
    (event,) = _events(b"\n".join(lines))
    assert event["error"]["code"] == 503
    assert event["error"]["message"] == "no replica of chat became ready within 0.4s; try again later"
    assert router.registry.get_sample_value("largo_router_hold_timeouts_total") == 1


def test_a_held_stream_the_replica_refuses_gets_the_replica_s_error_as_an_event() -> None:
    router = _router("--hold-timeout=30", "--hold-keepalive=0.05")
    status, _, lines = asyncio.run(_held_stream(router, STREAM, replica_status=400, ready_after_keepalives=1))
    assert status == 200
    (event,) = _events(b"\n".join(lines))
    assert event["error"]["message"] == "max_tokens must be at least 1"


@pytest.mark.parametrize(
    ("body", "flags"),
    [
        (b'{"prompt": "hi", "stream": false}', ["--hold-keepalive=0.05"]),  # not a stream
        (STREAM, ["--hold-keepalive=0"]),  # keepalives off
    ],
)
def test_other_held_requests_wait_in_silence_and_get_the_503_status(body: bytes, flags: list[str]) -> None:
    router = _router(*flags)
    status, content_type, lines = asyncio.run(_held_stream(router, body, replica_status=None))
    assert (status, content_type) == (503, "application/json")
    assert WAITING not in lines
    assert "became ready within 0.3s" in json.loads(b"".join(lines))["error"]["message"]


def test_a_held_request_whose_client_left_is_let_go() -> None:
    """On the activator's own server (aiohttp's test server cancels handlers; its servers do not by
    default): a held request whose client closed the connection stops counting as held (the load the
    autoscaler scales from zero for) at once, not at the hold timeout, and gives its bytes back."""
    router = _router("--hold-timeout=60")
    held = "largo_router_requests_held"

    async def until(condition: Any, within: float) -> None:
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110 (a gauge's value: nothing to wait on but it)
                await asyncio.sleep(0.01)

    async def scenario() -> None:
        runner = activator_runner(router)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            _, port = runner.addresses[0][:2]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b'{"prompt": "hi"}'
            head = f"POST /v1/completions HTTP/1.1\r\nHost: chat\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await until(lambda: router.registry.get_sample_value(held) == 1, 10)
            assert router.held_bytes == len(body)
            writer.close()
            await writer.wait_closed()
            await until(lambda: router.registry.get_sample_value(held) == 0, 10)
            assert router.held_bytes == 0
            assert router.registry.get_sample_value("largo_router_hold_timeouts_total") == 0
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


# A replica that fails while a held request is forwarded to it.


async def _raw_replica(answer: bytes) -> asyncio.Server:
    """A replica that reads a request's head and body, writes ``answer`` (bytes as they come on the
    wire) and closes the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")]
        length = int(lengths[0].split(b":")[1]) if lengths else 0
        await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _forwarded(router: Router, replica_answer: bytes, body: bytes) -> tuple[int, str, bytes, bool]:
    """Posts ``body`` while the replica is not ready yet; it becomes ready after ``0.1`` s. The status,
    the content type, the body the client read (before a cut, if cut) and whether it was cut."""
    replica = await _raw_replica(replica_answer)
    async with (
        replica,
        TestServer(activator_app(router)) as activator,
        aiohttp.ClientSession() as session,
    ):
        router.session = aiohttp.ClientSession()

        async def ready_soon() -> None:
            await asyncio.sleep(0.1)
            port = replica.sockets[0].getsockname()[1]
            router.desired = {"chat-r0": Replica("chat-r0", "127.0.0.1", port, State.READY)}
            router.ready.set()

        becoming_ready = asyncio.create_task(ready_soon())
        try:
            async with session.post(activator.make_url("/v1/completions"), data=body) as response:
                read = b""
                try:
                    async for chunk in response.content.iter_any():
                        read += chunk
                except aiohttp.ClientPayloadError:
                    return response.status, response.content_type, read, True
                return response.status, response.content_type, read, False
        finally:
            await becoming_ready
            await router.session.close()


def test_a_replica_that_closes_before_answering_gets_a_502_the_client_can_read() -> None:
    """Not sent again (a request that kills its replica would kill the next one), and said in the
    OpenAI error shape, not aiohttp's text 500."""
    router = _router("--hold-timeout=30")
    status, content_type, body, _ = asyncio.run(_forwarded(router, b"", b'{"prompt": "hi"}'))
    assert (status, content_type) == (502, "application/json")
    error = json.loads(body)["error"]
    assert error["type"] == "server_error"
    assert error["message"].startswith("the replica of chat failed before answering")
    assert router.forwarded == {"chat-r0": 1}


def test_a_held_stream_whose_replica_fails_mid_event_ends_with_an_error_event() -> None:
    """The events the replica finished reach the client; the half-written one does not (the client
    would fail to parse it), and an error event ends the stream."""
    router = _router("--hold-timeout=30", "--hold-keepalive=0.05")
    whole = b'data: {"choices": [{"text": "a"}]}\n\n'
    half = b'data: {"partial'
    chunk = whole + half
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n"
    )  # and the connection closes without the last chunk
    status, content_type, body, cut = asyncio.run(_forwarded(router, answer, STREAM))
    assert (status, content_type, cut) == (200, "text/event-stream", False)
    assert body.startswith(WAITING)  # held a keepalive period, then forwarded
    events = _events(body)
    assert events[0] == {"choices": [{"text": "a"}]}
    (error,) = events[1:]
    assert error["error"]["code"] == 502
    assert error["error"]["message"].startswith("the replica of chat failed mid-answer")
    assert b'"partial' not in body


def test_a_compressed_answer_reaches_the_client_readable() -> None:
    """The forwarding client decompresses the replica's answer: its Content-Encoding must not be
    passed on with the decompressed bytes."""
    router = _router("--hold-timeout=30")
    payload = json.dumps({"choices": [{"text": "ok"}]}).encode()
    compressed = gzip.compress(payload)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(compressed)}\r\n\r\n".encode()
        + compressed
    )
    status, _, body, _ = asyncio.run(_forwarded(router, answer, b'{"prompt": "hi"}'))
    assert status == 200
    assert json.loads(body) == {"choices": [{"text": "ok"}]}


def test_an_answer_its_replica_fails_mid_way_reaches_the_client_cut() -> None:
    """Its status is sent when the replica fails: the connection closes before the answer's end, so
    that the client knows it is incomplete (an answer ended properly would be a wrong one)."""
    router = _router("--hold-timeout=30")
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"cho\r\n'
    )
    status, _, body, cut = asyncio.run(_forwarded(router, answer, b'{"prompt": "hi"}'))
    assert (status, body, cut) == (200, b'{"cho', True)


class _AdminSocket:
    """HAProxy's admin socket with no server yet, or wedged (a call times out)."""

    def __init__(self) -> None:
        self.wedged = False

    async def call(self, command: str) -> str:
        if self.wedged:
            raise TimeoutError(command)
        return "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state\n"


def test_ready_once_the_replicas_are_listed_and_synced_and_not_while_haproxy_is_wedged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new router that cannot list its EndpointSlices knows no replica: ready, it would take the
    service's traffic from the old one and hold every request until its 503. A proxy whose admin
    socket stopped answering is taken out of the Service, and restarted once that lasts."""
    now = [1000.0]
    monkeypatch.setattr("largo.router.agent.time.monotonic", lambda: now[0])
    router = _router()
    router.haproxy = type("Process", (), {"returncode": None})()  # type: ignore[assignment]
    socket = _AdminSocket()
    router.api = socket  # type: ignore[assignment]

    def status(probe: Any) -> tuple[int, str]:
        answer = asyncio.run(probe(None))
        return answer.status, answer.text

    asyncio.run(router.sync())
    assert status(router.readyz) == (503, "the replicas' EndpointSlices are not listed yet")
    assert status(router.healthz)[0] == 200
    router.on_slices({})
    asyncio.run(router.sync())
    assert status(router.readyz) == (200, "ready")
    socket.wedged = True
    now[0] += 16
    with pytest.raises(TimeoutError):
        asyncio.run(router.sync())
    assert status(router.readyz) == (503, "haproxy's servers are not synced")
    assert status(router.healthz)[0] == 200
    now[0] += 45
    assert status(router.healthz) == (503, "haproxy's admin socket does not answer")
    socket.wedged = False
    asyncio.run(router.sync())
    assert status(router.readyz)[0] == status(router.healthz)[0] == 200


def test_a_burst_held_at_zero_is_forwarded_whole_when_the_first_replica_is_ready() -> None:
    """150 requests held while no replica was ready: the forwarding client's pool of 100 connections
    made the rest wait for one past the connect timeout, and they got 502s."""
    router = _router("--hold-timeout=30")
    answered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await answered.wait()  # every request is in the replica before any is answered
        return web.json_response({"ok": True})

    async def scenario() -> list[int]:
        app = web.Application()
        app.router.add_post("/v1/completions", slow)
        async with (
            TestServer(app) as replica,
            TestServer(activator_app(router)) as activator,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            router.session = forwarding_session(router.args.connect_timeout)

            async def post() -> int:
                async with session.post(activator.make_url("/v1/completions"), data=b"{}") as response:
                    return response.status

            posts = [asyncio.create_task(post()) for _ in range(150)]
            await asyncio.sleep(0.3)  # all held
            router.desired = {"chat-r0": Replica("chat-r0", "127.0.0.1", replica.port, State.READY)}
            router.ready.set()
            # The 101st waited past its connect timeout.
            await asyncio.sleep(2 * router.args.connect_timeout + 0.5)
            answered.set()
            statuses = await asyncio.gather(*posts)
            await router.session.close()
            return statuses

    assert sorted(set(asyncio.run(scenario()))) == [200]


def test_a_health_check_at_zero_is_answered_at_once_and_is_no_load() -> None:
    """A load balancer's or kubelet's checks through the router were held as requests: each counted as
    demand (the service never stayed at zero), and each got a 503 after the hold."""
    router = _router("--hold-timeout=30")

    async def scenario() -> list[tuple[str, int]]:
        async with TestServer(activator_app(router)) as server, aiohttp.ClientSession() as session:
            answers = []
            for method, path, headers in (
                ("GET", "/healthz", {}),
                ("HEAD", "/health", {}),
                ("GET", "/ping", {}),
                ("GET", "/", {"User-Agent": "kube-probe/1.36"}),
                ("GET", "/v1/models", {"K-Network-Probe": "probe"}),
            ):
                async with session.request(method, server.make_url(path), headers=headers) as response:
                    answers.append((path, response.status))
            assert router.registry.get_sample_value("largo_router_requests_held") == 0
            return answers

    answers = asyncio.run(asyncio.wait_for(scenario(), 10))  # a held one would wait 30 s
    assert answers == [("/healthz", 200), ("/health", 200), ("/ping", 200), ("/", 200), ("/v1/models", 200)]
    assert is_probe_of("POST", "/health") is False  # a POST is a request, whatever its path
    assert is_probe_of("GET", "/v1/models") is False


def is_probe_of(method: str, path: str) -> bool:
    from aiohttp.test_utils import make_mocked_request
    from largo.router.agent import is_probe

    return is_probe(make_mocked_request(method, path))
