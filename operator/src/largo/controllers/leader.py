"""Lease-based leader election for several operator replicas, with a fence on every write.

Every replica watches and keeps its indexes warm; only the holder of the coordination.k8s.io Lease runs
the gang scheduler and the reconcile workers. The election itself is the kubernetes client's
(``kubernetes.leaderelection`` with its ``LeaseLock``, the same protocol as client-go); largo adds:

- a fence: ``LeaderGate.leading()`` is true only until ``renew_deadline`` after the start of the last
  successful renewal, measured on the monotonic clock. Every API write checks it at the moment it is
  sent, so a leader that cannot renew (partitioned, or frozen and then resumed) stops writing before
  its lease can expire for the others (``renew_deadline < lease_duration``);
- leadership is never regained in place: once lost, the process exits and its Deployment restarts it
  as a standby, so no task or reservation of the old term survives into the new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from largo.controllers.workqueue import Retry

logger = logging.getLogger(__name__)

_SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


# How long a write may take to connect (seconds): the fence's margin (ElectionTimings).
WRITE_CONNECT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class ElectionTimings:
    """client-go's meaning: a standby takes over ``lease_duration`` after the last renewal it saw; a
    leader gives up after failing to renew for ``renew_deadline``; candidates retry every ``retry_period``.
    A standby takes over at most ``lease_duration + 2 * retry_period`` after the leader stops."""

    # Whole seconds: the Lease stores leaseDurationSeconds as an integer.
    lease_duration: int = 10
    renew_deadline: int = 6
    retry_period: int = 1

    def __post_init__(self) -> None:
        if not self.retry_period + self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs retry_period + renew_deadline < lease_duration")
        if not self.renew_deadline > 1.2 * self.retry_period:
            raise ValueError("leader election needs renew_deadline > 1.2 * retry_period")
        # The fence (LeaderGate) lets a write start until renew_deadline after the renewal began, and
        # its connection may take WRITE_CONNECT_SECONDS: it must reach the API server before a standby
        # can hold the Lease, lease_duration after that renewal.
        if not self.renew_deadline + WRITE_CONNECT_SECONDS < self.lease_duration:
            raise ValueError(
                f"leader election needs renew_deadline + {WRITE_CONNECT_SECONDS:g} (a write's connect "
                "timeout) < lease_duration, or a deposed leader's last write could land after a standby "
                "took over"
            )


@dataclass
class LeaderGate:
    """Whether this replica may write now. Without an election (one replica) it always may."""

    renew_deadline: int | None = None
    clock: Callable[[], float] = time.monotonic
    _valid_until: float = field(default=float("-inf"))
    _lost: bool = False

    def leading(self) -> bool:
        if self.renew_deadline is None:
            return True
        return not self._lost and self.clock() < self._valid_until

    def renewed(self, attempt_started: float) -> None:
        """A renewal that began at ``attempt_started`` (monotonic) succeeded."""
        if self.renew_deadline is not None and not self._lost:
            self._valid_until = max(self._valid_until, attempt_started + self.renew_deadline)

    def lose(self) -> None:
        self._lost = True

    @property
    def led(self) -> bool:
        """Whether this replica has led at all (renewed its Lease once)."""
        return self._valid_until > float("-inf")

    @property
    def valid_until(self) -> float:
        return self._valid_until

    @property
    def lost(self) -> bool:
        return self._lost


class NotLeader(Retry):
    """This replica is not (or no longer) the leader: the write was not sent."""


class _FencedElection(leaderelection.LeaderElection):
    """The client's election, telling the gate of every successful acquire or renewal."""

    def __init__(self, config: electionconfig.Config, gate: LeaderGate) -> None:
        super().__init__(config)  # type: ignore[no-untyped-call]
        self.gate = gate

    def try_acquire_or_renew(self) -> bool:
        if self.gate.lost:
            return False  # stopping (or released): never take the Lease again in this process
        started = self.gate.clock()
        try:
            succeeded = bool(super().try_acquire_or_renew())  # type: ignore[no-untyped-call]
        except Exception as error:  # a connection error is a failed attempt, not the end of the election
            logger.warning("leader election: %s", error)
            return False
        record = self.observed_record
        if succeeded and record is not None and self.election_config.lock.identity == record.holder_identity:
            self.gate.renewed(started)
        return succeeded


def default_namespace() -> str:
    """The operator's own namespace: POD_NAMESPACE, else the service account's, else default."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(_SERVICE_ACCOUNT_NAMESPACE) as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


def identity() -> str:
    """Unique per process: the pod's name (POD_NAME, else the hostname) and a random suffix, so a
    restarted replica never mistakes its predecessor's Lease for its own."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class _TimedLeaseApi(client.CoordinationV1Api):
    """The Lease calls the client's LeaseLock makes, each bounded in time: it sets no timeout, and a
    call to an API server that accepts the connection and never answers would block the election for
    good (no renewal, no giving up, no exit)."""

    def __init__(self, timeout: tuple[float, float], api_client: Any = None) -> None:
        super().__init__(api_client)
        self.timeout = timeout

    def read_namespaced_lease(self, *args: Any, **kwargs: Any) -> Any:
        return super().read_namespaced_lease(*args, **{**kwargs, "_request_timeout": self.timeout})

    def create_namespaced_lease(self, *args: Any, **kwargs: Any) -> Any:
        return super().create_namespaced_lease(*args, **{**kwargs, "_request_timeout": self.timeout})

    def replace_namespaced_lease(self, *args: Any, **kwargs: Any) -> Any:
        return super().replace_namespaced_lease(*args, **{**kwargs, "_request_timeout": self.timeout})


