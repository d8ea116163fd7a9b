"""The router's agent (``python -m largo.router.agent``): runs HAProxy, keeps its servers equal to the
ready replicas the InferenceService's EndpointSlices name, holds requests while none is ready (the
activator), and serves the router's metrics.

HAProxy carries every request while a replica is ready; the agent only changes its servers through
the runtime API, so a change of replicas never reloads the proxy nor drops a connection. With no
ready replica, HAProxy sends requests to its second backend, the activator here, which counts them in
``largo_router_requests_held`` (what the operator's autoscaler reads to scale from zero), waits for
the first ready replica up to ``--hold-timeout`` and forwards them to it, or answers 503.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from kubernetes import client, config, watch
from kubernetes.client import ApiException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from largo.manifests import names
from largo.router.haproxy import (
    JSON,
    Ports,
    Replica,
    State,
    command_failed,
    parse_servers_state,
    render_config,
    replicas_from_slices,
    sync_commands,
)

logger = logging.getLogger(__name__)


def ipv6_available() -> bool:
    """Whether this pod can listen on IPv6 (an IPv6 or dual-stack cluster's Service reaches the router
    there); a kernel without it would make HAProxy fail to start on IPv6's wildcard."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


# Hop-by-hop headers (RFC 9110 7.6.1) and those the forwarding client sets itself.
_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
)
# The forwarding client decompresses a replica's answer: passed on as it is read, it has no encoding.
_NOT_ANSWERED = _NOT_FORWARDED | {"content-encoding"}
RESYNC_SECONDS = 2.0
# HAProxy answers its admin socket at once; one that does not is wedged.
ADMIN_TIMEOUT_SECONDS = 5.0
# Ready only while HAProxy was synced this recently (a sync is due every RESYNC_SECONDS): a wedged
# proxy takes no more traffic. Alive only while its admin socket answered within the longer bound.
READY_SYNCED_WITHIN_SECONDS = 15.0
ALIVE_ANSWERED_WITHIN_SECONDS = 60.0
# How long a scrape of HAProxy's exporter may take: a wedged proxy must not hang the agent's /metrics.
EXPORTER_SECONDS = 2.0
MIB = 1024 * 1024
# What is read of a replica's error answer to pass it on as an event (its OpenAI-style body is short).
ERROR_BODY_BYTES = 64 * 1024


# Seconds a read from the API server may stay silent: beyond the watch's own 60 s.
WATCH_READ_SECONDS = 90


def replica_url(address: str, port: int, path: str) -> str:
    """``http://address:port/path``, an IPv6 address in brackets (as an IPv6 cluster's slices give)."""
    return f"http://{names.host_port(address, port)}{path}"


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.held = Gauge(
            "largo_router_requests_held",
            "Requests the activator holds because no replica is ready (the autoscaler's signal at zero).",
            registry=registry,
        )
        self.hold_seconds = Histogram(
            "largo_router_hold_seconds",
            "How long held requests waited for a ready replica.",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=registry,
        )
        self.hold_timeouts = Counter(
            "largo_router_hold_timeouts",
            "Held requests answered 503 because no replica became ready in time.",
            registry=registry,
        )
        self.replicas = Gauge(
            "largo_router_replicas", "Replicas HAProxy balances over, by state.", ["state"], registry=registry
        )
        self.sync_errors = Counter(
            "largo_router_sync_errors", "Runtime-API commands HAProxy refused.", registry=registry
        )
        self.hold_overflows = Counter(
            "largo_router_hold_overflows",
            "Requests refused at once (503) because the router held as many request bytes as it may.",
            registry=registry,
        )
        self.watch_restarts = Counter(
            "largo_router_watch_restarts", "EndpointSlice watches started again.", registry=registry
        )


class RuntimeApi:
    """HAProxy's admin socket: one command per connection."""

    def __init__(self, path: Path, answer_within: float = ADMIN_TIMEOUT_SECONDS) -> None:
        self.path = path
        self.answer_within = answer_within

    async def call(self, command: str) -> str:
        """One command's answer; a socket that does not answer in time raises TimeoutError (the sync
        loop logs it and tries again) rather than freezing the sync for good."""
        async with asyncio.timeout(self.answer_within):
            reader, writer = await asyncio.open_unix_connection(str(self.path))
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                return (await reader.read()).decode()
            finally:
                writer.close()


