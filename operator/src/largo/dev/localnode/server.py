"""The node's kubelet endpoint, for ``kubectl logs``: the API server calls
``GET /containerLogs/<namespace>/<pod>/<container>`` over TLS with its client certificate, and this
serves the container's log file (``previous``, ``tailLines``, ``limitBytes``, ``follow``).

Only the cluster's CA-signed clients are served: the API server, which has already authorized the user.
"""

from __future__ import annotations

import http.server
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from largo.dev.localnode.logs import latest_log

_FOLLOW_POLL_SECONDS = 0.5


class KubeletServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        logs_dir: Path,
        running: Callable[[str, str, str], bool],
        stopping: threading.Event,
        cert: Path,
        key: Path,
        client_ca: Path,
    ) -> None:
        super().__init__(address, _Handler)
        self.logs_dir = logs_dir
        # Whether (namespace, pod, container) still runs here: a followed log ends when it stops.
        self.running = running
        self.stopping = stopping
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
        self.socket = context.wrap_socket(self.socket, server_side=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: KubeletServer

    def log_message(self, format: str, *args: object) -> None:
        return  # the API server logs every request already

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container> is served")
            return
        _, namespace, pod, container = parts
        query = urllib.parse.parse_qs(url.query)

        def flag(name: str) -> bool:
            return query.get(name, ["false"])[0].lower() in ("true", "1")

        try:
            path = latest_log(self.server.logs_dir, pod, namespace, container, flag("previous"))
        except FileNotFoundError as error:
            self.send_error(404, str(error))
            return
        data = path.read_bytes()
        if "tailLines" in query:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(query["tailLines"][0]) :]) if int(query["tailLines"][0]) else b""
        if "limitBytes" in query:
            data = data[: int(query["limitBytes"][0])]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(data)
        if not flag("follow") or flag("previous"):
            return
        offset = path.stat().st_size
        with path.open("rb") as log:
            log.seek(offset)
            while not self.server.stopping.is_set():
                chunk = log.read()
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                elif not self.server.running(namespace, pod, container):
                    self.wfile.write(log.read())
                    return
                else:
                    self.server.stopping.wait(_FOLLOW_POLL_SECONDS)
