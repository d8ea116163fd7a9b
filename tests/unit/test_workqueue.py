"""The keyed work queue: dedup, one worker per key, re-run after a wake-up during a run, delays."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest
from largo.controllers.workqueue import Retry, WorkQueue


async def _drain(queue: WorkQueue[str], worker: object, until: asyncio.Event, concurrency: int = 4) -> None:
    runner = asyncio.create_task(queue.run(worker, concurrency))  # type: ignore[arg-type]
    await asyncio.wait_for(until.wait(), 5)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


def test_wakeups_of_one_key_collapse_into_one_run() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        seen: list[str] = []
        done = asyncio.Event()

        async def worker(key: str) -> None:
            seen.append(key)
            if len(seen) == 2:
                done.set()

        for _ in range(5):
            queue.add("a")
        queue.add("b")
        await _drain(queue, worker, done)
        return seen

    assert sorted(asyncio.run(scenario())) == ["a", "b"]


def test_a_key_is_never_processed_twice_at_once_and_reruns_when_woken_meanwhile() -> None:
    async def scenario() -> tuple[int, int]:
        queue: WorkQueue[str] = WorkQueue()
        running = 0
        most = 0
        runs = 0
        done = asyncio.Event()
        first_started = asyncio.Event()

        async def worker(key: str) -> None:
            nonlocal running, most, runs
            running += 1
            most = max(most, running)
            first_started.set()
            await asyncio.sleep(0.01)
            running -= 1
            runs += 1
            if runs == 2:
                done.set()

        queue.add("a")
        runner = asyncio.create_task(queue.run(worker, 4))
        await first_started.wait()
        queue.add("a")  # woken while running: exactly one more run
        queue.add("a")
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.05)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return most, runs

    most, runs = asyncio.run(scenario())
    assert most == 1
    assert runs == 2


def test_worker_result_schedules_the_next_look_and_failures_retry_on_their_own() -> None:
    """No one wakes the key after its failures: the queue's back-off alone brings it back."""

    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue(base_delay=0.01, max_delay=0.05)
        seen: list[str] = []
        done = asyncio.Event()

        async def worker(key: str) -> float | None:
            seen.append(key)
            if len(seen) == 1:
                return 0.01  # asks to come back
            if len(seen) == 2:
                raise RuntimeError("transient")
            if len(seen) == 3:
                raise Retry("the object changed since it was read")
            done.set()
            return None

        queue.add("a")
        await _drain(queue, worker, done)
        return seen

    assert asyncio.run(scenario()) == ["a", "a", "a", "a"]


