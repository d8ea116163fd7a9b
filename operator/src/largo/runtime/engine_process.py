"""The engine on a process of its own: the messages between it and the front end, and the front end's
handle on it. Free of torch, as the front end is (the engine's end is ``largo.runtime.engine_host``).

On one process the HTTP side (aiohttp's event loop) and the engine's iterations take turns on the
interpreter's lock: at 32 requests in flight the engine's thread waited for the HTTP side about 40% of
its time, and a request's latency grew by that. So the server runs its engine in a child process, as
vLLM's API server runs its engine core: the two share nothing but a pipe, on which small pickled
messages go each way: a submission or a cancellation to the engine; from it, at most one message per
iteration with every request's new text and finishes (a whole answer's text comes once, with its finish).

The front end admits at most ``limit`` requests at a time (the running batch plus the waiting queue) and
refuses the next with a 429: it counts what it submitted and has not heard finish, so the bound holds
without asking the engine.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

logger = logging.getLogger(__name__)

# How long a stopping engine may take to end its iteration (a pipeline's members are told too).
STOP_SECONDS = 10.0
# With requests in it, an engine that has told nothing for this long is stalled (a pipeline member hung
# in a step: the leader's own wait lasts the pipeline timeout, 10 minutes): the server turns unready,
# then, after the longer bound, not alive, so that its group is restarted. An iteration takes
# milliseconds, and the engine tells its progress at least every PROGRESS_SECONDS while requests run.
STALLED_UNREADY_SECONDS = 30.0
STALLED_DEAD_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What the engine holds: requests running and waiting, and its KV cache's use."""

    running: int
    waiting: int
    cached_tokens: int
    cache_capacity: int


@dataclass(frozen=True, slots=True)
class Submission:
    id: int
    prompt: bytes
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[bytes, ...]
    stream: bool


@dataclass(frozen=True, slots=True)
class Cancel:
    id: int


@dataclass(frozen=True, slots=True)
class Output:
    """A request's text since the last output (a whole answer's: all of it, with its finish); its finish
    reason when it ended (the engine's: ``stop``, ``length``, ``cancelled`` or ``error``)."""

    id: int
    text: bytes
    finish: str | None
    generated: int
    first_token_at: float | None  # time.monotonic() of the engine process: the same clock as ours


@dataclass(frozen=True, slots=True)
class Progress:
    outputs: list[Output]
    batch_sizes: list[int]
    stats: EngineStats
    # Why the engine failed, with the outputs of the requests it ended: their handlers tell it (``Failed``,
    # which ends the rest, comes after, and a handler woken first told "unknown").
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class Starting:
    """What the engine is doing before it serves (loading, waiting for its pipeline's members): what
    ``/readyz`` says meanwhile."""

    doing: str


@dataclass(frozen=True, slots=True)
class Loaded:
    context: int
    load_seconds: float


@dataclass(frozen=True, slots=True)
class NotLoaded:
    """The engine could not start: the model is not there (``fatal`` False: the server stays up and
    unready until the spec changes) or the pipeline could not form (True: the pod fails, its group is
    restarted)."""

    problem: str
    fatal: bool


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


def freeze_heap() -> None:
    """Moves what starting left (in the engine's process torch's modules and the model: ~200,000
    objects) out of the garbage collector's sight: a full collection over them took 40-76 ms on a 2-core
    CPU, and it stalls every request in flight. What serving allocates afterwards is still collected.
    Then hands the C heap's free pages back to the system (``trim_c_heap``)."""
    gc.collect()
    gc.freeze()
    trim_c_heap()


def trim_c_heap() -> bool:
    """Returns the C heap's free pages to the system (glibc's ``malloc_trim``), True if it gave any back.
    Loading frees the checkpoint's tensors and the model's own copies of the weights a stage packed,
    which the heap otherwise keeps resident for the process's life: width 512, depth 8 on a CPU, 268
    MiB resident after loading, 172 after this. Not glibc (musl has no ``malloc_trim``): nothing to do."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(trim(0))


def ignore_signals() -> None:
    """The front end drains on SIGTERM and then stops the engine; a signal sent to the whole process
    group (Ctrl-C) must not stop the engine under requests still in flight."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


