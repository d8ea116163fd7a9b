"""The server's torch side: loads the model from the trainer's checkpoints and runs it, as the leader's
engine process (``engine_main``, started by the front end in ``largo.runtime.serve``) or as a pipeline
member's stage (``member``). The front end never imports this module: it stays free of torch (~500 MB
less resident memory, and alive at once while the model loads)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, Gauge

from largo.runtime import checkpoint, pipeline
from largo.runtime.engine import Engine, LocalForward, Request, Stage
from largo.runtime.engine_process import (
    Cancel,
    Failed,
    Loaded,
    NotLoaded,
    Output,
    Progress,
    Starting,
    Submission,
    freeze_heap,
    ignore_signals,
)
from largo.runtime.metrics import serve as serve_metrics
from largo.runtime.model import ModelConfig, TinyGPT, stage_holds, stage_layers
from largo.runtime.pipeline import PipelineForward
from largo.runtime.teardown import exit_without_finalizers

logger = logging.getLogger(__name__)

# A message goes out with each iteration that produced something, and at least this often while requests
# run (the running and waiting gauges and the batch sizes follow the engine within this).
PROGRESS_SECONDS = 0.1


class ModelError(Exception):
    """The checkpoint cannot be served: missing, unreadable, or not the reference model's."""


class StorageError(ModelError):
    """The checkpoint's storage failed to give it (``checkpoint.CheckpointStorageError``): unlike a
    missing or damaged model, a restart may mend it, so the server exits and its pod is restarted."""


def model_config(state: dict[str, Any]) -> ModelConfig:
    """The model's shape: recorded in the checkpoint by the trainer, else read from its tensors, with
    the trainer's default heads (their number is in no tensor's shape: such a checkpoint of a model
    trained with other ``--heads`` must be written again by the trainer, resumed and saved)."""
    try:
        return ModelConfig(**checkpoint.model_shape(state))
    except (KeyError, ValueError) as error:
        raise ModelError(f"not a checkpoint of the reference model: {error}") from error


def load_model(
    directory: Path,
    step: int | None,
    device: torch.device,
    dtype: str = "auto",
    stages: int = 1,
    stage: int = 0,
) -> tuple[TinyGPT, int]:
    """The model of checkpoint ``step`` (the newest complete one when None) in precision ``dtype`` (a
    name of ``DTYPES``; ``auto``: the checkpoint's own), and its step. With ``stages`` > 1, only what
    pipeline stage ``stage`` holds (``stage_holds``) is built, read and put on ``device``: a replica
    split over several pods serves a model that no one of them could hold whole."""
    if step is not None:
        path = checkpoint.checkpoint_path(directory, step)
        if not path.is_file():
            raise ModelError(f"checkpoint of step {step} not found in {directory}")
        try:
            state = checkpoint.read(path, step, mapped=True)  # the weights only are read
        except checkpoint.CheckpointError as error:  # refuse it, never serve garbage
            raise ModelError(f"checkpoint {path}: {error}") from error
    else:
        latest = checkpoint.load_latest(directory, mapped=True)
        if latest is None:
            raise ModelError(f"no complete checkpoint in {directory}")
        state = latest
    config = model_config(state)
    try:  # on the host: a model built on the meta device costs ~150 MiB of torch modules
        model = TinyGPT(config, stages, stage)
    except ValueError as error:  # more pods than blocks: a spec error, told as one
        raise ModelError(f"cannot serve {config} as stage {stage} of {stages}: {error}") from error
    # What the stage holds, read from the (mapped) file; another stage's weights are neither read nor held.
    held = {name: t for name, t in state["model"].items() if stage_holds(name, config.depth, stages, stage)}
    try:
        model.load_state_dict(held)
    except (RuntimeError, KeyError) as error:
        raise ModelError(f"checkpoint does not fit the reference model {config}: {error}") from error
    precision = checkpoint_dtype(state) if dtype == "auto" else getattr(torch, dtype)
    if dtype == "auto" and precision == torch.float16 and device.type == "cpu":
        # Served on a GPU only, as a float16 asked for by name (``resolve``): a CPU has no fast products
        # for it, and a checkpoint in it is served in float32 there.
        logger.info("the checkpoint's float16 weights are served in float32 on a CPU")
        precision = torch.float32
    return model.to(device=device, dtype=precision).eval(), int(state["step"])


