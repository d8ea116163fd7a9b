"""What HAProxy is told: its configuration file, the replicas an EndpointSlice list names, and the
runtime-API commands that turn the servers HAProxy has into the ones it should have. Pure: no I/O.

Replicas are HAProxy *dynamic servers* named after their pods, so that the built-in Prometheus
exporter's per-server series (in flight, latency, errors) are per replica without a mapping table.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from largo.manifests.names import host_port

JSON = Mapping[str, Any]

BACKEND = "replicas"
HOLD = "hold"
ACTIVATOR = "activator"


class State(enum.StrEnum):
    READY = "ready"  # takes new requests
    DRAINING = "draining"  # finishes its requests, takes no new one (a terminating replica)
    OFF = "off"  # in maintenance: a server that left, waiting for its last request to be deleted


@dataclass(frozen=True, slots=True)
class Replica:
    name: str
    address: str
    port: int
    state: State


@dataclass(frozen=True, slots=True)
class Ports:
    serve: int = 8080  # requests, through the pod's `http` port
    activator: int = 8081  # loopback: the activator, which holds requests while no replica is usable
    exporter: int = 8404  # loopback: HAProxy's own Prometheus exporter, merged into the agent's /metrics


# What HAProxy itself answers when no replica did (every retry refused, closed unanswered or timed
# out): the OpenAI-style error body the server and the activator use, not HAProxy's HTML page.
_PROXY_ERRORS = {
    502: ("bad_gateway", "no replica of {service} gave an answer; try again"),
    503: ("service_unavailable", "no replica of {service} answered; try again later"),
    504: ("gateway_timeout", "no replica of {service} answered in time; try again later"),
}


def error_body(code: int, service: str) -> str:
    kind, message = _PROXY_ERRORS[code]
    body = {"error": {"message": message.format(service=service), "type": kind, "param": None, "code": code}}
    return json.dumps(body)


def _http_errors(service: str) -> str:
    # Single quotes: HAProxy takes the JSON's double quotes as they are. Service names are DNS labels.
    return "".join(
        f"  http-error status {code} content-type application/json string '{error_body(code, service)}'"
        + (" hdr Retry-After 5" if code == 503 else "")
        + "\n"
        for code in _PROXY_ERRORS
    )


# How long a completion may take once it is under way, through either backend (the model server bounds
# a request, not the proxy).
GENERATION_SECONDS = 3600


def render_config(
    socket_path: str,
    ports: Ports,
    connect_timeout_s: float = 2.0,
    service: str = "",
    ipv6: bool = False,
    hold_timeout_s: float = 300.0,
) -> str:
    """The configuration HAProxy starts with: one frontend (on IPv4 and, where the pod has it, IPv6);
    the replicas' backend, balanced by least outstanding requests; and the activator's, used while the
    replicas' has no usable server. Replicas arrive later through the runtime API."""
    connect_ms = max(1, round(connect_timeout_s * 1000))
    # A held request's answer starts only after its body was read and its replica came (each within the
    # hold timeout), then takes as long as a completion: HAProxy's own timeout on the activator must
    # outlast that, or its HTML 504 came before the activator's 503 (at a hold timeout of an hour).
    hold_server_s = GENERATION_SECONDS + 2 * math.ceil(hold_timeout_s) + 60
    errors = _http_errors(service or "this service")
    listen = f":::{ports.serve} v4v6" if ipv6 else f":{ports.serve}"
    return f"""\
global
  stats socket {socket_path} mode 600 level admin
  maxconn 8192
  nbthread 1

defaults
  mode http
  option http-keep-alive
  option http-no-delay
  # A client that closes before its answer has left (a timeout, a cancelled call): the request is
  # aborted at the server too, so a held one stops counting as load and a replica stops generating for
  # nobody. HTTP allows a client to half-close and still read; no OpenAI client does.
  option abortonclose
  timeout connect {connect_ms}ms
  # Completions stream for as long as they generate: the model server bounds a request, not the proxy.
  timeout client {GENERATION_SECONDS}s
  timeout server {GENERATION_SECONDS}s
  timeout http-request 30s

frontend serve
  bind {listen}
  # No replica can take it (none ready, or all leaving): the activator holds it until one is ready.
  use_backend {HOLD} if {{ nbsrv({BACKEND}) lt 1 }}
  default_backend {BACKEND}

frontend exporter
  bind 127.0.0.1:{ports.exporter}
  http-request use-service prometheus-exporter if {{ path /metrics }}

backend {BACKEND}
  # leastconn counts each server's requests in progress: outstanding requests, not past ones.
  balance leastconn
  http-reuse safe
  # A replica that refuses the connection (it died), closes it unanswered (killed mid-request) or says
  # 503 (draining: it is leaving): the request goes to another one. A request body must fit HAProxy's
  # buffer (16 kB) to be sent again.
  retries 3
  retry-on conn-failure empty-response 503
  option redispatch 1
{errors}
backend {HOLD}
  # Its 503 (no replica came in time) is the answer: never retried.
  timeout server {hold_server_s}s
  server {ACTIVATOR} 127.0.0.1:{ports.activator}
{errors}"""


