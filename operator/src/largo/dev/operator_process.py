"""The operator as users run it (`largo operator`), as a child process: for the demo, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from largo.dev.cluster import ClusterError, free_port, http_ok, wait_for


class OperatorProcess:
    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.env = dict(env or {})
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.liveness = ""
        # /metrics of the running process: a fresh port at every start, as for the liveness endpoint.
        self.metrics_url = ""

    def start(self, timeout: float = 60.0) -> None:
        """Starts the operator and waits until its liveness endpoint answers."""
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        command = [sys.executable, "-m", "largo", "operator", "--liveness", self.liveness]
        command += ["--metrics-port", str(metrics_port), *self.args]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(
            lambda: http_ok(self.liveness), timeout, "the operator's liveness endpoint", self.assert_alive
        )

    def assert_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise ClusterError(f"the operator is not running; log tail:\n{tail}")

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to tidy up, as when its node dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its state but neither runs nor talks, as when partitioned."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, grace: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ClusterError("the operator was not started")
        return self.process.pid
