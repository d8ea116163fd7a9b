"""The serving router for real: HAProxy run by the router's agent, following EndpointSlices in a real
API server, in front of HTTP replicas on this host. Each replica counts the requests it answered."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client
from largo.dev import tools
from largo.dev.cluster import LocalCluster, free_port, wait_for
from largo.router.agent import ipv6_available
from prometheus_client.parser import text_string_to_metric_families

SERVICE = "chat"


def _host_address() -> str:
    """An address of this host outside loopback: EndpointSlices refuse 127.0.0.0/8."""
    command = ["ip", "-j", "-4", "addr", "show", "scope", "global"]
    shown = subprocess.run(command, capture_output=True, check=True)
    for link in json.loads(shown.stdout):
        for address in link.get("addr_info", ()):
            return str(address["local"])
    raise RuntimeError("this host has no global IPv4 address for the test replicas to listen on")


HOST = _host_address()


class QuietServer(ThreadingHTTPServer):
    """A client that hangs up (HAProxy's health checks, a retried request) is no error of the test's."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Replica:
    """An HTTP server answering every POST after ``delay`` seconds with its name."""

    name: str
    delay: float = 0.0
    served: int = 0
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> Replica:
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with replica.lock:
                    replica.in_flight += 1
                time.sleep(replica.delay)
                # Counted before the answer is written: a client that has it may look at the count.
                with replica.lock:
                    replica.in_flight -= 1
                    replica.served += 1
                body = json.dumps({"replica": replica.name}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = QuietServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Router:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    def post(self, timeout: float = 30) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=json.dumps({"prompt": "hi", "max_tokens": 4}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def _endpoint(replica: Replica, ready: bool = True, terminating: bool = False) -> dict[str, Any]:
    return {
        "addresses": [HOST],
        "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
        "targetRef": {"kind": "Pod", "name": replica.name},
    }


class Slices:
    """The replicas' EndpointSlices, written as the EndpointSlice controller would."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.discovery = client.DiscoveryV1Api(api)
        self.namespace = namespace

    def put(self, name: str, port: int, endpoints: list[dict[str, Any]]) -> None:
        body = {
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/service-name": f"{SERVICE}-replicas",
                    "endpointslice.kubernetes.io/managed-by": "tests.largo.dev",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints,
        }
        try:
            self.discovery.replace_namespaced_endpoint_slice(name, self.namespace, body)
        except client.ApiException as error:
            if error.status != 404:
                raise
            self.discovery.create_namespaced_endpoint_slice(self.namespace, body)

    def delete(self, name: str) -> None:
        self.discovery.delete_namespaced_endpoint_slice(name, self.namespace)


@pytest.fixture
def slices(api: client.ApiClient, namespace: str) -> Slices:
    return Slices(api, namespace)


@pytest.fixture
def start_router(cluster: LocalCluster, namespace: str) -> Iterator[Any]:
    started: list[Router] = []

    def start(hold_timeout: float = 60, hold_keepalive: float = 15, drain_timeout: float = 30) -> Router:
        port, metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "LARGO_HAPROXY": tools.locate().path("haproxy"),
        }
        command = [
            sys.executable,
            "-m",
            "largo.router.agent",
            f"--namespace={namespace}",
            f"--service={SERVICE}",
            f"--port={port}",
            f"--metrics-port={metrics_port}",
            f"--activator-port={free_port()}",
            f"--exporter-port={free_port()}",
            f"--hold-timeout={hold_timeout}",
            f"--hold-keepalive={hold_keepalive}",
            f"--drain-timeout={drain_timeout}",
        ]
        router = Router(subprocess.Popen(command, env=env), port, metrics_port)
        started.append(router)

        def ready() -> bool:
            assert router.process.poll() is None, "the router exited"
            try:
                url = f"http://127.0.0.1:{metrics_port}/readyz"
                return bool(urllib.request.urlopen(url, timeout=2).status == 200)
            except OSError:
                return False

        wait_for(ready, 30, "the router ready")
        return router

    yield start
    for router in started:
        router.process.terminate()
        assert router.process.wait(30) == 0


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for replica in made:
        replica.stop()


def _known(router: Router, *names: str) -> None:
    """Waits until HAProxy balances over exactly these replicas (its exporter names its servers)."""

    def known() -> bool:
        servers = {
            dict(labels)["server"]
            for (name, labels) in router.metrics()
            if name == "haproxy_server_current_sessions" and dict(labels).get("proxy") == "replicas"
        }
        return servers - {"activator"} == set(names)

    wait_for(known, 20, f"the router's servers to be {names}")


def test_requests_go_to_the_replica_with_fewer_outstanding(
    start_router: Any, slices: Slices, replicas: list[Replica]
) -> None:
    fast = Replica("chat-r0-node-0", delay=0.01).start()
    slow = Replica("chat-r1-node-0", delay=0.25).start()
    replicas += [fast, slow]
    router = start_router()
    # One slice per replica, as each listens on its own port here.
    slices.put("chat-fast", fast.port, [_endpoint(fast)])
    slices.put("chat-slow", slow.port, [_endpoint(slow)])
    _known(router, fast.name, slow.name)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: router.post(), range(160)))
    assert all(code == 200 for code, _ in answers)
    assert fast.served + slow.served == 160
    # Round robin would give each 80; by outstanding requests the slow one gets far fewer.
    assert slow.served * 4 < fast.served, (fast.served, slow.served)
    # Per-replica series, labelled with the pods' names.
    for replica in (fast, slow):
        assert router.value("haproxy_server_sessions_total", proxy="replicas", server=replica.name) == (
            replica.served
        )
    assert router.value("largo_router_replicas", state="ready") == 2
    if ipv6_available():  # an IPv6 or dual-stack cluster's Service reaches it on IPv6
        with urllib.request.urlopen(
            urllib.request.Request(
                f"http://[::1]:{router.port}/v1/completions",
                data=json.dumps({"prompt": "hi", "max_tokens": 4}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=30,
        ) as answer:
            assert answer.status == 200


def test_a_dead_replica_costs_no_request(start_router: Any, slices: Slices, replicas: list[Replica]) -> None:
    alive = Replica("chat-r0-node-0").start()
    dead = Replica("chat-r1-node-0").start()
    replicas += [alive, dead]
    dead.stop()  # still in its EndpointSlice, as a pod is until its node reports it
    router = start_router()
    slices.put("chat-alive", alive.port, [_endpoint(alive)])
    slices.put("chat-dead", dead.port, [_endpoint(dead)])
    _known(router, alive.name, dead.name)
    answers = [router.post() for _ in range(40)]
    assert [code for code, _ in answers] == [200] * 40
    assert alive.served == 40


def test_a_leaving_replica_finishes_its_requests_and_gets_no_new_one(
    start_router: Any, slices: Slices, replicas: list[Replica]
) -> None:
    leaving = Replica("chat-r0-node-0", delay=3.0).start()
    staying = Replica("chat-r1-node-0").start()
    replicas += [leaving, staying]
    router = start_router()
    slices.put("chat-leaving", leaving.port, [_endpoint(leaving)])
    _known(router, leaving.name)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(router.post)
        wait_for(lambda: leaving.in_flight == 1, 10, "a request on the leaving replica")
        # Its pod is terminating: serving, no longer ready.
        slices.put("chat-leaving", leaving.port, [_endpoint(leaving, ready=False, terminating=True)])
        slices.put("chat-staying", staying.port, [_endpoint(staying)])
        wait_for(lambda: router.value("largo_router_replicas", state="draining") == 1, 20, "draining")
        answers = [router.post() for _ in range(10)]
        assert in_flight.result() == (200, {"replica": leaving.name})
    assert answers == [(200, {"replica": staying.name})] * 10
    assert leaving.served == 1
    # Gone from its slice: removed from HAProxy.
    slices.delete("chat-leaving")
    _known(router, staying.name)


def test_requests_are_held_until_the_first_replica_is_ready(
    start_router: Any, slices: Slices, replicas: list[Replica]
) -> None:
    router = start_router(hold_timeout=60)
    first = Replica("chat-r0-node-0").start()
    replicas.append(first)
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(router.post) for _ in range(3)]
        # The autoscaler's signal: requests held while there is no replica.
        wait_for(lambda: router.value("largo_router_requests_held") == 3, 20, "3 held requests")
        assert not any(future.done() for future in held)
        slices.put("chat-first", first.port, [_endpoint(first)])
        assert [future.result() for future in held] == [(200, {"replica": first.name})] * 3
    assert router.value("largo_router_requests_held") == 0
    assert router.value("largo_router_hold_seconds_count") == 3


def test_a_held_request_whose_client_left_is_not_sent_to_the_replica_that_comes(
    start_router: Any, slices: Slices, replicas: list[Replica]
) -> None:
    """HAProxy closes the activator's side when its client goes, and the activator lets the request go
    at once: it counts as load no more and the first replica does not compute an answer nobody reads."""
    router = start_router(hold_timeout=60)
    body = json.dumps({"prompt": "hi", "max_tokens": 4}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {SERVICE}\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", router.port)) as connection:
        connection.sendall(head.encode() + body)
        wait_for(lambda: router.value("largo_router_requests_held") == 1, 20, "the request held")
    wait_for(lambda: router.value("largo_router_requests_held") == 0, 20, "the request let go")
    first = Replica("chat-r0-node-0").start()
    replicas.append(first)
    slices.put("chat-first", first.port, [_endpoint(first)])
    _known(router, first.name)
    assert router.post() == (200, {"replica": first.name})
    assert first.served == 1  # the later request only
    assert router.value("largo_router_hold_timeouts_total") == 0


def test_a_request_whose_client_left_is_aborted_at_its_replica(
    start_router: Any, slices: Slices, replicas: list[Replica]
) -> None:
    """HAProxy closes the replica's connection when the client goes, so that the model server cancels
    the generation (it frees the batch slot of a request whose connection closed); by HTTP's default it
    would wait for an answer nobody reads."""
    router = start_router()
    slow = Replica("chat-r0-node-0", delay=30).start()
    replicas.append(slow)
    slices.put("chat-slow", slow.port, [_endpoint(slow)])
    _known(router, slow.name)

    def sessions() -> float:
        return router.value("haproxy_server_current_sessions", proxy="replicas", server=slow.name)

    body = json.dumps({"prompt": "hi", "max_tokens": 4}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {SERVICE}\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", router.port)) as connection:
        connection.sendall(head.encode() + body)
        wait_for(lambda: slow.in_flight == 1 and sessions() == 1, 20, "the request at the replica")
    wait_for(lambda: sessions() == 0, 10, "the replica's session closed")  # its answer was 30 s away
    assert slow.served == 0


def test_a_router_stopped_while_it_holds_a_request_exits_at_its_drain_timeout(start_router: Any) -> None:
    """HAProxy's soft stop waits for the held request; at the drain timeout it is stopped and the agent
    exits cleanly (it used to fail on the wait it had cancelled, exit status 1 and a traceback)."""
    router = start_router(hold_timeout=60, drain_timeout=1)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(router.post)
        wait_for(lambda: router.value("largo_router_requests_held") == 1, 20, "the request held")
        router.process.terminate()
        assert router.process.wait(30) == 0
        with pytest.raises(ConnectionError):  # cut when HAProxy stopped: the client may send it again
            answer.result()


def test_a_held_request_gets_a_clear_503_when_no_replica_comes(start_router: Any) -> None:
    router = start_router(hold_timeout=1)
    code, body = router.post()
    assert code == 503
    assert body["error"]["message"] == f"no replica of {SERVICE} became ready within 1s; try again later"
    assert router.value("largo_router_hold_timeouts_total") == 1


def test_a_held_stream_gets_keepalives_through_the_proxy_while_it_waits(start_router: Any) -> None:
    """A streaming client held while a model loads hears from the router before any idle timeout in
    between would cut it: HAProxy passes the activator's keepalive comments on while the request is
    still held, and the hold timeout ends the stream with an error event."""
    router = start_router(hold_timeout=3, hold_keepalive=0.5)
    request = urllib.request.Request(
        f"http://127.0.0.1:{router.port}/v1/completions",
        data=json.dumps({"prompt": "hi", "max_tokens": 4, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == "text/event-stream"
        assert answer.readline() == f": waiting for a replica of {SERVICE}\n".encode()
        assert router.value("largo_router_requests_held") == 1  # the comment came while it waited
        rest = answer.read().decode()
    (error,) = [json.loads(line[len("data: ") :]) for line in rest.splitlines() if line.startswith("data: ")]
    assert error["error"]["code"] == 503
    assert error["error"]["message"] == f"no replica of {SERVICE} became ready within 3s; try again later"
    assert router.value("largo_router_hold_timeouts_total") == 1


def test_a_held_request_that_a_ready_replica_refuses_is_told_so_at_its_deadline(
    start_router: Any, slices: Slices
) -> None:
    """A replica its slice says is ready but that refuses connections (readiness on the wrong port, a
    process gone since): the held request is answered 503 at the hold timeout, saying that no replica
    answered (not that none became ready)."""
    router = start_router(hold_timeout=2)
    nobody = {
        "addresses": [HOST],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "targetRef": {"kind": "Pod", "name": "chat-r0-node-0"},
    }
    with ThreadPoolExecutor(1) as pool:
        # Held first, then the replica comes: a request sent after it would go to HAProxy's backend.
        answer = pool.submit(router.post, 20)
        wait_for(lambda: router.value("largo_router_requests_held") == 1, 10, "the request held")
        slices.put("chat-refusing", free_port(), [nobody])
        code, body = answer.result()
    assert code == 503
    assert body["error"]["message"] == f"no replica of {SERVICE} answered within 2s; try again later"
    assert router.value("largo_router_hold_timeouts_total") == 1


def test_a_replica_that_closes_connections_unanswered_gets_a_json_error_from_the_proxy(
    start_router: Any, slices: Slices
) -> None:
    """Every try on the replica ends without an answer (it passes the TCP check, then closes): HAProxy's
    own error is an OpenAI-style JSON body like the server's, not an HTML page."""
    closer = socket.create_server((HOST, 0))
    stop = threading.Event()

    def read_request(connection: socket.socket) -> None:
        """The whole request, so that the close is a clean end (unread bytes would make it a reset)."""
        connection.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536) or b"\r\n\r\n"
        head, _, body = data.partition(b"\r\n\r\n")
        lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
        length = int(lengths[0].split(b":")[1]) if lengths else 0
        while len(body) < length:
            body += connection.recv(65536) or b" " * length

    def close_every_connection() -> None:
        closer.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                connection, _ = closer.accept()
                with contextlib.suppress(OSError):
                    read_request(connection)
                connection.close()

    closing = threading.Thread(target=close_every_connection, daemon=True)
    closing.start()
    try:
        router = start_router(hold_timeout=2)
        slices.put("chat-closing", closer.getsockname()[1], [_endpoint(Replica("chat-r0-node-0"))])
        wait_for(lambda: router.value("largo_router_replicas", state="ready") == 1, 20, "the replica added")
        code, body = router.post(timeout=20)
    finally:
        stop.set()
        closing.join()
        closer.close()
    assert code == 502
    assert body["error"]["message"] == f"no replica of {SERVICE} gave an answer; try again"
    assert body["error"]["type"] == "bad_gateway"
