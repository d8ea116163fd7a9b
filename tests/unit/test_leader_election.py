"""Leader election's safety nets around the client's election: every Lease call gives up in time, a
leader whose election is stuck stops, and a leader task that dies ends the process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any

import pytest
from kubernetes import client
from largo.controllers.leader import (
    ElectionTimings,
    LeaderGate,
    overdue,
    release_lease,
    supervise,
    timed_lease_lock,
)


def test_a_lease_call_to_a_server_that_never_answers_gives_up_after_one_try() -> None:
    """The client's LeaseLock sets no timeout: one such call blocked the election for good, and the
    leader neither renewed, nor gave up, nor exited. And one try only: urllib3's default retries made a
    2 s timeout 8 s (24 s with the default timings), the process's default configuration having them."""
    connections: list[socket.socket] = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()

        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    connections.append(silent.accept()[0])  # and never answer

        threading.Thread(target=accept, daemon=True).start()
        before = client.Configuration.get_default_copy()
        default = client.Configuration.get_default_copy()
        default.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client.Configuration.set_default(default)  # as load_kube_config leaves it: retries on
        try:
            timings = ElectionTimings(lease_duration=5, renew_deadline=2, retry_period=1)
            lock = timed_lease_lock("largo", "ns", "me", timings)
        finally:
            client.Configuration.set_default(before)
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append(lock.get("largo", "ns"))
            except Exception as error:  # a timeout, as the election's attempt takes it
                outcome.append(error)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(60)  # a guard against a hang, not a measure of speed
        for connection in connections:
            connection.close()
    assert not worker.is_alive(), "the Lease call never returned"
    assert len(outcome) == 1
    assert "timed out" in str(outcome[0]).lower()
    assert len(connections) == 1  # one try, not four


def test_a_leader_whose_fence_closed_a_lease_duration_ago_is_overdue() -> None:
    now = [100.0]
    gate = LeaderGate(renew_deadline=6, clock=lambda: now[0])
    assert not overdue(gate, 10)  # never led: a standby is never overdue
    gate.renewed(100.0)
    now[0] = 105.0
    assert gate.leading()
    assert not overdue(gate, 10)
    now[0] = 115.0  # fence closed at 106, not renewed since: another replica may lead from 110 on
    assert not gate.leading()
    assert not overdue(gate, 10)
    now[0] = 116.5
    assert overdue(gate, 10)
    gate.lose()
    assert not overdue(gate, 10)  # already stopping


@pytest.mark.parametrize(
    ("ending", "stopping", "dies"),
    [("error", False, True), ("error", True, True), ("return", False, True), ("return", True, False)],
)
def test_a_leader_task_that_ends_on_its_own_ends_the_process(ending: str, stopping: bool, dies: bool) -> None:
    died: list[bool] = []

    async def work() -> None:
        if ending == "error":
            raise RuntimeError("the scheduler loop broke")

    async def scenario() -> None:
        task = supervise(work(), "largo-gang-scheduler", lambda: stopping, lambda: died.append(True))
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run on the next turn

    asyncio.run(scenario())
    assert died == ([True] if dies else [])


def test_a_cancelled_leader_task_is_the_operator_stopping() -> None:
    died: list[bool] = []

    async def scenario() -> None:
        task = supervise(asyncio.sleep(60), "largo-autoscaler", lambda: False, lambda: died.append(True))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert died == []


class FakeLeases:
    def __init__(self, holder: str | None) -> None:
        self.lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name="largo"),
            spec=client.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=10),
        )
        self.replaced: list[client.V1Lease] = []

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> client.V1Lease:
        return self.lease

    def replace_namespaced_lease(self, name: str, namespace: str, body: client.V1Lease, **_: Any) -> None:
        self.replaced.append(body)


def _leading_gate() -> LeaderGate:
    gate = LeaderGate(renew_deadline=6)
    gate.renewed(gate.clock())
    return gate


def test_a_leader_that_stops_gives_its_lease_up_and_writes_nothing_more() -> None:
    """As client-go's ReleaseOnCancel: a standby takes over at its next try, not after the Lease's
    10 s (a gap in scheduling at every rolling update)."""
    leases, gate = FakeLeases("me"), _leading_gate()
    assert release_lease(leases, gate, "largo", "ns", "me")  # type: ignore[arg-type]
    assert not gate.leading()
    ((released,),) = [leases.replaced]
    assert released.spec.holder_identity is None
    assert released.spec.lease_duration_seconds == 1


@pytest.mark.parametrize(("holder", "leading"), [("another", True), ("me", False)])
def test_a_lease_not_held_is_left_alone(holder: str, leading: bool) -> None:
    leases = FakeLeases(holder)
    gate = _leading_gate() if leading else LeaderGate(renew_deadline=6)
    assert not release_lease(leases, gate, "largo", "ns", "me")  # type: ignore[arg-type]
    assert leases.replaced == []


def test_a_stopping_replica_never_takes_the_lease_again() -> None:
    """After the release, the election thread would find the Lease without a holder and take it back
    (the standby would then wait the Lease out after all)."""
    from kubernetes.leaderelection import electionconfig
    from largo.controllers.leader import _FencedElection

    class Lock:
        name, namespace, identity = "largo", "ns", "me"

        def get(self, name: str, namespace: str) -> Any:
            raise AssertionError("a stopping replica asked for the Lease")

    config = electionconfig.Config(Lock(), 10, 6, 1, lambda: None, lambda: None)  # type: ignore[no-untyped-call]
    gate = _leading_gate()
    gate.lose()
    assert _FencedElection(config, gate).try_acquire_or_renew() is False
