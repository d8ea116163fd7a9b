"""The engine's process and the front end's handle on it, spoken to directly over their pipe (the HTTP
server on top of them is tested in test_serve.py): a real model trained for a few steps, a real spawned
process."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from largo.runtime import checkpoint
from largo.runtime.engine import Engine, Request
from largo.runtime.engine_host import load_model
from largo.runtime.engine_process import EngineClient, NotLoadedError, Output, Submission
from largo.runtime.model import ModelConfig, TinyGPT
from largo.runtime.serve import parse_args, start_engine_process

pytestmark = pytest.mark.runtime

TRAIN_ARGS = ["--batch-size", "8", "--context", "32", "--width", "32", "--steps", "20", "--log-every", "10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoints = tmp_path_factory.mktemp("engine-process") / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGO_CHECKPOINT_DIR": str(checkpoints)}
    command = [sys.executable, "-m", "largo.runtime.train", *TRAIN_ARGS, "--checkpoint-every", "20"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return checkpoints


def engine_args(model_dir: Path, max_batch: int = 2, max_waiting: int = 1) -> list[str]:
    return [
        "--model-dir", str(model_dir), "--device", "cpu", "--threads", "1",
        "--max-batch", str(max_batch), "--max-waiting", str(max_waiting),
    ]  # fmt: skip


def greedy_here(model_dir: Path, prompt: bytes, max_tokens: int) -> bytes:
    """The same request on an engine in this process: what the engine's process must answer."""
    model, _ = load_model(model_dir, None, torch.device("cpu"))
    engine = Engine.local(model, max_batch=1)
    tokens: list[int] = []
    done = asyncio.Event()
    loop = asyncio.new_event_loop()
    request = Request(prompt=list(prompt), max_tokens=max_tokens, temperature=0.0)
    request.on_token = tokens.append
    request.on_finish = lambda reason: loop.call_soon_threadsafe(done.set)
    engine.start()
    try:
        assert engine.submit(request)
        loop.run_until_complete(asyncio.wait_for(done.wait(), 60))
    finally:
        engine.stop()
        loop.close()
    return bytes(tokens)


def submission(
    client: EngineClient, prompt: bytes, max_tokens: int, stream: bool = False, stops: tuple[bytes, ...] = ()
) -> Submission:
    """A greedy request."""
    return Submission(client.next_id(), prompt, max_tokens, 0.0, 1.0, None, stops, stream)


@contextlib.asynccontextmanager
async def loaded_engine(
    model_dir: Path, max_batch: int = 2, max_waiting: int = 1
) -> AsyncIterator[EngineClient]:
    """An engine's process with its model loaded, stopped afterwards."""
    client = start_engine_process(parse_args(engine_args(model_dir, max_batch, max_waiting)))
    try:
        await client.loaded()
        yield client
    finally:
        await client.stop()


async def collect(outputs: asyncio.Queue[Output]) -> list[Output]:
    """A request's outputs up to and including its finish."""
    seen = [await asyncio.wait_for(outputs.get(), 60)]
    while seen[-1].finish is None:
        seen.append(await asyncio.wait_for(outputs.get(), 60))
    return seen


def test_requests_go_to_the_engine_s_process_and_their_tokens_come_back(trained: Path) -> None:
    expected = greedy_here(trained, b"def ", 12)

    async def scenario() -> None:
        client = start_engine_process(parse_args(engine_args(trained)))
        try:
            loaded = await client.loaded()
            assert loaded.context == 32
            assert loaded.load_seconds > 0
            whole: asyncio.Queue[Output] = asyncio.Queue()
            streamed: asyncio.Queue[Output] = asyncio.Queue()
            stopped: asyncio.Queue[Output] = asyncio.Queue()
            assert client.submit(submission(client, b"def ", 12), whole.put_nowait)
            assert client.submit(submission(client, b"def ", 12, stream=True), streamed.put_nowait)
            stop = expected[3:5]
            assert client.submit(submission(client, b"def ", 12, stops=(stop,)), stopped.put_nowait)
            # The running batch (2) and the queue (1) are full: the front end refuses the next itself.
            assert client.outstanding == 3
            assert not client.submit(submission(client, b"x", 2), asyncio.Queue().put_nowait)

            [answer] = await collect(whole)  # a whole answer comes once, with its finish
            assert (answer.text, answer.finish, answer.generated) == (expected, "length", 12)
            assert answer.first_token_at is not None
            chunks = await collect(streamed)
            assert len(chunks) > 1  # a stream comes as it is generated
            assert b"".join(chunk.text for chunk in chunks) == expected
            assert [chunk.generated for chunk in chunks] == sorted(chunk.generated for chunk in chunks)
            [ended] = await collect(stopped)
            assert ended.finish == "stop"
            assert ended.text == expected[: expected.index(stop) + len(stop)]
            assert client.outstanding == 0
            assert client.failure is None
        finally:
            await client.stop()
        assert client.process.exitcode == 0

    asyncio.run(scenario())


