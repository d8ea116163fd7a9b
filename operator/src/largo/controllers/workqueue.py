"""A keyed work queue: many wake-ups of one key collapse into one reconcile, a key is never reconciled
by two workers at once, and a key can ask to come back later (back-off, deadlines, TTL).

kopf calls handlers per object and per event; a TrainJob's state depends on its pods and nodes too,
so every such event only enqueues the job's key and one level-triggered reconcile reads everything
fresh. This is the queue semantics of client-go's workqueue, kept to what largo needs, including its
per-key rate limiter: a key whose run failed comes back after ``base_delay * 2**(failures-1)``
seconds (at most ``max_delay``) on its own, never waiting for a watch event that may already have been
folded into the failed run; a successful run forgets the failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)


class Retry(Exception):  # noqa: N818  (a request, not a failure)
    """An expected reason to run the key again later (a conflict, a refused create): logged in one
    line, without a traceback, and retried with the key's back-off, at most ``max_delay`` seconds."""

    max_delay: float | None = None
    # At least this long (an API server's Retry-After when it throttles), whatever the back-off says.
    min_delay: float | None = None


class WorkQueue(Generic[K]):
    def __init__(self, base_delay: float = 0.05, max_delay: float = 60.0) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        # Told of every failed run, with the error's class name (for the operator's metrics).
        self.on_failure: Callable[[str], None] = lambda kind: None
        # Told how long each key waited in the queue before a worker took it.
        self.on_wait: Callable[[float], None] = lambda seconds: None
        self._since: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        # Keys whose unexpected error's traceback was logged in their current streak of failures.
        self._traced: set[K] = set()
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        # Keys woken while being processed: processed once more when the current run ends.
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        # A standby's queue takes nothing: no worker would take it off, and keys of jobs long gone
        # would pile up. The replica that comes to lead enqueues every job it knows anyway.
        self.accepting = True

    def add(self, key: K) -> None:
        if not self.accepting:
            return
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._since[key] = time.monotonic()
        self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Wakes ``key`` after ``delay`` seconds; an earlier pending wake-up of the key wins."""
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        when = loop.time() + max(delay, 0.0)
        if existing is not None and not existing.cancelled() and existing.when() <= when:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def backoff(self, key: K) -> float:
        """Counts a failure of ``key`` and returns how long it waits before its next run."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        # The exponent stops growing once the delay is at its cap: 2 ** 1024 is no float, and a key that
        # failed 1,025 times in a row (a name taken for hours) ended the workers and the operator.
        doublings = min(failures - 1, 64)
        return float(min(self.max_delay, self.base_delay * 2.0**doublings))

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)
        self._traced.discard(key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def __len__(self) -> int:
        return len(self._queued)

    async def run(self, worker: Callable[[K], Awaitable[float | None]], concurrency: int) -> None:
        """Runs workers until cancelled. ``worker`` returns seconds until the key wants another look."""

        async def loop() -> None:
            while True:
                key = await self._queue.get()
                self._queued.discard(key)
                self._active.add(key)
                self.on_wait(time.monotonic() - self._since.pop(key, time.monotonic()))
                failed = False
                try:
                    again = await worker(key)
                    self.forget(key)
                except asyncio.CancelledError:
                    raise
                except Retry as reason:
                    again, failed = self.backoff(key), True
                    if reason.max_delay is not None:
                        again = min(again, reason.max_delay)
                    if reason.min_delay is not None:
                        again = max(again, reason.min_delay)
                    self.on_failure(type(reason).__name__)
                    logger.info("%s: %s; again in %.2fs", key, reason, again)
                except Exception as error:
                    again, failed = self.backoff(key), True
                    self.on_failure(type(error).__name__)
                    in_a_row = self._failures[key]
                    if key not in self._traced:
                        self._traced.add(key)
                        logger.exception("reconcile of %s failed; again in %.2fs", key, again)
                    else:
                        # The traceback once per streak: an API server down for minutes would
                        # otherwise print one per key and retry, thousands of them, hiding the cause.
                        logger.error(
                            "reconcile of %s failed again (%d in a row): %s: %s; again in %.2fs",
                            key,
                            in_a_row,
                            type(error).__name__,
                            error,
                            again,
                        )
                finally:
                    self._active.discard(key)
                if key in self._dirty and not failed:
                    self._dirty.discard(key)
                    self.add(key)
                elif again is not None:
                    # A wake-up during a failed run does not cut its back-off short (a new event
                    # after it does, as in client-go).
                    self._dirty.discard(key)
                    self.add_after(key, again)

        tasks = [asyncio.create_task(loop()) for _ in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for timer in self._timers.values():
                timer.cancel()
