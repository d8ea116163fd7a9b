"""The router's activator, on a real socket, while no replica is ready: a long request is held like
any other (not refused at aiohttp's 1 MiB default), one over the per-request cap gets an OpenAI-style
413, and the bytes held in all are bounded. And the admin socket of a wedged HAProxy times out."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from largo.router.agent import Router, RuntimeApi, activator_app, parse_args
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