def test_an_unknown_device_is_told_to_the_front_end(trained: Path) -> None:
    async def scenario() -> None:
        client = start_engine_process(parse_args([*engine_args(trained), "--device", "tpu"]))
        try:
            with pytest.raises(NotLoadedError, match="tpu") as raised:
                await client.loaded()
            # Not fatal: the front end stays up, unready, saying why; a restart would not mend a spec error.
            assert not raised.value.fatal
        finally:
            await client.stop()

    asyncio.run(scenario())


def test_a_cancelled_request_leaves_the_batch(trained: Path) -> None:
    async def scenario() -> None:
        async with loaded_engine(trained, max_batch=1, max_waiting=1) as client:
            leaving: asyncio.Queue[Output] = asyncio.Queue()
            request = submission(client, b"a", 30, stream=True)
            assert client.submit(request, leaving.put_nowait)
            first = await asyncio.wait_for(leaving.get(), 60)
            client.cancel(request.id)  # the HTTP client went away
            rest = await collect(leaving)
            assert rest[-1].finish == "cancelled"
            assert rest[-1].generated < 30
            # Its slot is free: the only one, so the next request runs to its end.
            after: asyncio.Queue[Output] = asyncio.Queue()
            assert client.submit(submission(client, b"b", 5), after.put_nowait)
            [done] = await collect(after)
            assert (done.finish, done.generated) == ("length", 5)
            assert first.generated >= 1

    asyncio.run(scenario())


def test_a_request_the_engine_cannot_take_fails_alone(trained: Path) -> None:
    """What the front end let through and torch refuses (a seed past its range) ends that request with
    an error; the engine goes on serving the others."""

    async def scenario() -> None:
        async with loaded_engine(trained) as client:
            refused: asyncio.Queue[Output] = asyncio.Queue()
            unseedable = Submission(client.next_id(), b"a", 4, 1.0, 1.0, 1 << 64, (), False)
            assert client.submit(unseedable, refused.put_nowait)
            [ended] = await collect(refused)
            assert (ended.finish, ended.generated) == ("error", 0)
            after: asyncio.Queue[Output] = asyncio.Queue()
            assert client.submit(submission(client, b"b", 5), after.put_nowait)
            [done] = await collect(after)
            assert (done.finish, done.generated) == ("length", 5)
            assert client.failure is None

    asyncio.run(scenario())


def test_a_request_cancelled_while_it_waits_never_runs(trained: Path) -> None:
    async def scenario() -> None:
        async with loaded_engine(trained, max_batch=1, max_waiting=1) as client:
            running: asyncio.Queue[Output] = asyncio.Queue()
            waiting: asyncio.Queue[Output] = asyncio.Queue()
            assert client.submit(submission(client, b"a", 30, stream=True), running.put_nowait)
            await asyncio.wait_for(running.get(), 60)  # it holds the only slot for 29 more steps
            queued = submission(client, b"b", 20)
            assert client.submit(queued, waiting.put_nowait)
            client.cancel(queued.id)  # its client went away before a slot was free
            [dropped] = await collect(waiting)
            assert (dropped.finish, dropped.generated, dropped.text) == ("cancelled", 0, b"")
            assert (await collect(running))[-1].generated == 30

    asyncio.run(scenario())