class EngineClient:
    """The server's handle on the engine process. ``submit`` and ``cancel`` from the event loop; the
    engine's outputs are handed to each request's ``deliver`` on the event loop."""

    def __init__(self, process: BaseProcess, connection: Connection, limit: int) -> None:
        self.process = process
        self.connection = connection
        self.limit = limit
        self.context = 0
        self.failure: str | None = None
        # Why the engine failed, as its last outputs said (``failure`` waits for ``Failed``).
        self.failure_reason: str | None = None
        self.stats = EngineStats(0, 0, 0, 1)
        self.observe_batch: Callable[[int], None] = lambda size: None
        self.on_starting: Callable[[str], None] = lambda doing: None
        self._ids = itertools.count()
        self._open: dict[int, Callable[[Output], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded: asyncio.Future[Loaded] | None = None
        # When the engine last told its progress, or requests last came to an idle engine.
        self.progressed_at = time.monotonic()

    async def loaded(self) -> Loaded:
        """Waits until the engine has its model (raises ``NotLoadedError`` when it cannot)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loaded = loop.create_future()
        loop.add_reader(self.connection.fileno(), self._readable)
        return await self._loaded

    @property
    def outstanding(self) -> int:
        return len(self._open)

    def submit(self, submission: Submission, deliver: Callable[[Output], None]) -> bool:
        """Sends ``submission``; False when ``limit`` requests are already in the engine (answer 429)."""
        if self.failure is not None or len(self._open) >= self.limit:
            return False
        if not self._open:  # idle until now: its silence so far was no stall
            self.progressed_at = time.monotonic()
        self._open[submission.id] = deliver
        self._send(submission)
        return True

    def next_id(self) -> int:
        return next(self._ids)

    def cancel(self, key: int) -> None:
        if key in self._open:
            self._send(Cancel(key))

    async def stop(self) -> None:
        """Tells the engine to stop after its iteration, waits for its process, and closes the pipe.
        What it ended unfinished (the drain's leftovers) is read and delivered before: their clients get
        an answer (503), not a cut connection."""
        self._send(None)
        await asyncio.to_thread(self._join, STOP_SECONDS)
        if self._loop is not None:
            self._readable()  # what came since the loop last read, up to the pipe's end
        self._stop_reading()
        if self._open:  # an engine that ended without a word for them (killed at the timeout)
            self._fail("the engine stopped")
        self.connection.close()

    def _join(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def _send(self, message: object) -> None:
        try:
            self.connection.send(message)
        except OSError:
            self._lost()

    def _readable(self) -> None:
        try:
            while self.connection.poll():
                self._handle(self.connection.recv())
        except (EOFError, OSError):
            self._lost()

    def stalled_for(self, now: float) -> float:
        """Seconds the engine has told nothing while requests are in it (0 when idle or moving)."""
        return now - self.progressed_at if self._open else 0.0

    def _handle(self, message: Any) -> None:
        if isinstance(message, Progress):
            self.progressed_at = time.monotonic()
            self.stats = message.stats
            if message.failure is not None:
                # Told ahead of ``Failed``: ``failure`` itself is set by it, or by the pipe's loss.
                self.failure_reason = message.failure
            for size in message.batch_sizes:
                self.observe_batch(size)
            for output in message.outputs:
                deliver = self._open.get(output.id)
                if deliver is None:
                    continue
                if output.finish is not None:
                    del self._open[output.id]
                deliver(output)
        elif isinstance(message, Starting):
            self.on_starting(message.doing)
        elif isinstance(message, Loaded):
            self.context = message.context
            self._settle(lambda future: future.set_result(message))
        elif isinstance(message, NotLoaded):
            self.failure = message.problem
            self._settle(lambda future: future.set_exception(NotLoadedError(message.problem, message.fatal)))
            self._stop_reading()
        elif isinstance(message, Failed):
            self._fail(message.reason)

    def _lost(self) -> None:
        """The pipe closed: the engine process is gone (killed, for one)."""
        self._stop_reading()
        if self.failure is None:
            self.process.join(1.0)  # it closed its end as it exited: its code is known at once
            self._fail(f"the engine process exited (code {self.process.exitcode})")

    def _fail(self, reason: str) -> None:
        """Ends every open request with ``error``."""
        self.failure = reason
        self._settle(lambda future: future.set_exception(NotLoadedError(reason, True)))
        stats = self.stats
        for key, deliver in list(self._open.items()):
            deliver(Output(key, b"", "error", 0, None))
        self._open.clear()
        self.stats = EngineStats(0, 0, 0, stats.cache_capacity)

    def _settle(self, outcome: Callable[[asyncio.Future[Loaded]], None]) -> None:
        if self._loaded is not None and not self._loaded.done():
            outcome(self._loaded)

    def _stop_reading(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.connection.fileno())
            self._loop = None


class NotLoadedError(Exception):
    def __init__(self, problem: str, fatal: bool) -> None:
        super().__init__(problem)
        self.fatal = fatal