# The precisions a model can be served in; ``auto`` is the checkpoint's own (the trainer writes float32).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def checkpoint_dtype(state: dict[str, Any]) -> torch.dtype:
    """The precision of a checkpoint's weights."""
    return next(t.dtype for t in state["model"].values() if torch.is_tensor(t) and t.is_floating_point())


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with what the front end left to the torch side decided: ``auto`` device (cuda when a GPU
    is visible, else cpu) and pipeline backend (nccl on a GPU, gloo on a CPU), and the pipeline's
    timeout. ValueError for a device torch does not know, or a precision it cannot serve there."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: {error}") from error
    backend = args.pipeline_backend
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    if args.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {args.dtype!r}: one of {', '.join(DTYPES)}")
    if args.dtype == "float16" and kind == "cpu":  # no fast half-precision products on a CPU
        raise ValueError("float16 is served on a GPU only: on a CPU use bfloat16 or float32")
    timeout = pipeline.TIMEOUT_SECONDS if args.pipeline_timeout is None else args.pipeline_timeout
    return argparse.Namespace(**{**vars(args), "device": device, "pipeline_backend": backend,
                                 "pipeline_timeout": timeout})  # fmt: skip


def start_engine(
    args: argparse.Namespace,
    unready: Callable[[str], None] = lambda reason: None,
    starting: Callable[[str], None] = lambda doing: None,
) -> Engine:
    """Loads the model and, for a replica of several pods, forms its pipeline (this blocks until every
    member joined) and agrees with the members on the checkpoint (``agree_on_the_checkpoint``). Raises
    ModelError for a model that cannot be served, here or on a member, whatever loading raised (too
    little memory for it is a spec to change too: a restart would meet it again). A leader that cannot
    load its model says why through ``unready`` at once, then joins its group all the same to tell the
    members. ``starting`` is told what it does meanwhile (``/readyz`` says it)."""
    loading = Loading()
    starting(f"loading the model from {args.model_dir}")
    loading.load(args, 0, args.step if args.step >= 0 else None)
    forward: PipelineForward | LocalForward
    if args.members > 1:
        if loading.problem is not None and not loading.unavailable:  # a storage failure: a restart
            unready(loading.problem)
        else:
            # A member that never comes (its pod unschedulable, its image not pulled) holds the replica
            # here for the pipeline timeout: said, rather than "loading" for ten minutes.
            timeout = args.pipeline_timeout  # ``resolve`` set it
            starting(
                f"waiting for the {args.members - 1} other member(s) of the replica to join its pipeline "
                f"at {args.leader_addr}:{args.leader_port} (since {time.strftime('%H:%M:%S')}; the group "
                f"is restarted after {timeout:.0f}s)"
            )
        join_group(args, 0)
        stage, step = agree_on_the_checkpoint(args, 0, loading)
        forward = PipelineForward(stage, args.members, stage.model.config.vocab_size)
    else:
        stage, step = loading.held()
        forward = LocalForward(stage)
    config = stage.model.config
    # The front end keeps the running batch and the queue within their bounds (``EngineClient``).
    engine = Engine(forward, config.context, args.max_batch, args.max_batch + args.max_waiting)
    engine.heartbeat_seconds = pipeline.heartbeat_seconds(args.pipeline_timeout)
    logger.info(
        "serving %s: step %d of %s (%s), %d stage(s) on %s in %s",
        args.name,
        step,
        args.model_dir,
        config,
        args.members,
        stage.device,
        str(stage.dtype).removeprefix("torch."),
    )
    return engine


def load_stage(args: argparse.Namespace, member: int, step: int | None) -> tuple[Stage, int]:
    """Member ``member``'s stage of checkpoint ``step`` (the newest complete one when None) and its step,
    each weight held once (``Stage.release_blocks``). ModelError for a model that cannot be served."""
    device = torch.device(args.device)
    model, loaded = load_model(args.model_dir, step, device, args.dtype, args.members, member)
    stage = Stage(model, stage_layers(model.config.depth, args.members, member), args.max_batch, args.threads)
    stage.release_blocks()
    return stage, loaded


@dataclass
class Loading:
    """What a member of a replica loaded, its stage and the step, or why it could not: what it brings to
    the group's agreement (``agree_on_the_checkpoint``), which may load another step in its place."""

    stage: Stage | None = None
    step: int | None = None
    problem: str | None = None
    unavailable: bool = False  # the problem is the storage's (StorageError)

    def load(self, args: argparse.Namespace, member: int, step: int | None) -> None:
        """``load_stage`` into this, or why it cannot: whatever goes wrong, a member goes on to its
        group's next collective call to say so (an exception past it would leave the others waiting)."""
        self.stage = self.step = self.problem = None  # what it held goes before the next comes
        self.unavailable = False
        try:
            self.stage, self.step = load_stage(args, member, step)
        except checkpoint.CheckpointStorageError as error:
            self.problem, self.unavailable = str(error), True
            logger.error("cannot load the model: %s", error)
        except ModelError as error:
            self.problem = str(error)
            logger.error("cannot load the model: %s", error)
        except Exception as error:  # out of the device's memory, for one
            self.problem = f"{type(error).__name__}: {error}"
            # A directory the storage fails to list or stat (a stale handle) is its failure too.
            self.unavailable = checkpoint.storage_failed(error)
            logger.exception("cannot load the model")

    def held(self) -> tuple[Stage, int]:
        """The stage and its step; ModelError (StorageError) saying why when nothing was loaded."""
        if self.stage is None or self.step is None:
            raise (StorageError if self.unavailable else ModelError)(str(self.problem))
        return self.stage, self.step