class Router:
    def __init__(self, args: argparse.Namespace, registry: CollectorRegistry) -> None:
        self.args = args
        self.ports = Ports(serve=args.port, activator=args.activator_port, exporter=args.exporter_port)
        self.registry = registry
        self.metrics = Metrics(registry)
        self.workdir = Path(tempfile.mkdtemp(prefix="largo-router-"))
        self.api = RuntimeApi(self.workdir / "admin.sock")
        self.desired: dict[str, Replica] = {}
        self.servers: dict[str, Replica] = {}
        self.changed = asyncio.Event()
        self.ready = asyncio.Event()  # set while a replica is ready: held requests may go
        # The replicas' EndpointSlices were listed once: before, no replica is known (ready or not).
        self.listed = False
        # When HAProxy's servers were last made the known replicas (a sync after the first listing),
        # and when its admin socket last answered a whole sync (whether or not anything was listed).
        self.synced_at: float | None = None
        self.answered_at = time.monotonic()
        self.forwarded: dict[str, int] = {}
        # Bytes of request bodies the activator holds now.
        self.held_bytes = 0
        self.haproxy: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None

    # HAProxy

    async def start_haproxy(self) -> None:
        config_path = self.workdir / "haproxy.cfg"
        config = render_config(
            str(self.api.path),
            self.ports,
            self.args.connect_timeout,
            self.args.service,
            ipv6_available(),
            self.args.hold_timeout,
        )
        config_path.write_text(config)
        self.haproxy = await asyncio.create_subprocess_exec(self.args.haproxy, "-db", "-f", str(config_path))
        deadline = time.monotonic() + 10
        while not self.api.path.exists():
            if self.haproxy.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start (exit {self.haproxy.returncode})")
            await asyncio.sleep(0.05)

    async def sync(self) -> None:
        """Makes HAProxy's servers the desired replicas, then reads back what it has."""
        self.servers = parse_servers_state(await self.api.call("show servers state replicas"))
        for command in sync_commands(self.servers, self.desired):
            answer = await self.api.call(command)
            if command_failed(command, answer):
                if command.startswith("del server"):
                    continue  # requests still on it: deleted on a later sync
                self.metrics.sync_errors.inc()
                logger.warning("haproxy refused %r: %s", command, answer.strip())
        self.servers = parse_servers_state(await self.api.call("show servers state replicas"))
        for state in State:
            self.metrics.replicas.labels(state.value).set(
                sum(1 for s in self.servers.values() if s.state is state)
            )
        self.answered_at = time.monotonic()
        if self.listed:
            self.synced_at = self.answered_at

    async def keep_synced(self) -> None:
        while True:
            # asyncio.timeout: Python 3.11's wait_for swallows a cancel that comes as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESYNC_SECONDS):
                    await self.changed.wait()
            self.changed.clear()
            try:
                await self.sync()
            except Exception:  # the next period tries again; the proxy keeps its last servers
                logger.exception("syncing haproxy's servers failed; retrying")

    # EndpointSlices

    def on_slices(self, slices: dict[str, JSON]) -> None:
        self.listed = True
        self.desired = replicas_from_slices(slices.values())
        # Counts of replicas that left go with them: every rollout names new pods.
        self.forwarded = {name: n for name, n in self.forwarded.items() if name in self.desired}
        if any(r.state is State.READY for r in self.desired.values()):
            self.ready.set()
        else:
            self.ready.clear()
        self.changed.set()

    def watch_slices(self, publish: Callable[[dict[str, JSON]], None], stopping: threading.Event) -> None:
        """List then watch the EndpointSlices of the replicas' Service, in a thread (the official
        client is synchronous); every change publishes the whole set. A watch that ends or fails is
        started again from a fresh list."""
        discovery = client.DiscoveryV1Api()
        selector = f"kubernetes.io/service-name={self.args.replicas_service}"
        to_dict = discovery.api_client.sanitize_for_serialization
        first = True
        while not stopping.is_set():
            if not first:
                self.metrics.watch_restarts.inc()
            first = False
            try:
                listed: dict[str, Any] = to_dict(
                    discovery.list_namespaced_endpoint_slice(
                        self.args.namespace, label_selector=selector, _request_timeout=WATCH_READ_SECONDS
                    )
                )
                slices: dict[str, JSON] = {item["metadata"]["name"]: item for item in listed["items"]}
                publish(dict(slices))
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    discovery.list_namespaced_endpoint_slice,
                    self.args.namespace,
                    label_selector=selector,
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=60,
                    allow_watch_bookmarks=False,
                    # The server ends the watch after 60 s; a connection silent for longer is half-open
                    # (its API server gone, a load balancer that dropped it): listed again, not awaited
                    # for ever with the replicas frozen.
                    _request_timeout=(10, WATCH_READ_SECONDS),
                )
                for event in stream:
                    item = event["raw_object"]
                    name = item["metadata"]["name"]
                    if event["type"] == "DELETED":
                        slices.pop(name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        slices[name] = item
                    else:
                        break
                    publish(dict(slices))
                    if stopping.is_set():
                        return
            except ApiException as error:
                if error.status != 410:
                    logger.warning("watching EndpointSlices failed (%s); listing again", error.status)
                    stopping.wait(1.0)
            except Exception:
                logger.exception("watching EndpointSlices failed; listing again")
                stopping.wait(1.0)

    # The activator

    async def hold(self, request: web.Request) -> web.StreamResponse:
        """A request HAProxy had no ready replica for: wait for one, then forward it there. Counted as
        held from its first byte (the autoscaler's signal that load arrived), and its body's size is
        bounded per request and in all (the router's memory is bounded). A health check is no load: it
        is answered here at once (``is_probe``)."""
        if is_probe(request):
            return web.Response(text=f"ok: {self.args.service} has no ready replica; requests are held\n")
        self.metrics.held.inc()
        try:
            return await self._hold(request)
        finally:
            self.metrics.held.dec()

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        limit = self.args.hold_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
        # Bytes are counted as they arrive (the declared length up front), so that concurrent uploads
        # cannot buffer more than the budget before any of them is checked.
        reserved = request.content_length or 0
        if not self._reserve(reserved):
            return self._full()
        try:
            # One buffer, grown in place: a list of chunks joined at the end held every byte twice
            # while the request was held (256 MiB of holds took over 512 MiB).
            body = bytearray()
            size = 0
            try:
                # A body that does not arrive within the hold timeout gives its reservation back
                # (HAProxy would keep an idle client for its own timeout, an hour).
                async with asyncio.timeout(self.args.hold_timeout):
                    async for chunk in request.content.iter_chunked(64 * 1024):
                        size += len(chunk)
                        if size > limit:
                            return _too_large(limit)
                        if size > reserved:
                            if not self._reserve(size - reserved):
                                return self._full()
                            reserved = size
                        body += chunk
            except TimeoutError:
                message = f"the request body did not arrive within {self.args.hold_timeout:g}s"
                return _error(408, "request_timeout", message)
            return await self._forward_when_ready(request, body)
        finally:
            self.held_bytes -= reserved

    def _reserve(self, size: int) -> bool:
        if self.held_bytes + size > self.args.hold_max_bytes:
            return False
        self.held_bytes += size
        return True

    def _full(self) -> web.Response:
        self.metrics.hold_overflows.inc()
        return _unavailable(
            f"{self.args.service} is starting and its router holds as much as it can "
            f"({self.args.hold_max_bytes} bytes of requests); try again later"
        )

    async def _forward_when_ready(self, request: web.Request, body: bytearray) -> web.StreamResponse:
        try:
            return await self._answer_when_ready(request, body)
        except ClientGoneError as gone:  # its answer can go nowhere; aiohttp closes the connection
            return gone.response

    async def _answer_when_ready(self, request: web.Request, body: bytearray) -> web.StreamResponse:
        started = time.monotonic()
        deadline = started + self.args.hold_timeout
        # A streaming client waiting in silence for a model to load is cut by whatever idle timeout
        # lies between it and us (a cloud load balancer's 60 s): once it has waited a keepalive
        # period, its event stream starts and carries comments until a replica answers.
        keepalive = self.args.hold_keepalive if wants_stream(body) else 0.0
        next_keepalive = started + keepalive
        events: web.StreamResponse | None = None
        refused = False
        while True:
            until = min(deadline, next_keepalive) if keepalive > 0 else deadline
            replica = await self.wait_for_replica(until)
            if replica is None and until < deadline:
                if events is None:
                    events = await start_events(request)
                await send(events, f": waiting for a replica of {self.args.service}\n\n".encode())
                next_keepalive = time.monotonic() + keepalive
                continue
            if replica is None:
                self.metrics.hold_timeouts.inc()
                # A replica ready in its slice that refuses (readiness on another port, a process gone
                # since) is not one that never came: the answer says which.
                what = "answered" if refused else "became ready"
                message = (
                    f"no replica of {self.args.service} {what} within {self.args.hold_timeout:g}s; "
                    "try again later"
                )
                if events is not None:
                    return await end_events(events, error_event(503, "service_unavailable", message))
                return _unavailable(message)
            try:
                if events is not None:
                    return await self.forward_into(events, request, body, replica, started)
                return await self.forward(request, body, replica, started)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                # It went away between its EndpointSlice and now (or never answered the connection): it
                # has not seen the request, and the next one will do.
                refused = True
                await asyncio.sleep(0.1)
            except aiohttp.ClientError as error:
                # It took the request and failed before answering (a process killed, out of memory).
                # Not sent again: a request that kills its replica would kill the next one too.
                message = f"the replica of {self.args.service} failed before answering ({_said(error)})"
                logger.warning("%s: %s", replica.name, message)
                if events is not None:
                    return await end_events(events, error_event(502, "server_error", message))
                return _error(502, "server_error", message)

    async def wait_for_replica(self, deadline: float) -> Replica | None:
        """A ready replica, the one with the fewest requests forwarded by the activator so far."""
        while True:
            # Checked here: a timeout expires only at a wait, and a set event is not waited for.
            if time.monotonic() >= deadline:
                return None
            try:
                # Not wait_for: on Python 3.11 it drops a cancellation (the client left) that comes
                # with the event, and the request would go to the replica for nobody.
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self.ready.wait()
            except TimeoutError:
                return None
            ready = [r for r in self.desired.values() if r.state is State.READY]
            if ready:
                return min(ready, key=lambda r: (self.forwarded.get(r.name, 0), r.name))
            self.ready.clear()

    def _send_to(
        self, request: web.Request, body: bytearray, replica: Replica
    ) -> aiohttp.client._RequestContextManager:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        url = replica_url(replica.address, replica.port, str(request.rel_url))
        self.forwarded[replica.name] = self.forwarded.get(replica.name, 0) + 1
        return self.session.request(request.method, url, headers=headers, data=body)

    async def forward(
        self, request: web.Request, body: bytearray, replica: Replica, started: float
    ) -> web.StreamResponse:
        async with self._send_to(request, body, replica) as upstream:
            self.metrics.hold_seconds.observe(time.monotonic() - started)
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_ANSWERED},
            )
            await prepare(response, request)
            try:
                async for chunk in upstream.content.iter_any():
                    await send(response, chunk)
            except aiohttp.ClientError as error:
                # Its status is sent: the client is told by the connection closing before the answer's
                # end (an answer ended properly would be a wrong one).
                logger.warning("%s failed mid-answer: %s", replica.name, _said(error))
                if request.transport is not None:
                    request.transport.close()
                raise ClientGoneError(response) from error
            await response.write_eof()
            return response

    async def forward_into(
        self,
        events: web.StreamResponse,
        request: web.Request,
        body: bytearray,
        replica: Replica,
        started: float,
    ) -> web.StreamResponse:
        """Forwards a request whose event stream has started (its status, 200, is sent): the replica's
        events follow the keepalives; any other answer, or a failure, becomes an error event."""
        async with self._send_to(request, body, replica) as upstream:
            self.metrics.hold_seconds.observe(time.monotonic() - started)
            if upstream.status != 200 or upstream.content_type != "text/event-stream":
                answer = await upstream.content.read(ERROR_BODY_BYTES)
                return await end_events(events, answer_as_event(upstream.status, answer))
            # Passed on in whole lines, so that a replica that fails mid-line leaves no part of one
            # before the error event (the client would fail to parse it, not read the error).
            partial = b""
            try:
                async for chunk in upstream.content.iter_any():
                    lines, newline, partial = (partial + chunk).rpartition(b"\n")
                    if newline:
                        await send(events, lines + newline)
            except aiohttp.ClientError as error:
                message = f"the replica of {self.args.service} failed mid-answer ({_said(error)})"
                logger.warning("%s: %s", replica.name, message)
                # The blank line ends an event the replica had begun; the error's follows.
                return await end_events(events, b"\n" + error_event(502, "server_error", message))
            return await end_events(events, partial)

    # The agent's own endpoints

    async def metrics_endpoint(self, _: web.Request) -> web.Response:
        """The agent's series and HAProxy's (per-replica in flight, latency, errors) in one scrape."""
        assert self.session is not None
        ours = generate_latest(self.registry).decode()
        try:
            async with self.session.get(
                f"http://127.0.0.1:{self.ports.exporter}/metrics",
                timeout=aiohttp.ClientTimeout(total=EXPORTER_SECONDS),
            ) as answer:
                theirs = await answer.text()
        except (aiohttp.ClientError, TimeoutError):
            theirs = ""
        return web.Response(text=ours + theirs, content_type="text/plain", charset="utf-8")

    def _haproxy_exited(self) -> bool:
        return self.haproxy is None or self.haproxy.returncode is not None

    async def healthz(self, _: web.Request) -> web.Response:
        if self._haproxy_exited():
            return web.Response(status=503, text="haproxy exited")
        # Its admin socket silent this long: wedged, and restarted rather than left taking traffic. (An
        # API server out of reach is no reason: a restart would not bring it back.)
        if time.monotonic() - self.answered_at > ALIVE_ANSWERED_WITHIN_SECONDS:
            return web.Response(status=503, text="haproxy's admin socket does not answer")
        return web.Response(text="ok")

    async def readyz(self, _: web.Request) -> web.Response:
        if self._haproxy_exited():
            return web.Response(status=503, text="haproxy exited")
        if not self.listed:
            # It knows no replica, ready or not: it would hold every request, then answer 503.
            return web.Response(status=503, text="the replicas' EndpointSlices are not listed yet")
        synced_at = self.synced_at
        if synced_at is None or time.monotonic() - synced_at > READY_SYNCED_WITHIN_SECONDS:
            return web.Response(status=503, text="haproxy's servers are not synced")
        return web.Response(text="ready")


