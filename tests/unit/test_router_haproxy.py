"""The router's pure parts: EndpointSlices → replicas, replicas → HAProxy runtime-API commands, and
HAProxy's `show servers state` read back."""

from __future__ import annotations

import json
import shutil
from typing import Any

from largo.router.agent import Router, parse_args, replica_url
from largo.router.haproxy import (
    Ports,
    Replica,
    State,
    command_failed,
    parse_servers_state,
    render_config,
    replicas_from_slices,
    sync_commands,
)
from prometheus_client import CollectorRegistry


def _slice(port: int | None, *endpoints: dict[str, Any], port_name: str = "http") -> dict[str, Any]:
    return {
        "ports": [] if port is None else [{"name": port_name, "port": port}],
        "endpoints": list(endpoints),
    }


def _endpoint(address: str, name: str | None, **conditions: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if name is not None:
        body["targetRef"] = {"kind": "Pod", "name": name}
    return body


def test_ready_endpoints_take_requests_terminating_serving_ones_drain_the_rest_are_left_out() -> None:
    replicas = replicas_from_slices(
        [
            _slice(
                8000,
                _endpoint("10.0.0.1", "a", ready=True, serving=True, terminating=False),
                _endpoint("10.0.0.2", "b", ready=False, serving=True, terminating=True),
                _endpoint("10.0.0.3", "c", ready=False, serving=False, terminating=False),
                _endpoint("10.0.0.4", "d", ready=False, serving=False, terminating=True),
            )
        ]
    )
    assert replicas == {
        "a": Replica("a", "10.0.0.1", 8000, State.READY),
        "b": Replica("b", "10.0.0.2", 8000, State.DRAINING),
    }


def test_a_slice_without_the_http_port_names_no_replica_and_a_duplicate_counts_once_ready() -> None:
    ready = _endpoint("10.0.0.1", "a", ready=True)
    draining = _endpoint("10.0.0.1", "a", ready=False, serving=True, terminating=True)
    assert replicas_from_slices([_slice(None, ready), _slice(8000, ready, port_name="metrics")]) == {}
    for order in ([draining, ready], [ready, draining]):
        assert replicas_from_slices([_slice(8000, order[0]), _slice(8000, order[1])]) == {
            "a": Replica("a", "10.0.0.1", 8000, State.READY)
        }
    # Without a pod reference the address names the server.
    assert list(replicas_from_slices([_slice(8000, _endpoint("10.0.0.9", None, ready=True))])) == ["10-0-0-9"]


def test_commands_add_enable_drain_move_and_remove() -> None:
    current = {
        "kept": Replica("kept", "10.0.0.1", 8000, State.READY),
        "moved": Replica("moved", "10.0.0.2", 8000, State.READY),
        "leaving": Replica("leaving", "10.0.0.3", 8000, State.READY),
        "gone": Replica("gone", "10.0.0.4", 8000, State.OFF),
        "back": Replica("back", "10.0.0.5", 8000, State.OFF),
    }
    desired = {
        "kept": current["kept"],
        "moved": Replica("moved", "10.0.0.7", 8001, State.READY),
        "leaving": Replica("leaving", "10.0.0.3", 8000, State.DRAINING),
        "back": Replica("back", "10.0.0.5", 8000, State.READY),
        "new": Replica("new", "10.0.0.6", 8000, State.READY),
        "late": Replica("late", "10.0.0.8", 8000, State.DRAINING),
    }
    assert sync_commands(current, desired) == [
        "disable server replicas/gone",
        "del server replicas/gone",
        "set server replicas/back state ready",
        "add server replicas/late 10.0.0.8:8000 check inter 1s fall 2 rise 1",
        "enable health replicas/late",
        "set server replicas/late health up",
        # Seen leaving first: out of maintenance straight into drain, never enabled in between.
        "set server replicas/late state drain",
        "set server replicas/leaving state drain",
        "set server replicas/moved addr 10.0.0.7 port 8001",
        "add server replicas/new 10.0.0.6:8000 check inter 1s fall 2 rise 1",
        "enable health replicas/new",
        "set server replicas/new health up",
        "set server replicas/new state ready",
    ]
    assert sync_commands(desired, desired) == []


# Captured from HAProxy 2.6: the activator, a ready server, a drained one and one in maintenance.
SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight \
srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state \
srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port \
srv_check_addr srv_agent_addr srv_agent_port
4 replicas 1 activator 127.0.0.1 2 0 1 1 4 1 0 2 0 0 0 0 - 18999 - 0 0 - - 0
4 replicas 2 pod-a 10.0.0.1 2 0 1 1 0 1 0 0 0 0 0 0 - 18101 - 0 0 - - 0
4 replicas 3 pod-b 10.0.0.2 2 8 1 1 0 1 0 2 6 0 0 0 - 18102 - 0 0 - - 0
4 replicas 4 pod-c 10.0.0.3 0 1 1 1 0 1 0 2 6 0 0 0 - 18103 - 0 0 - - 0

"""


def test_servers_state_reads_back_each_replica_and_skips_the_activator() -> None:
    assert parse_servers_state(SERVERS_STATE) == {
        "pod-a": Replica("pod-a", "10.0.0.1", 18101, State.READY),
        "pod-b": Replica("pod-b", "10.0.0.2", 18102, State.DRAINING),
        "pod-c": Replica("pod-c", "10.0.0.3", 18103, State.OFF),
    }
    assert parse_servers_state("No such backend.\n") == {}


def test_answers_that_mean_failure() -> None:
    assert not command_failed("add server replicas/a 1.2.3.4:80", "New server registered.\n\n")
    assert command_failed("add server replicas/a 1.2.3.4:80", "Already exists a server with the same name.\n")
    assert command_failed("del server replicas/a", "Server still has connections attached to it.\n")
    assert not command_failed("del server replicas/a", "Server deleted.\n")
    assert not command_failed("enable server replicas/a", "\n")
    assert command_failed("enable server replicas/a", "No such server.\n")
    # `set server ... addr` confirms a change in words (HAProxy 2.6's answers, as Debian ships it).
    moved = "IP changed from '10.0.0.1' to '10.0.0.2', no need to change the port by 'stats socket command'"
    same = "no need to change the addr, no need to change the port by 'stats socket command'\n\n"
    addr = "set server replicas/a addr 10.0.0.2 port 8000"
    assert not command_failed(addr, moved)
    assert not command_failed(addr, same)
    assert command_failed(addr, "Invalid addr '10.0.0.x' by 'stats socket command'\n\n")
    assert command_failed(addr, "No such server.\n\n")


def test_the_configuration_balances_by_least_outstanding_and_holds_when_no_replica_is_usable() -> None:
    text = render_config("/run/admin.sock", Ports(serve=8080, activator=8081, exporter=8404), 0.5)
    assert "stats socket /run/admin.sock mode 600 level admin" in text
    assert "  bind :8080\n" in text
    assert "  bind 127.0.0.1:8404\n" in text
    assert "  balance leastconn\n" in text
    assert "  use_backend hold if { nbsrv(replicas) lt 1 }\n" in text
    # The activator's own backend: its 503 after the hold is not retried like a replica's.
    assert "backend hold\n  # Its 503 (no replica came in time) is the answer: never retried.\n" in text
    assert "  server activator 127.0.0.1:8081\n" in text
    assert "  timeout connect 500ms\n" in text
    assert "  retry-on conn-failure empty-response 503\n" in text
    # Where the pod has IPv6, its wildcard with IPv4 mapped onto it: one listener for both.
    dual = render_config("/run/admin.sock", Ports(serve=8080, activator=8081, exporter=8404), 0.5, ipv6=True)
    assert "  bind :::8080 v4v6\n" in dual
    assert "  bind 127.0.0.1:8404\n" in dual


def test_the_proxy_s_own_errors_are_openai_style_json_naming_the_service() -> None:
    text = render_config("/run/admin.sock", Ports(serve=8080, activator=8081, exporter=8404), 0.5, "chat")
    replicas = text.split("backend replicas\n", 1)[1].split("backend hold\n", 1)[0]
    lines = [line for line in replicas.splitlines() if line.startswith("  http-error status ")]
    assert [line.split()[2] for line in lines] == ["502", "503", "504"]
    for line in lines:
        body = json.loads(line.split(" string '", 1)[1].split("'", 1)[0])
        assert body["error"]["code"] == int(line.split()[2])
        assert "no replica of chat" in body["error"]["message"]
    assert lines[1].endswith("hdr Retry-After 5")


def test_the_activator_s_answer_comes_before_haproxy_gives_up_on_it() -> None:
    """A held request is answered after its body and its replica came (each within the hold timeout),
    then takes a completion's time: at a hold timeout of an hour, HAProxy's own timeout on the
    activator (1 h) ran out first, and its HTML 504 came instead of the activator's JSON 503."""
    ports = Ports(serve=8080, activator=8081, exporter=8404)
    text = render_config("/run/admin.sock", ports, 0.5, "chat", ipv6=False, hold_timeout_s=3600)
    hold = text.split("backend hold\n", 1)[1]
    (timeout,) = [line for line in hold.splitlines() if line.startswith("  timeout server ")]
    assert int(timeout.split()[-1].removesuffix("s")) > 3600 + 2 * 3600
    # Its own errors (the activator unreachable) are JSON too, not HAProxy's HTML pages.
    assert [line.split()[2] for line in hold.splitlines() if line.startswith("  http-error status ")] == [
        "502",
        "503",
        "504",
    ]


def test_an_ipv6_replica_is_written_in_brackets() -> None:
    """An IPv6 cluster's EndpointSlices give addresses such as fd00::5: the port must not read as a
    part of them, in HAProxy's server line or in the activator's URL."""
    desired = {"v6": Replica("v6", "fd00::5", 8000, State.READY)}
    added = sync_commands({}, desired)[0]
    assert added == "add server replicas/v6 [fd00::5]:8000 check inter 1s fall 2 rise 1"
    assert replica_url("fd00::5", 8000, "/v1/completions") == "http://[fd00::5]:8000/v1/completions"
    assert replica_url("10.0.0.6", 8000, "/x") == "http://10.0.0.6:8000/x"


def test_the_activator_forgets_replicas_that_left() -> None:
    """Its per-replica counts (which replica a held request goes to) would grow with every rollout."""
    router = Router(parse_args(["--namespace=ml", "--service=chat"]), CollectorRegistry())
    shutil.rmtree(router.workdir)  # HAProxy's directory: not used here
    port = {"name": "http", "port": 8000}

    def endpoint(name: str) -> dict[str, Any]:
        ready = {"ready": True, "serving": True, "terminating": False}
        return {"addresses": ["10.0.0.1"], "conditions": ready, "targetRef": {"name": name}}

    router.forwarded = {"chat-r0-node-0": 3, "chat-r1-node-0": 1}
    endpoints = [endpoint("chat-r1-node-0"), endpoint("chat-r2-node-0")]
    router.on_slices({"s": {"ports": [port], "endpoints": endpoints}})
    assert router.forwarded == {"chat-r1-node-0": 1}


def test_conditions_left_unset_read_as_the_api_documents_them() -> None:
    """A nil ``ready`` is ready (a hand-made or another controller's slice); nil ``serving`` defers to
    ``ready``; nil ``terminating`` is false."""
    replicas = replicas_from_slices(
        [
            _slice(
                8000,
                {"addresses": ["10.0.0.1"], "targetRef": {"name": "bare"}},
                _endpoint("10.0.0.2", "unset-ready"),
                _endpoint("10.0.0.3", "leaving", terminating=True),
                _endpoint("10.0.0.4", "leaving-ready-nil-serving", ready=True, terminating=True),
                _endpoint("10.0.0.5", "not-ready", ready=False),
                _endpoint("10.0.0.6", "gone", ready=False, terminating=True),
            )
        ]
    )
    assert {name: replica.state for name, replica in replicas.items()} == {
        "bare": State.READY,
        "unset-ready": State.READY,
        "leaving": State.DRAINING,
        "leaving-ready-nil-serving": State.READY,
    }


def test_a_dual_stack_replica_is_reached_on_its_ipv4_address() -> None:
    """A dual-stack Service has an IPv4 and an IPv6 slice naming the same pods; the IPv6 one, listed
    first, once gave the address, and vLLM listens on IPv4 only."""
    ipv6 = _slice(8000, _endpoint("fd00::5", "a", ready=True))
    ipv4 = _slice(8000, _endpoint("10.0.0.5", "a", ready=True))
    for order in ([ipv6, ipv4], [ipv4, ipv6]):
        assert replicas_from_slices(order) == {"a": Replica("a", "10.0.0.5", 8000, State.READY)}
    # An IPv6-only cluster's replica keeps its one address; ready still wins over the family.
    assert replicas_from_slices([ipv6])["a"].address == "fd00::5"
    draining_ipv4 = _slice(8000, _endpoint("10.0.0.5", "a", ready=False, serving=True, terminating=True))
    assert replicas_from_slices([draining_ipv4, ipv6])["a"] == Replica("a", "fd00::5", 8000, State.READY)