def join_group(args: argparse.Namespace, member: int) -> None:
    """Forms the replica's process group as member ``member`` (``pipeline.join``)."""
    pipeline.join(
        args.leader_addr,
        args.leader_port,
        member,
        args.members,
        args.pipeline_timeout,
        args.pipeline_backend,
        torch.device(args.device),
    )


def agree_on_the_checkpoint(args: argparse.Namespace, member: int, loading: Loading) -> tuple[Stage, int]:
    """Run by every member of a replica once its group formed, so that every stage is of one checkpoint
    and no member waits on a pipeline that cannot run: the leader tells every member the step it
    loaded (or why it could not), a member that loaded another step (a newer checkpoint written while
    they loaded, for one) loads the leader's in its place, and every member's outcome goes to all of
    them. Every member makes the same two collective calls whatever happens. Returns this member's
    stage and the step; raises ModelError naming each member that cannot serve, on every member alike
    (the leader turns unready saying why, the others idle saying why), having let go of its stage."""
    told: list[Any] = [loading.step, loading.problem] if member == 0 else [None, None]
    dist.broadcast_object_list(told, src=0)
    step, leader_problem = told
    problem = loading.problem
    if member > 0:
        if leader_problem is not None:
            problem = None  # the leader's problem is told once, as the leader's
        elif loading.step != step:
            found = loading.step
            newer = found is not None and step is not None and found > step
            loading.load(args, member, step)
            problem = loading.problem
            if problem is not None and newer:
                # The leader's step was pruned as a newer one came, between its listing and ours: a
                # restart of the group has every member load the newest. Unready, it stayed so for good.
                loading.unavailable = True
                problem += f" (it found step {found}, newer: the group restarts to load the newest)"
    outcomes: list[Any] = [None] * args.members
    dist.all_gather_object(outcomes, (problem, loading.unavailable) if problem is not None else None)
    failures = [f"member {number}: {said[0]}" for number, said in enumerate(outcomes) if said is not None]
    if failures:
        loading.stage = None
        storage = any(said is not None and said[1] for said in outcomes)
        raise (StorageError if storage else ModelError)("; ".join(failures))
    return loading.held()  # no failure: it holds the leader's step


def engine_main(connection: Connection, args: argparse.Namespace) -> None:
    """The engine's process (``engine_process``): loads the model, then serves the front end's requests."""
    ignore_signals()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started = time.monotonic()
    try:
        args = resolve(args)
    except ValueError as error:  # an unknown device or precision: unready saying why, as a missing model
        connection.send(NotLoaded(str(error), fatal=False))  # (a restart would not mend it; a new spec does)
        return
    try:
        set_threads(args)
        engine = start_engine(
            args,
            lambda reason: connection.send(NotLoaded(reason, fatal=False)),
            lambda doing: connection.send(Starting(doing)),
        )
    except StorageError as error:  # a restart may mend it
        connection.send(NotLoaded(str(error), fatal=True))
        return
    except ModelError as error:  # (after an early word from ``unready``, the front end reads no more)
        connection.send(NotLoaded(str(error), fatal=False))
        return
    except Exception as error:  # the pipeline could not form, for one: the group is restarted
        logger.exception("could not start serving")
        connection.send(NotLoaded(f"{type(error).__name__}: {error}", fatal=True))
        return
    freeze_heap()
    run_engine_side(engine, connection, Loaded(engine.context, time.monotonic() - started))


def set_threads(args: argparse.Namespace) -> None:
    """Torch's threads where the model runs (the leader's engine, a pipeline member): more than the
    cores fight the front end (and OpenMP's spinning) for them; a wide model's steps take all of these, a
    narrow one's one (``engine.step_threads``)."""
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)


