"""The ports test clusters and servers are started on: free, never handed out twice, and outside the
range the kernel gives outgoing connections (which would race a server for them)."""

from __future__ import annotations

import socket

from largo.dev import cluster


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ephemeral = cluster._ephemeral_ports()
    ports = [cluster.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < ephemeral.start for port in ports)
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_handed_out() -> None:
    listeners = []
    try:
        for _ in range(50):
            sock = socket.socket()
            sock.bind(("127.0.0.1", cluster.free_port()))
            sock.listen()
            listeners.append(sock)
        taken = {sock.getsockname()[1] for sock in listeners}
        cluster._handed_out.difference_update(taken)  # forgotten: only the bind check stands in the way
        assert not taken & {cluster.free_port() for _ in range(500)}
    finally:
        for sock in listeners:
            sock.close()