def test_back_off_doubles_per_failure_up_to_the_cap_and_success_forgets_it() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.5, max_delay=3.0)
    assert [queue.backoff("a") for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert queue.backoff("b") == 0.5  # per key
    queue.forget("a")
    assert queue.backoff("a") == 0.5


def test_a_key_failing_for_hours_stays_at_the_cap() -> None:
    """2 ** 1024 is no float: the 1,025th failure in a row raised in the worker, which ended the queue
    and the operator (a name taken for hours is retried every 10 s)."""
    queue: WorkQueue[str] = WorkQueue(base_delay=0.5, max_delay=60.0)
    delays = [queue.backoff("a") for _ in range(5000)]
    assert delays[-1] == 60.0
    assert max(delays) == 60.0


def test_a_retry_waits_at_least_what_the_api_server_asked() -> None:
    """A 429's Retry-After: the key's back-off (0.05 s at first) would have it back at once."""

    async def scenario() -> list[float]:
        queue: WorkQueue[str] = WorkQueue(base_delay=0.05, max_delay=60.0)
        asked: list[float] = []

        async def throttled(key: str) -> float | None:
            retry = Retry("throttled")
            retry.min_delay = 7.0
            raise retry

        told = asyncio.Event()

        def later(key: str, delay: float) -> None:
            asked.append(delay)
            told.set()

        queue.add_after = later  # type: ignore[method-assign]
        queue.add("a")
        task = asyncio.create_task(queue.run(throttled, concurrency=1))
        await asyncio.wait_for(told.wait(), 5)
        task.cancel()
        return asked

    assert asyncio.run(scenario()) == [7.0]


def test_a_wakeup_during_a_failed_run_does_not_cut_the_back_off_short() -> None:
    async def scenario() -> float:
        queue: WorkQueue[str] = WorkQueue(base_delay=0.3, max_delay=1.0)
        loop = asyncio.get_running_loop()
        runs: list[float] = []
        done = asyncio.Event()

        async def worker(key: str) -> None:
            runs.append(loop.time())
            if len(runs) == 1:
                queue.add("a")  # an event arrives while the failing run is in flight
                raise Retry("conflict")
            done.set()

        queue.add("a")
        await _drain(queue, worker, done)
        return runs[1] - runs[0]

    assert asyncio.run(scenario()) >= 0.3


def test_earlier_delayed_wakeup_wins() -> None:
    async def scenario() -> float:
        queue: WorkQueue[str] = WorkQueue()
        loop = asyncio.get_running_loop()
        started = loop.time()
        fired = asyncio.Event()
        fired_at = 0.0

        async def worker(key: str) -> None:
            nonlocal fired_at
            fired_at = loop.time() - started
            fired.set()

        queue.add_after("a", 10)
        queue.add_after("a", 0.01)
        queue.add_after("a", 20)
        await _drain(queue, worker, fired)
        return fired_at

    assert asyncio.run(scenario()) < 5


def test_a_conflict_is_retried_soon_however_often_it_repeats() -> None:
    class Conflict(Retry):
        max_delay = 0.05

    async def scenario() -> float:
        queue: WorkQueue[str] = WorkQueue(base_delay=0.01, max_delay=60.0)
        loop = asyncio.get_running_loop()
        times: list[float] = []
        done = asyncio.Event()

        async def worker(key: str) -> None:
            times.append(loop.time())
            if len(times) < 12:  # unchecked doubling would wait 0.01 * 2**10 = 10 s by now
                raise Conflict("the object changed since it was read")
            done.set()

        queue.add("a")
        await _drain(queue, worker, done)
        return max(b - a for a, b in itertools.pairwise(times))

    assert asyncio.run(scenario()) < 1.0


def test_a_standby_s_queue_takes_nothing() -> None:
    """No worker runs on a standby: what it queued would only pile up (keys of jobs long gone)."""
    queue: WorkQueue[str] = WorkQueue()
    queue.accepting = False
    for key in range(1000):
        queue.add(str(key))
    assert len(queue) == 0
    queue.accepting = True  # it leads: its handlers' wake-ups count again
    queue.add("a")
    assert len(queue) == 1


def test_a_key_failing_over_and_over_prints_its_traceback_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An API server down for minutes fails every key at every retry: one traceback per key and
    streak says what happened; the rest are single lines that still carry the error."""

    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue(base_delay=0.001, max_delay=0.001)
        runs = itertools.count(1)
        done = asyncio.Event()

        async def worker(key: str) -> float | None:
            run = next(runs)
            if run in (1, 2, 3):  # a streak of three, then a success
                raise ConnectionError(f"connection refused (run {run})")
            if run in (5, 6):  # a new streak: expected retries first, each one line
                raise Retry("the object changed since it was read")
            if run in (7, 8):  # then its first unexpected error: its traceback, once
                raise KeyError(f"a bug (run {run})")
            if run == 9:
                done.set()
                return None
            return 0.001

        queue.add("a")
        await _drain(queue, worker, done)

    with caplog.at_level(logging.INFO, logger="largo.controllers.workqueue"):
        asyncio.run(scenario())
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.exc_info is not None for r in failures] == [True, False, False, True, False]
    assert "a bug (run 7)" in str(failures[3].exc_info)
    assert (
        "failed again (2 in a row): ConnectionError: connection refused (run 2)" in failures[1].getMessage()
    )
    assert "(3 in a row)" in failures[2].getMessage()
