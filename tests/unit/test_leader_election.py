"""Leader election's safety nets around the client's election: every Lease call gives up in time, a
leader whose election is stuck stops, and a leader task that dies ends the process."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest
from kubernetes import client
from largo.controllers.leader import ElectionTimings, LeaderGate, overdue, supervise, timed_lease_lock


def test_a_lease_call_to_a_server_that_never_answers_gives_up() -> None:
    """The client's LeaseLock sets no timeout: one such call blocked the election for good, and the
    leader neither renewed, nor gave up, nor exited."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        configuration = client.Configuration(host=f"http://127.0.0.1:{silent.getsockname()[1]}")
        configuration.retries = False
        timings = ElectionTimings(lease_duration=4, renew_deadline=2, retry_period=1)
        lock = timed_lease_lock("largo", "ns", "me", timings)
        lock.api_instance.api_client = client.ApiClient(configuration)
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append(lock.get("largo", "ns"))
            except Exception as error:  # a timeout, as the election's attempt takes it
                outcome.append(error)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(60)  # a guard against a hang, not a measure of speed
    assert not worker.is_alive(), "the Lease call never returned"
    assert len(outcome) == 1
    assert "timed out" in str(outcome[0]).lower()


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