# Bodies up to this size are parsed to read "stream"; a larger one is searched for it instead: a
# prompt of token ids parsed whole takes about ten times its size (64 MiB of ids, ~600 MiB).
PARSED_BODY_BYTES = 1 << 20
# "stream": true outside a string (a quote escaped inside one is preceded by a backslash).
_STREAM_TRUE = re.compile(rb'(?<!\\)"stream"\s*:\s*true\b')


def wants_stream(body: bytes | bytearray) -> bool:
    """A completion asked for as server-sent events (OpenAI's ``"stream": true``)."""
    if len(body) > PARSED_BODY_BYTES:
        return _STREAM_TRUE.search(body) is not None
    try:
        parsed = json.loads(body)
    except ValueError:  # not JSON (nor UTF-8): the replica will say what is wrong with it
        return False
    return isinstance(parsed, dict) and parsed.get("stream") is True


def error_event(status: int, kind: str, message: str) -> bytes:
    """An OpenAI-style error as a server-sent event: the status is sent, the error goes in the stream
    (as a server's own mid-stream errors do, and as OpenAI's clients read them)."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return f"data: {json.dumps(body)}\n\n".encode()


def answer_as_event(status: int, answer: bytes) -> bytes:
    """A replica's answer to a request whose event stream had started: its error as an event (a bad
    request's 400 keeps the replica's message), a whole answer as one event followed by ``[DONE]``."""
    with contextlib.suppress(ValueError):
        parsed = json.loads(answer)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return f"data: {json.dumps(parsed)}\n\n".encode()
        if status == 200:
            return f"data: {json.dumps(parsed)}\n\ndata: [DONE]\n\n".encode()
    return error_event(status, "server_error", f"the replica answered {status}")


class ClientGoneError(Exception):
    """Nothing more can be sent to the client: it closed its connection (aiohttp's reset error is also
    one of its client errors, which here mean the replica's), or its answer must end cut."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client's connection is closed")
        self.response = response


async def prepare(response: web.StreamResponse, request: web.Request) -> None:
    try:
        await response.prepare(request)
    except ConnectionResetError as error:
        raise ClientGoneError(response) from error


async def send(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionResetError as error:
        raise ClientGoneError(response) from error


async def start_events(request: web.Request) -> web.StreamResponse:
    events = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await prepare(events, request)
    return events


async def end_events(events: web.StreamResponse, last: bytes) -> web.StreamResponse:
    await send(events, last)
    try:
        await events.write_eof()
    except ConnectionResetError as error:
        raise ClientGoneError(events) from error
    return events


def _said(error: BaseException) -> str:
    """An error in a few words: aiohttp's own are sometimes without a message."""
    return str(error) or type(error).__name__


def _error(status: int, kind: str, message: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def _too_large(limit: int) -> web.Response:
    return _error(
        413,
        "invalid_request_error",
        f"the request body is over the {limit} bytes a request may hold while no replica is ready",
    )


def _unavailable(message: str) -> web.Response:
    body = {"error": {"message": message, "type": "service_unavailable", "param": None, "code": 503}}
    return web.Response(
        status=503, text=json.dumps(body), content_type="application/json", headers={"Retry-After": "5"}
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env: Mapping[str, str] = os.environ
    parser = argparse.ArgumentParser(prog="python -m largo.router.agent", description=__doc__)
    parser.add_argument("--namespace", default=env.get("LARGO_NAMESPACE") or env.get("POD_NAMESPACE"))
    parser.add_argument("--service", default=env.get("LARGO_SERVICE"), help="the InferenceService")
    parser.add_argument(
        "--replicas-service",
        default=env.get("LARGO_REPLICAS_SERVICE"),
        help="the Service whose EndpointSlices name the ready replicas (default: <service>-replicas)",
    )
    parser.add_argument("--port", type=int, default=int(env.get("LARGO_HTTP_PORT", "8080")))
    parser.add_argument("--metrics-port", type=int, default=int(env.get("LARGO_METRICS_PORT", "9400")))
    parser.add_argument("--activator-port", type=int, default=8081)
    parser.add_argument("--exporter-port", type=int, default=8404)
    parser.add_argument(
        "--hold-timeout",
        type=float,
        default=float(env.get("LARGO_HOLD_TIMEOUT_SECONDS", "300")),
        help="seconds a request waits for the first ready replica before a 503",
    )
    parser.add_argument(
        "--hold-keepalive",
        type=float,
        default=float(env.get("LARGO_HOLD_KEEPALIVE_SECONDS", "15")),
        help="seconds after which a held streaming request's event stream starts, with a comment each "
        "period until a replica answers (0: held in silence, answered with the replica's status)",
    )
    parser.add_argument(
        "--hold-max-body-bytes",
        type=int,
        default=int(env.get("LARGO_HOLD_MAX_BODY_BYTES", str(64 * MIB))),
        help="largest request body held while no replica is ready (larger ones get a 413)",
    )
    parser.add_argument(
        "--hold-max-bytes",
        type=int,
        default=int(env.get("LARGO_HOLD_MAX_BYTES", str(256 * MIB))),
        help="request bodies held at once, in all (beyond it a 503 with Retry-After)",
    )
    parser.add_argument("--connect-timeout", type=float, default=2.0)
    parser.add_argument(
        "--drain-timeout", type=float, default=names.ROUTER_DRAIN_SECONDS, help="seconds to finish requests"
    )
    parser.add_argument("--haproxy", default=env.get("LARGO_HAPROXY", "haproxy"))
    args = parser.parse_args(argv)
    if not args.namespace or not args.service:
        parser.error("--namespace and --service (or LARGO_NAMESPACE and LARGO_SERVICE) are required")
    args.replicas_service = args.replicas_service or f"{args.service}-replicas"
    return args


# What load balancers and kubelets probe; vLLM's health endpoints are /health and /ping.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/livez", "/health", "/ping"})


def is_probe(request: web.Request) -> bool:
    """A health check, not a request for the model: a kubelet's (its ``kube-probe/`` user agent, on any
    path), Knative's network probe, or a GET or HEAD of a health path. At zero each one held would wake
    the service (a cloud load balancer's checks every few seconds kept it up for good), and answering it
    503 would make the balancer take the router out of service, so that no request woke it."""
    kubelet = request.headers.get("User-Agent", "").startswith("kube-probe/")
    if kubelet or "K-Network-Probe" in request.headers:
        return True
    return request.method in ("GET", "HEAD") and request.path in PROBE_PATHS


def activator_app(router: Router) -> web.Application:
    """Where HAProxy sends the requests it has no ready replica for. ``Router.hold`` reads each body
    itself, within its own bounds (aiohttp's cap applies only to ``request.read()``)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", router.hold)
    return app


def activator_runner(router: Router) -> web.AppRunner:
    """The activator's server. A held request whose client left (HAProxy closes our side when its
    client goes) is cancelled: it counts as load no more, gives its bytes back, and is not sent to the
    replica that comes. aiohttp's servers do not cancel by default (its test server does)."""
    return web.AppRunner(activator_app(router), access_log=None, handler_cancellation=True)


def forwarding_session(connect_timeout: float) -> aiohttp.ClientSession:
    """The activator's client: no bound on its connections (aiohttp's default pool of 100 made the
    101st held request wait for one past its connect timeout: a burst at zero lost all but 100 to
    502s), and a timeout on the TCP connect alone."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
    )


async def run(args: argparse.Namespace) -> int:
    router = Router(args, CollectorRegistry())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await router.start_haproxy()
    router.session = forwarding_session(args.connect_timeout)
    own = web.Application()
    own.router.add_get("/metrics", router.metrics_endpoint)
    own.router.add_get("/healthz", router.healthz)
    own.router.add_get("/readyz", router.readyz)
    runners = [activator_runner(router), web.AppRunner(own, access_log=None)]
    for runner in runners:
        await runner.setup()
    await web.TCPSite(runners[0], "127.0.0.1", args.activator_port).start()
    # Every address, IPv4 and IPv6 where the pod has one: the operator scrapes the pod's IP.
    await web.TCPSite(runners[1], None, args.metrics_port).start()
    stopping = threading.Event()
    threading.Thread(
        target=router.watch_slices,
        args=(lambda slices: loop.call_soon_threadsafe(router.on_slices, slices), stopping),
        daemon=True,
        name="endpointslices",
    ).start()
    syncing = asyncio.create_task(router.keep_synced())
    assert router.haproxy is not None
    exited = asyncio.create_task(router.haproxy.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if router.haproxy.returncode is None:
        # Soft stop: HAProxy stops listening and finishes the requests in flight.
        router.haproxy.send_signal(signal.SIGUSR1)
        # Not wait_for: at its timeout it cancels the wait on HAProxy's exit, which is awaited next.
        drained, _ = await asyncio.wait({exited}, timeout=args.drain_timeout)
        if not drained:
            router.haproxy.terminate()
            await exited
    else:
        logger.error("haproxy exited with %s", router.haproxy.returncode)
        code = 1
    stopping.set()
    syncing.cancel()
    stopped.cancel()
    for runner in runners:
        await runner.cleanup()
    await router.session.close()
    return code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