def test_an_engine_process_that_dies_fails_every_open_request(trained: Path) -> None:
    async def scenario() -> None:
        async with loaded_engine(trained, max_batch=1, max_waiting=2) as client:
            queues: list[asyncio.Queue[Output]] = [asyncio.Queue() for _ in range(3)]
            for queue in queues:
                assert client.submit(submission(client, b"x", 30, stream=True), queue.put_nowait)
            await asyncio.wait_for(queues[0].get(), 60)  # running
            assert client.process.pid is not None
            os.kill(client.process.pid, signal.SIGKILL)
            for queue in queues:
                outputs = await collect(queue)
                assert outputs[-1].finish == "error"
            assert client.failure is not None
            assert "exited" in client.failure
            assert str(-signal.SIGKILL) in client.failure
            assert not client.submit(submission(client, b"x", 2), asyncio.Queue().put_nowait)

    asyncio.run(scenario())


def test_a_missing_model_is_told_not_fatal_and_the_process_ends(tmp_path: Path) -> None:
    async def scenario() -> None:
        client = start_engine_process(parse_args(engine_args(tmp_path)))
        try:
            with pytest.raises(NotLoadedError, match="no complete checkpoint") as raised:
                await client.loaded()
            assert not raised.value.fatal  # the server stays up, unready, saying why
        finally:
            await client.stop()
        assert client.process.exitcode == 0

    asyncio.run(scenario())