def member(args: argparse.Namespace) -> int:
    """A worker of a replica split over pods: its stage of the pipeline, no HTTP of its own."""
    try:
        args = resolve(args)
    except ValueError as error:
        return _idle_saying_why(str(error))
    set_threads(args)
    registry = CollectorRegistry()
    load_seconds = Gauge(
        "largo_serve_model_load_seconds", "How long loading the model took.", registry=registry
    )
    if args.metrics_port:
        serve_metrics(args.metrics_port, registry)
    started = time.monotonic()
    loading = Loading()
    loading.load(args, args.member, args.step if args.step >= 0 else None)
    if loading.stage is not None:
        load_seconds.set(time.monotonic() - started)
    join_group(args, args.member)
    # Once in the group, the process leaves without the interpreter's teardown, which gloo's threads
    # can abort (exit -6) when the leader goes first.
    return exit_without_finalizers(_serve_in_group(args, loading))


def _serve_in_group(args: argparse.Namespace, loading: Loading) -> int:
    """A member's life once its group formed; its exit code."""
    try:
        stage, step = agree_on_the_checkpoint(args, args.member, loading)
    except StorageError as error:  # the group is restarted, as the leader's server exits
        logger.error("not serving: %s", error)
        return 1
    except ModelError as error:
        return _idle_saying_why(str(error))
    logger.info("stage %d of %d: blocks %s of step %d", args.member, args.members, list(stage.layers), step)
    freeze_heap()
    # A group's pods are deleted together: its leader drains the requests in flight through every
    # stage, so a member's SIGTERM must not end its stage under them. The leader stops the pipeline
    # when its drain is over (or the kubelet's SIGKILL ends the member at the grace period's end).
    signal.signal(signal.SIGTERM, lambda *_: logger.info("SIGTERM: serving until the leader stops"))
    try:
        pipeline.run_member(stage, args.member, args.members)
    except Exception as error:  # the leader or a neighbour went away: the group is restarted whole
        logger.error("pipeline lost: %s", error)
        return 1
    return 0


def _idle_saying_why(reason: str) -> int:
    """A member that cannot serve (an unknown device or precision, a missing model) stays up, idle, until
    its pod is deleted, as the leader stays unready: exiting would restart the group again and again
    for what only a new spec mends (the leader, seeing the same spec, never forms the pipeline)."""
    logger.error("not serving: %s", reason)
    stopped = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stopped.set())
    while not stopped.wait(1.0):  # a signal another thread takes is seen at the next second
        pass
    return 0


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
        self._tracked: dict[int, _Tracked] = {}
        self._streaming: dict[int, _Tracked] = {}  # streams with text not yet sent
        self._finished: list[Output] = []
        self._batch_sizes: list[int] = []
        self._last_sent = time.monotonic()
        self._failure_sent = False
        engine.after_iteration = self.flush
        engine.observe_batch = self._observe_batch

    def send(self, message: object) -> None:
        self.connection.send(message)

    def take_input(self, timeout: float) -> None:
        """Submissions and cancellations that arrived, waiting up to ``timeout`` for the first (the
        engine's ``take_input``, on its thread); a stop, or the front end gone, stops the engine."""
        try:
            while self.connection.poll(timeout):
                timeout = 0.0
                message = self.connection.recv()
                if isinstance(message, Submission):
                    self.submit(message)
                elif isinstance(message, Cancel):
                    tracked = self._tracked.get(message.id)
                    if tracked is not None:
                        tracked.request.cancelled = True
                else:
                    self.engine.stop()
                    return
        except (EOFError, OSError):  # the front end is gone: nothing more to serve
            self.engine.stop()

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
        try:
            accepted = self.engine.submit(request)
        except (ValueError, RuntimeError) as error:  # what the front end let through: this one fails, not all
            logger.error("request %d refused by the engine: %s", submission.id, error)
            accepted = False
        if not accepted:  # stopping (the front end keeps within the queue's bound)
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
        self._send_quietly(Progress(outputs, sizes, self.engine.stats(), failure))
        if failure is not None and not self._failure_sent:  # after the requests it ended
            self._failure_sent = True
            self._send_quietly(Failed(failure))

    def _send_quietly(self, message: object) -> None:
        # The front end is gone: ``take_input`` sees it and stops the engine.
        with contextlib.suppress(OSError):
            self.send(message)


def run_engine_side(engine: Engine, connection: Connection, loaded: Loaded) -> None:
    """Serves the front end with ``engine`` until it says stop or goes away, all on this thread, the one
    that loaded the model: the engine reads its pipe between iterations (a request is admitted at an
    iteration's start either way), so no second thread takes the interpreter's lock from it at every
    message. And while a second thread that ran torch's parallel operations lives, its OpenMP and MKL
    workers stay, and the engine's own operations ran slower beside them (on 2 cores, a width-512
    product of a batch of 32: 0.48 ms alone, 0.57 to 0.67 ms beside them)."""
    side = EngineSide(engine, connection)
    side.send(loaded)
    engine.take_input = side.take_input
    engine.run()