def replicas_from_slices(slices: Iterable[JSON], port_name: str = "http") -> dict[str, Replica]:
    """The replicas EndpointSlices name: ready endpoints take requests; serving but terminating ones
    drain; the rest are left out. A condition left unset reads as the API documents: ``ready`` as true
    (unless terminating), ``serving`` as ``ready``, ``terminating`` as false. An endpoint in two slices
    (a slice being replaced, or a dual-stack Service's IPv4 and IPv6 slices) counts once, ready winning
    over draining, then its IPv4 address over its IPv6 one: a server that listens on IPv4 only (vLLM's
    ``--host 0.0.0.0``) is reachable on it, and every server that listens on IPv6 as well."""
    replicas: dict[str, Replica] = {}
    for endpoint_slice in slices:
        port = next(
            (p.get("port") for p in endpoint_slice.get("ports") or () if p.get("name") == port_name), None
        )
        if not isinstance(port, int):
            continue
        for endpoint in endpoint_slice.get("endpoints") or ():
            addresses = endpoint.get("addresses") or ()
            if not addresses:
                continue
            state = _endpoint_state(endpoint.get("conditions") or {})
            if state is None:
                continue
            target = endpoint.get("targetRef") or {}
            name = str(target.get("name") or addresses[0].replace(":", "-").replace(".", "-"))
            replica = Replica(name, str(addresses[0]), port, state)
            known = replicas.get(name)
            if known is None or _preferred(replica) > _preferred(known):
                replicas[name] = replica
    return replicas


def _endpoint_state(conditions: Mapping[str, Any]) -> State | None:
    terminating = conditions.get("terminating") is True
    ready = conditions.get("ready")
    if ready is True or (ready is None and not terminating):
        return State.READY
    serving = conditions.get("serving")
    if terminating and (serving is True or (serving is None and ready is not False)):
        return State.DRAINING
    return None


def _preferred(replica: Replica) -> tuple[bool, bool]:
    return replica.state is State.READY, ":" not in replica.address


def _server(name: str) -> str:
    return f"{BACKEND}/{name}"


def sync_commands(current: Mapping[str, Replica], desired: Mapping[str, Replica]) -> list[str]:
    """Runtime-API commands from the servers HAProxy has (``current``) to ``desired``.

    A new replica is added in maintenance (as HAProxy adds dynamic servers), given a TCP health check
    (a dead process is noticed between EndpointSlice updates) that starts from up (its EndpointSlice
    says it is ready), then set ready (or draining). A replica that left is put
    in maintenance and deleted; HAProxy refuses the deletion while requests are still on it, and the
    caller repeats it on the next sync (see ``removals``)."""
    commands: list[str] = []
    for name in sorted(set(current) - set(desired)):
        commands += [f"disable server {_server(name)}", f"del server {_server(name)}"]
    for name, replica in sorted(desired.items()):
        known = current.get(name)
        if known is None:
            commands += [
                f"add server {_server(name)} {host_port(replica.address, replica.port)} "
                "check inter 1s fall 2 rise 1",
                f"enable health {_server(name)}",
                # Ready by its EndpointSlice already: up now, not after its first check.
                f"set server {_server(name)} health up",
                # Out of maintenance straight into its state: one seen leaving first never takes a
                # request between an "enable" and a "drain".
                f"set server {_server(name)} state {'drain' if replica.state is State.DRAINING else 'ready'}",
            ]
            continue
        if (known.address, known.port) != (replica.address, replica.port):
            # The same pod name on a new address: a restarted replica group.
            commands.append(f"set server {_server(name)} addr {replica.address} port {replica.port}")
        if known.state is not replica.state:
            # Either state also takes a server out of maintenance (a replica back under the same name).
            commands.append(
                f"set server {_server(name)} state {'drain' if replica.state is State.DRAINING else 'ready'}"
            )
    return commands


# `show servers state`' admin-state bits (HAProxy's SRV_ADMF_*): forced, inherited, configured,
# resolution and health-check maintenance; forced and inherited drain.
_MAINTENANCE = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
_DRAIN = 0x08 | 0x10


def parse_servers_state(text: str) -> dict[str, Replica]:
    """The replicas HAProxy has, from ``show servers state <backend>`` (version 1 of its format)."""
    servers: dict[str, Replica] = {}
    lines = text.splitlines()
    header = next((line for line in lines if line.startswith("# be_id")), None)
    if header is None:
        return servers
    columns = header[2:].split()
    for line in lines:
        fields = line.split()
        if line.startswith("#") or len(fields) != len(columns):
            continue
        row = dict(zip(columns, fields, strict=True))
        if row["be_name"] != BACKEND or row["srv_name"] == ACTIVATOR:
            continue
        admin = int(row["srv_admin_state"])
        state = State.OFF if admin & _MAINTENANCE else State.DRAINING if admin & _DRAIN else State.READY
        servers[row["srv_name"]] = Replica(row["srv_name"], row["srv_addr"], int(row["srv_port"]), state)
    return servers


def command_failed(command: str, answer: str) -> bool:
    """HAProxy answers a successful runtime-API command with an empty line or a confirmation."""
    text = answer.strip()
    if command.startswith("add server"):
        return text != "New server registered."
    if command.startswith("del server"):
        return text != "Server deleted."
    if command.startswith("set server") and " addr " in command:
        # "IP changed from 'a' to 'b', no need to change the port by 'stats socket command'" (2.6);
        # a refusal reads "Invalid addr ..." or "No such server.".
        return not ("changed from" in text or "no need to change" in text)
    return bool(text)