def test_a_model_its_storage_fails_to_give_is_told_fatal_so_the_pod_restarts(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlike a missing or damaged model, a network filesystem's moment may be mended by a restart:
    a server left unready for it would never be. The engine's side, run here in-process."""
    import errno
    import multiprocessing

    from largo.runtime import engine_host
    from largo.runtime.engine_process import NotLoaded, Starting

    def storage_failed(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(checkpoint.torch, "load", storage_failed)
    monkeypatch.setattr(engine_host, "ignore_signals", lambda: None)  # this is pytest's own process
    front, engine_side = multiprocessing.Pipe()
    engine_host.engine_main(engine_side, parse_args(engine_args(trained)))
    starting = front.recv()  # what it did meanwhile, for /readyz
    assert isinstance(starting, Starting)
    assert starting.doing.startswith("loading the model from ")
    told = front.recv()
    assert isinstance(told, NotLoaded)
    assert told.fatal
    assert "could not be read from its storage" in told.problem


def test_the_engine_s_process_ignores_the_signals_the_front_end_drains_on(trained: Path) -> None:
    async def scenario() -> None:
        async with loaded_engine(trained) as client:
            queue: asyncio.Queue[Output] = asyncio.Queue()
            assert client.submit(submission(client, b"x", 20, stream=True), queue.put_nowait)
            assert client.process.pid is not None
            for signum in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C reaches the whole process group
                os.kill(client.process.pid, signum)
            outputs = await collect(queue)
            assert (outputs[-1].finish, outputs[-1].generated) == ("length", 20)
        assert client.process.exitcode == 0

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_an_engine_that_takes_its_own_input_blocks_only_while_idle(trained: Path) -> None:
    """The engine's process reads its pipe on the engine's thread, between iterations (``take_input``):
    it may wait for input only while nothing runs or waits, and a stop said there ends the run."""
    model, _ = load_model(trained, None, torch.device("cpu"))
    engine = Engine.local(model, max_batch=2)
    engine.heartbeat_seconds = 0.05
    finished: list[str] = []
    timeouts: list[float] = []
    requests = [Request(prompt=list(b"def "), max_tokens=3, temperature=0.0) for _ in range(2)]
    for request in requests:
        request.on_finish = finished.append

    def take_input(timeout: float) -> None:
        timeouts.append(timeout)
        if len(timeouts) == 1:
            for request in requests:
                assert engine.submit(request)
        elif len(finished) == 2 and timeout > 0:
            engine.stop()  # as the front end's stop message does

    engine.take_input = take_input
    engine.run()  # returns once stopped: a hang here is the failure (the timeout)
    assert finished == ["length", "length"]
    # Idle at the start (what it took runs at once) and at the end; never blocking before the two
    # requests' second and third iterations.
    assert timeouts == [0.05, 0.0, 0.0, 0.05]


RELEASED_BYTES = r"""
import gc, json, weakref
import torch
from largo.runtime.engine import Stage
from largo.runtime.engine_process import freeze_heap
from largo.runtime.model import ModelConfig, TinyGPT

def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

# As loading a checkpoint does: a large block freed, after which glibc serves blocks up to its size from
# the heap, which keeps what is freed there.
loaded = torch.empty(16 << 20, dtype=torch.uint8)
del loaded
torch.manual_seed(0)
model = TinyGPT(ModelConfig(width=512, depth=4, heads=8, context=64)).eval()
stage = Stage(model, range(4), max_batch=4, threads=1)
weights = [weakref.ref(p) for layer in stage.layers for p in model.blocks[layer].parameters() if p.dim() == 2]
sizes = [r().nbytes for r in weights]
freeze_heap()
gc.unfreeze()
before = resident()
stage.release_blocks()
freeze_heap()
freed = sum(size for weight, size in zip(weights, sizes) if weight() is None)
print(json.dumps({"freed": freed, "fell": before - resident()}))
"""


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="a C library without malloc_trim (not glibc)"
)
def test_the_weights_a_server_s_stage_replaced_leave_its_memory() -> None:
    """In a process of its own, as the engine's: what ``release_blocks`` drops is handed back to the
    system by ``freeze_heap``, not kept resident by the C heap."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RELEASED_BYTES], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    assert measured["freed"] >= 3 * 512 * 512 * 4 * 4  # at least q, k and v of every block
    assert measured["fell"] >= measured["freed"] // 2


LOAD_PEAK = """
import json, sys
from pathlib import Path
import torch
from largo.runtime import checkpoint
from largo.runtime.engine_host import load_model

def resident(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) * 1024

Path("/proc/self/clear_refs").write_text("5")  # the peak so far (importing torch's) is forgotten
before = resident("VmRSS:")
if sys.argv[2] == "server":
    load_model(Path(sys.argv[1]), None, torch.device("cpu"))
elif sys.argv[2] == "member":  # the second of two pipeline stages
    load_model(Path(sys.argv[1]), None, torch.device("cpu"), stages=2, stage=1)
else:  # the whole file, as the trainer resumes from it
    state = checkpoint.read(checkpoint.checkpoint_path(Path(sys.argv[1]), 3), 3)
print(json.dumps({"grew": resident("VmHWM:") - before}))
"""


def test_a_server_reads_a_checkpoint_s_weights_not_the_optimizer_s_state(tmp_path: Path) -> None:
    """The trainer's checkpoints hold the optimizer's state (Adam's two moments: twice the weights); a
    server loading one never holds it: its peak memory grows by the weights, not by the file."""
    torch.manual_seed(0)
    config = ModelConfig(width=64, depth=2, context=64)
    moments = 64 * 2**20  # bytes
    optimizer = {"state": {0: {"exp_avg": torch.ones(moments // 8), "exp_avg_sq": torch.ones(moments // 8)}}}
    weights, shape = TinyGPT(config).state_dict(), dataclasses.asdict(config)
    checkpoint.save(tmp_path, 3, {"model": weights, "optimizer": optimizer, "config": shape})

    def peak_growth(reader: str) -> int:
        command = [sys.executable, "-c", LOAD_PEAK, str(tmp_path), reader]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return int(json.loads(done.stdout)["grew"])

    assert peak_growth("whole") >= moments  # what reading all of it costs: the measure can tell
    assert peak_growth("server") < moments // 4


def test_a_pipeline_member_builds_and_reads_only_its_stage(tmp_path: Path) -> None:
    """A member of a replica split over two pods builds its stage alone and reads only its weights from
    the file: its memory grows by half the model's weights twice (built, and read), not by all of them."""
    torch.manual_seed(0)
    config = ModelConfig(width=512, depth=4, heads=8, context=64)
    weights = TinyGPT(config).state_dict()
    size = sum(t.nbytes for t in weights.values())
    checkpoint.save(tmp_path, 3, {"model": weights, "config": dataclasses.asdict(config)})
    command = [sys.executable, "-c", LOAD_PEAK, str(tmp_path), "member"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert int(json.loads(done.stdout)["grew"]) < size * 3 // 2  # the whole model built: 2x
