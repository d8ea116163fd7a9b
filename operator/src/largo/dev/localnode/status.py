"""Pure pod-status bookkeeping, as a kubelet reports it: container states, restart decisions, probe
thresholds and the pod's phase and conditions."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace
from typing import Any

JSON = dict[str, Any]

# The kubelet's crash-loop back-off: 10 s doubling to 5 minutes, reset after 10 minutes of running.
BACKOFF_INITIAL_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 300.0


def timestamp(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ContainerState:
    """One container as the agent last saw it."""

    name: str
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    restart_count: int = 0
    ready: bool = False
    last_terminated: JSON | None = None

    def running(self, now: float) -> ContainerState:
        return replace(
            self,
            state="running",
            reason="",
            message="",
            started_at=now,
            finished_at=None,
            exit_code=None,
            ready=False,
        )

    def terminated(self, exit_code: int, now: float, reason: str = "", message: str = "") -> ContainerState:
        reason = reason or ("Completed" if exit_code == 0 else "Error")
        return replace(
            self,
            state="terminated",
            reason=reason,
            message=message,
            finished_at=now,
            exit_code=exit_code,
            ready=False,
        )

    def restarting(self, reason: str = "CrashLoopBackOff", message: str = "") -> ContainerState:
        """Waits to start again; the last run becomes lastState.terminated."""
        return replace(
            self,
            state="waiting",
            reason=reason,
            message=message,
            restart_count=self.restart_count + 1,
            last_terminated=self.as_terminated(),
            ready=False,
        )

    def as_terminated(self) -> JSON:
        terminated: JSON = {
            "exitCode": self.exit_code if self.exit_code is not None else 0,
            "reason": self.reason,
        }
        if self.message:
            terminated["message"] = self.message
        if self.started_at is not None:
            terminated["startedAt"] = timestamp(self.started_at)
        if self.finished_at is not None:
            terminated["finishedAt"] = timestamp(self.finished_at)
        return terminated

    def to_status(self, image: str) -> JSON:
        if self.state == "running":
            state: JSON = {"running": {"startedAt": timestamp(self.started_at or 0)}}
        elif self.state == "terminated":
            state = {"terminated": self.as_terminated()}
        else:
            waiting: JSON = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        status: JSON = {
            "name": self.name,
            "image": image,
            "imageID": "",
            "ready": self.ready,
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        return status


def should_restart(restart_policy: str, exit_code: int) -> bool:
    if restart_policy == "Always":
        return True
    if restart_policy == "OnFailure":
        return exit_code != 0
    return False


def backoff_seconds(restart_count: int) -> float:
    """Delay before restart number ``restart_count + 1``."""
    return min(BACKOFF_INITIAL_SECONDS * float(2 ** max(restart_count, 0)), BACKOFF_MAX_SECONDS)


def pod_phase(restart_policy: str, containers: list[ContainerState], init_failed: bool = False) -> str:
    """The pod phase from its containers, as the kubelet's getPhase derives it: a container waiting to
    restart counts by its last exit."""
    if init_failed:
        return "Failed"
    if not containers:
        return "Pending"
    pending = running = stopped = succeeded = 0
    for container in containers:
        if container.state == "running":
            running += 1
        elif container.state == "terminated":
            stopped += 1
            succeeded += container.exit_code == 0
        elif container.last_terminated is not None:
            stopped += 1
            succeeded += container.last_terminated.get("exitCode") == 0
        else:
            pending += 1
    if pending:
        return "Pending"
    if running or restart_policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    return "Failed" if restart_policy == "Never" else "Running"


def is_terminal(phase: str) -> bool:
    return phase in ("Succeeded", "Failed")


def _condition(kind: str, true: bool, now_text: str, reason: str = "") -> JSON:
    condition: JSON = {"type": kind, "status": "True" if true else "False", "lastTransitionTime": now_text}
    if reason and not true:
        condition["reason"] = reason
    return condition


def pod_status(
    pod: JSON,
    containers: list[ContainerState],
    init_containers: list[ContainerState],
    pod_ip: str,
    host_ip: str,
    started_at: float,
    now: float,
    init_failed: bool = False,
) -> JSON:
    """status for a strategic-merge patch of pods/status (conditions merge by type)."""
    spec = pod["spec"]
    images = {
        c["name"]: c.get("image", "") for c in [*(spec.get("initContainers") or []), *spec["containers"]]
    }
    phase = pod_phase(spec.get("restartPolicy", "Always"), containers, init_failed)
    initialized = all(c.state == "terminated" and c.exit_code == 0 for c in init_containers)
    containers_ready = bool(containers) and all(c.ready for c in containers)
    # Previously reported transition times are kept, so a condition's time moves only when it flips.
    previous = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    now_text = timestamp(now)

    def condition(kind: str, true: bool, reason: str = "") -> JSON:
        fresh = _condition(kind, true, now_text, reason)
        old = previous.get(kind)
        if old and old.get("status") == fresh["status"] and old.get("lastTransitionTime"):
            fresh["lastTransitionTime"] = old["lastTransitionTime"]
        return fresh

    not_ready_reason = "PodCompleted" if is_terminal(phase) else "ContainersNotReady"
    status: JSON = {
        "phase": phase,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": timestamp(started_at),
        "conditions": [
            condition("PodReadyToStartContainers", bool(pod_ip) and not is_terminal(phase)),
            condition("Initialized", initialized, "ContainersNotInitialized"),
            condition("ContainersReady", containers_ready, not_ready_reason),
            condition("Ready", containers_ready, not_ready_reason),
        ],
        "containerStatuses": [c.to_status(images.get(c.name, "")) for c in containers],
    }
    if init_containers:
        status["initContainerStatuses"] = [c.to_status(images.get(c.name, "")) for c in init_containers]
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return status


@dataclass(slots=True)
class ProbeTracker:
    """Counts consecutive probe results against a probe's thresholds (Kubernetes defaults)."""

    probe: JSON
    successes: int = 0
    failures: int = 0
    last_run: float = field(default=-1e18)
    started_at: float = 0.0

    @property
    def period(self) -> float:
        return float(self.probe.get("periodSeconds", 10))

    def due(self, now: float) -> bool:
        if now - self.started_at < float(self.probe.get("initialDelaySeconds", 0)):
            return False
        return now - self.last_run >= self.period

    def observe(self, ok: bool, now: float) -> bool | None:
        """Records a result; returns the new verdict when a threshold is crossed, else None."""
        self.last_run = now
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes == int(self.probe.get("successThreshold", 1)):
                return True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures == int(self.probe.get("failureThreshold", 3)):
                return False
        return None
