"""The engine on a process of its own, and the server's handle on it.

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
import contextlib
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from largo.runtime.engine import Engine, EngineStats, Request

logger = logging.getLogger(__name__)

# A message goes out with each iteration that produced something, and at least this often while requests
# run (the running and waiting gauges and the batch sizes follow the engine within this).
PROGRESS_SECONDS = 0.1
# How long a stopping engine may take to end its iteration (a pipeline's members are told too).
STOP_SECONDS = 10.0


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


def ignore_signals() -> None:
    """The front end drains on SIGTERM and then stops the engine; a signal sent to the whole process
    group (Ctrl-C) must not stop the engine under requests still in flight."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


@dataclass
class _Tracked:
    request: Request
    stream: bool
    text: bytearray = field(default_factory=bytearray)
    sent: int = 0
    first_token_at: float | None = None


class EngineSide:
    """The engine process's end of the pipe: turns submissions into the engine's requests, and the
    engine's callbacks (its thread) into one ``Progress`` message per iteration."""

    def __init__(self, engine: Engine, connection: Connection) -> None:
        self.engine = engine
        self.connection = connection
        self._sending = threading.Lock()
        self._tracked: dict[int, _Tracked] = {}
        self._streaming: dict[int, _Tracked] = {}  # streams with text not yet sent
        self._finished: list[Output] = []
        self._batch_sizes: list[int] = []
        self._last_sent = time.monotonic()
        self._failure_sent = False
        engine.after_iteration = self.flush
        engine.observe_batch = self._observe_batch

    def send(self, message: object) -> None:
        with self._sending:
            self.connection.send(message)

    def receive(self) -> None:
        """Takes submissions and cancellations until the front end says stop or goes away."""
        while True:
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                return  # the front end is gone: nothing more to serve
            if isinstance(message, Submission):
                self.submit(message)
            elif isinstance(message, Cancel):
                tracked = self._tracked.get(message.id)
                if tracked is not None:
                    tracked.request.cancelled = True
            else:
                return

    def submit(self, submission: Submission) -> None:
        request = Request(
            prompt=list(submission.prompt),
            max_tokens=submission.max_tokens,
            temperature=submission.temperature,
            top_p=submission.top_p,
            seed=submission.seed,
        )
        tracked = _Tracked(request, submission.stream)
        stops = submission.stops
        text = tracked.text

        def on_token(token: int) -> None:
            text.append(token)
            if tracked.first_token_at is None:
                tracked.first_token_at = time.monotonic()
            if tracked.stream:
                self._streaming[submission.id] = tracked

        def on_finish(reason: str) -> None:
            self._tracked.pop(submission.id, None)
            self._streaming.pop(submission.id, None)
            start = tracked.sent if tracked.stream else 0
            self._finished.append(
                Output(submission.id, bytes(text[start:]), reason, request.generated, tracked.first_token_at)
            )

        request.on_token = on_token
        request.on_finish = on_finish
        request.should_stop = lambda: any(text.endswith(stop) for stop in stops)
        self._tracked[submission.id] = tracked
        if not self.engine.submit(request):  # stopping (the front end keeps within the queue's bound)
            self._tracked.pop(submission.id, None)
            refused = Output(submission.id, b"", "error", 0, None)
            self._send_quietly(Progress([refused], [], self.engine.stats()))

    def _observe_batch(self, size: int) -> None:
        self._batch_sizes.append(size)

    def flush(self) -> None:
        """After each iteration (the engine's thread): what it produced, in one message."""
        outputs = self._finished
        self._finished = []
        for key, tracked in self._streaming.items():  # filled on this thread too (``on_token``)
            outputs.append(
                Output(key, bytes(tracked.text[tracked.sent :]), None, tracked.request.generated, None)
            )
            tracked.sent = len(tracked.text)
        self._streaming.clear()
        now = time.monotonic()
        failure = self.engine.failure
        if not outputs and now - self._last_sent < PROGRESS_SECONDS and failure is None:
            return
        self._last_sent = now
        sizes, self._batch_sizes = self._batch_sizes, []
        self._send_quietly(Progress(outputs, sizes, self.engine.stats()))
        if failure is not None and not self._failure_sent:  # after the requests it ended
            self._failure_sent = True
            self._send_quietly(Failed(failure))

    def _send_quietly(self, message: object) -> None:
        with contextlib.suppress(OSError):  # the front end is gone; ``receive`` sees it and ends the process
            self.send(message)


def run_engine_side(engine: Engine, connection: Connection, loaded: Loaded) -> None:
    """Serves the front end with ``engine`` until it says stop or goes away. The engine runs on this
    thread, the one that loaded the model: while a second thread that ran torch's parallel operations
    lives, its OpenMP and MKL workers stay, and the engine's own operations ran slower beside them (on
    2 cores, a width-512 product of a batch of 32: 0.48 ms alone, 0.57 to 0.67 ms beside them). The
    pipe is read on a thread that runs no torch operation."""
    side = EngineSide(engine, connection)
    side.send(loaded)

    def receive() -> None:
        side.receive()
        engine.stop()

    threading.Thread(target=receive, name="largo-engine-pipe", daemon=True).start()
    engine.run()


class EngineClient:
    """The server's handle on the engine process. ``submit`` and ``cancel`` from the event loop; the
    engine's outputs are handed to each request's ``deliver`` on the event loop."""

    def __init__(self, process: BaseProcess, connection: Connection, limit: int) -> None:
        self.process = process
        self.connection = connection
        self.limit = limit
        self.context = 0
        self.failure: str | None = None
        self.stats = EngineStats(0, 0, 0, 1)
        self.observe_batch: Callable[[int], None] = lambda size: None
        self._ids = itertools.count()
        self._open: dict[int, Callable[[Output], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded: asyncio.Future[Loaded] | None = None

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
        self._open[submission.id] = deliver
        self._send(submission)
        return True

    def next_id(self) -> int:
        return next(self._ids)

    def cancel(self, key: int) -> None:
        if key in self._open:
            self._send(Cancel(key))

    async def stop(self) -> None:
        """Tells the engine to stop after its iteration, waits for its process, and closes the pipe."""
        self._stop_reading()
        self._send(None)
        await asyncio.to_thread(self._join, STOP_SECONDS)
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

    def _handle(self, message: Any) -> None:
        if isinstance(message, Progress):
            self.stats = message.stats
            for size in message.batch_sizes:
                self.observe_batch(size)
            for output in message.outputs:
                deliver = self._open.get(output.id)
                if deliver is None:
                    continue
                if output.finish is not None:
                    del self._open[output.id]
                deliver(output)
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
