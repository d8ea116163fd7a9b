"""Training progress, reported by the reporting rank (rank 0; under pipeline parallelism the first rank
of the last stage) into its job's progress ConfigMap (``LARGO_PROGRESS_CONFIGMAP``).

Why a ConfigMap of its own: the runtime's identity then needs to write that one object only (a Role
with ``resourceNames``), never the TrainJob's status, which it could otherwise forge. The operator
validates each report and copies it into ``status.progress`` (the PROGRESS column); a malformed one is
refused with a reason in the job's conditions. No network path from the operator to the pods is needed.
Reports go out from a background thread, at most every ``interval`` seconds: the training loop never
waits on the API server.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import threading
from typing import Any

logger = logging.getLogger(__name__)

# The ConfigMap key the operator reads (largo.policy.progress.REPORT_KEY).
REPORT_KEY = "progress"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _utc(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_fields(
    step: int,
    total: int,
    loss: float | None,
    tokens_per_second: float,
    steps_per_second: float,
    now: float,
    checkpoint: tuple[int, float] | None = None,
) -> dict[str, Any]:
    """One progress report (pure); ``checkpoint`` is (step, epoch seconds) of the newest complete
    checkpoint this run wrote, from which the operator tells how much work a failure would lose. A
    loss that is not a number (a diverged run, or none computed) is sent as null, which the operator
    takes, where NaN made it refuse every report from then on."""
    percent = round(100.0 * step / total, 1) if total else 0.0
    eta = (total - step) / steps_per_second if steps_per_second > 0 else None
    finite = loss is not None and math.isfinite(loss)
    summary = f"{percent:g}% {step}/{total}"
    if loss is not None:
        summary += f" loss {loss:.3f}"
    if eta is not None:
        summary += f" ETA {_duration(eta)}"
    fields: dict[str, Any] = {
        "step": step,
        "totalSteps": total,
        "percent": percent,
        "loss": round(loss, 6) if finite and loss is not None else None,
        "tokensPerSecond": round(tokens_per_second, 1),
        "updatedAt": _utc(now),
        "summary": summary,
    }
    if checkpoint is not None:
        fields["checkpointStep"], fields["checkpointedAt"] = checkpoint[0], _utc(checkpoint[1])
    if eta is not None:
        fields["etaSeconds"] = int(eta)
    return fields


class ProgressReporter:
    """Sends the latest progress of rank 0 to the ConfigMap named by ``LARGO_PROGRESS_CONFIGMAP``."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.configmap = os.environ.get("LARGO_PROGRESS_CONFIGMAP")
        self.namespace = os.environ.get("LARGO_JOB_NAMESPACE")
        self._latest: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._api: Any = None
        self._thread: threading.Thread | None = None
        if self.configmap and self.namespace:
            self._thread = threading.Thread(target=self._run, name="largo-progress", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def report(self, fields: dict[str, Any]) -> None:
        self._latest = fields
        self._wake.set()

    def close(self) -> None:
        """Sends the last report, then stops."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            self._api = client.CoreV1Api()
        return self._api

    def _run(self) -> None:
        sent: dict[str, Any] | None = None
        while not self._closing.is_set():
            self._wake.wait()
            self._wake.clear()
            sent = self._send(sent)
            # At most one report per interval; closing cuts the wait short.
            self._closing.wait(self.interval)
        # The last report, including one that came while an earlier one was being sent.
        self._send(sent)

    def _send(self, sent: dict[str, Any] | None) -> dict[str, Any] | None:
        latest = self._latest
        if latest is None or latest is sent:
            return sent
        try:
            self._client().patch_namespaced_config_map(
                self.configmap, self.namespace, {"data": {REPORT_KEY: json.dumps(latest)}}
            )
            return latest
        except Exception as error:  # progress is best effort: training goes on regardless
            logger.warning("could not report progress to %s/%s: %s", self.namespace, self.configmap, error)
            return sent
