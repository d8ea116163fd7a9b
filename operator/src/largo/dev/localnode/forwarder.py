"""The API server on loopback, made reachable from pods at the bridge address: the one Service a pod
needs without kube-proxy."""

from __future__ import annotations

import select
import socket
import socketserver


class ApiForwarder(socketserver.ThreadingTCPServer):
    """Makes the API server (on loopback) reachable from pods at the bridge address: the one Service a
    pod needs without kube-proxy. Each connection is piped both ways as raw bytes (TLS passes through)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        super().__init__(listen, _ForwardHandler)


class _ForwardHandler(socketserver.BaseRequestHandler):
    server: ApiForwarder

    def handle(self) -> None:
        with socket.create_connection(self.server.upstream, timeout=10) as upstream:
            upstream.settimeout(None)
            sockets = [self.request, upstream]
            while True:
                readable, _, _ = select.select(sockets, [], [], 60)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is self.request else self.request).sendall(data)