def lease_api(read_timeout: float) -> client.CoordinationV1Api:
    """Lease calls that give up after one try: connect within 2 s, an answer within ``read_timeout``
    (urllib3 would otherwise retry a timed-out read three times, four times the wait)."""
    configuration = client.Configuration.get_default_copy()
    configuration.retries = False
    return _TimedLeaseApi((2.0, read_timeout), client.ApiClient(configuration))


def timed_lease_lock(name: str, namespace: str, holder: str, timings: ElectionTimings) -> LeaseLock:
    """The client's LeaseLock whose every call gives up within the renew deadline."""
    lock = LeaseLock(name, namespace, holder)  # type: ignore[no-untyped-call]
    lock.api_instance = lease_api(float(timings.renew_deadline))
    return lock


def overdue(gate: LeaderGate, lease_duration: float) -> bool:
    """A leader whose fence closed more than ``lease_duration`` ago and which is still running: its
    election is stuck (another replica may lead by now), so it must stop."""
    return not gate.lost and gate.led and gate.clock() > gate.valid_until + lease_duration


def start_election(
    gate: LeaderGate,
    lease_name: str,
    namespace: str,
    holder: str,
    timings: ElectionTimings,
    started_leading: Callable[[], None],
    stopped_leading: Callable[[], None],
) -> threading.Thread:
    """Runs the election in a daemon thread: ``started_leading`` once the Lease is ours,
    ``stopped_leading`` once it is lost (after which this process must not act again)."""

    def stopped() -> None:
        gate.lose()
        logger.warning("%s lost the lease %s/%s: stopping", holder, namespace, lease_name)
        stopped_leading()

    config = electionconfig.Config(  # type: ignore[no-untyped-call]
        timed_lease_lock(lease_name, namespace, holder, timings),
        lease_duration=timings.lease_duration,
        renew_deadline=timings.renew_deadline,
        retry_period=timings.retry_period,
        onstarted_leading=started_leading,
        onstopped_leading=stopped,
    )
    election = _FencedElection(config, gate)

    def run() -> None:
        try:
            election.run()  # type: ignore[no-untyped-call]
        finally:
            # However the election ended, this process must not act again.
            if not gate.lost:
                stopped()

    def watchdog() -> None:
        # However the election thread is held up, a leader that cannot renew stops in time.
        while not gate.lost:
            time.sleep(timings.retry_period)
            if overdue(gate, timings.lease_duration):
                stopped()

    thread = threading.Thread(target=run, name="largo-leader-election", daemon=True)
    thread.start()
    threading.Thread(target=watchdog, name="largo-leader-watchdog", daemon=True).start()
    return thread


def release_lease(
    api: client.CoordinationV1Api, gate: LeaderGate, name: str, namespace: str, holder: str
) -> bool:
    """Gives the Lease up on a graceful stop, as client-go's ReleaseOnCancel: writes stop first (the
    gate is lost), then the Lease loses its holder, so a standby takes over at its next try (about a
    second) instead of waiting the Lease out. Only a Lease this replica holds is touched; any failure
    leaves it to expire as it would have (``api`` bounds each call: ``lease_api``). Returns whether it
    was released."""
    was_leading = gate.leading()
    gate.lose()
    if not was_leading:
        return False
    try:
        lease = api.read_namespaced_lease(name, namespace)
        if lease.spec is None or lease.spec.holder_identity != holder:
            return False
        lease.spec.holder_identity = None
        lease.spec.lease_duration_seconds = 1
        api.replace_namespaced_lease(name, namespace, lease)
    except Exception as error:  # the Lease expires on its own
        logger.warning("could not release the lease %s/%s: %s", namespace, name, error)
        return False
    logger.info("%s released the lease %s/%s", holder, namespace, name)
    return True


def supervise(
    work: Coroutine[Any, Any, None], name: str, stopping: Callable[[], bool], die: Callable[[], None]
) -> asyncio.Task[None]:
    """A leader's task, whose end by an error (or, unless ``stopping``, at all) calls ``die`` (the
    process exits, its Deployment restarts it as a standby): a leader whose scheduler or workers died
    would keep the Lease and look healthy while nothing is admitted or reconciled."""
    task = asyncio.create_task(work, name=name)

    def ended(done: asyncio.Task[None]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is None and stopping():
            return
        logger.critical("%s ended (%r): exiting so that another replica leads", name, error)
        die()

    task.add_done_callback(ended)
    return task
