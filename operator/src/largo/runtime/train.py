"""The reference trainer: ``torchrun -m largo.runtime.train`` under a TrainJob.

Reads the TrainJob contract (torchrun's RANK/WORLD_SIZE/LOCAL_RANK per process; LARGO_BACKEND,
LARGO_CHECKPOINT_DIR and LARGO_JOB_* from the pod), trains a small decoder-only transformer on text
files with DDP (or FSDP), or model-parallel with tensor and pipeline parallelism composed with FSDP on
one device mesh (``largo.runtime.parallel``), checkpoints atomically every N steps and on SIGTERM,
resumes from the newest complete checkpoint whatever layout wrote it, serves Prometheus metrics on the
rank that knows the loss and reports progress into the job's progress ConfigMap.

Every step's batch is a function of (seed, step, rank) and the checkpoint carries model, optimizer and
RNG state, so a resumed run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largo.runtime import checkpoint, data, metrics, parallel
from largo.runtime.cpus import torch_threads
from largo.runtime.model import ModelConfig, TinyGPT
from largo.runtime.progress import ProgressReporter, progress_fields
from largo.runtime.teardown import exit_without_finalizers

logger = logging.getLogger("largo.runtime.train")

EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell would report it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="largo.runtime.train", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per process and step")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--data", type=Path, action="append", default=None, help="text file or directory (repeatable)"
    )
    parser.add_argument(
        "--data-bytes",
        type=int,
        default=data.DEFAULT_LIMIT,
        help="bytes of the text read, in file order (each rank holds them in memory; a cut is logged)",
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="default: $LARGO_CHECKPOINT_DIR")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept (newest; at least 1)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of replicating (DDP)")
    parser.add_argument(
        "--tp",
        type=int,
        default=int(os.environ.get("LARGO_TENSOR_PARALLEL") or 1),
        help="tensor-parallel ranks per model replica (default: $LARGO_TENSOR_PARALLEL or 1)",
    )
    parser.add_argument(
        "--pp",
        type=int,
        default=int(os.environ.get("LARGO_PIPELINE_PARALLEL") or 1),
        help="pipeline stages per model replica (default: $LARGO_PIPELINE_PARALLEL or 1); with --tp > 1 "
        "or --pp > 1 the data-parallel dimension is always sharded with FSDP",
    )
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: $LARGO_BACKEND")
    parser.add_argument("--metrics-port", type=int, default=None, help="rank 0 serves /metrics here")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    parser.add_argument("--report-every-seconds", type=float, default=10.0)
    parser.add_argument(
        "--stop-check-every",
        type=int,
        default=10,
        help="steps between the ranks' agreement on a pending SIGTERM (one tiny all-reduce)",
    )
    parser.add_argument(
        "--communication-sample-every",
        type=int,
        default=100,
        help="steps between profiled steps that time each kind of communication (gloo, without DDP, "
        "on the reporting rank; 0: never)",
    )
    return parser.parse_args(argv)


class Termination:
    """Remembers a SIGTERM; the loop checkpoints and leaves at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _state(
    model: nn.Module, optimizer: torch.optim.Optimizer, layout: parallel.Layout, mesh: Any, rank: int
) -> dict[str, Any] | None:
    """The whole model's checkpoint state on rank 0 (None elsewhere), whatever the layout: parameters
    gathered across the data and tensor dimensions, the pipeline stages' parts merged. Collective: every
    rank takes part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if layout.pipeline == 1:
        # Gathered one tensor at a time and moved off the device: only rank 0 keeps them.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    else:
        # cpu_offload keeps the gathered tensors on global rank 0 only, and each stage's first rank
        # needs its stage's: gather them here, the same way, from the sharded state.
        _, replica, shard = layout.coordinates(rank)
        keeper = not (replica or shard)
        model_state, optimizer_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=False)
        )
        part = _whole_on_cpu((model_state, optimizer_state), keep=keeper)
        if not keeper:
            return None
        parts: list[Any] | None = [None] * layout.pipeline if rank == 0 else None
        dist.gather_object(part, parts, dst=0, group=mesh["pipeline"].get_group())
        if parts is None:
            return None
        model_state, optimizer_state = parallel.merge_states(parts)
    if rank != 0:
        return None
    # The model's shape, so that a server loads the checkpoint without being told it.
    config = getattr(_unwrap(model), "config", None)
    shape = (
        dataclasses.asdict(config)
        if dataclasses.is_dataclass(config) and not isinstance(config, type)
        else None
    )
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": torch.get_rng_state(),
        "config": shape,
        "writer": _this_job(),
    }


def _whole_on_cpu(state: Any, keep: bool) -> Any:
    """``state`` with each sharded tensor made whole and copied to the CPU, one tensor at a time, so
    that the device never holds more than one whole tensor (a stage that only fits sharded would not fit
    gathered at once). Collective over each tensor's mesh: every rank of the stage calls it, in the same
    order (the state's, the same on each); ranks that do not ``keep`` get None for every tensor."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only

    def whole(tensor: torch.Tensor) -> torch.Tensor | None:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        return full.detach().cpu() if keep else None

    return tree_map_only(torch.Tensor, whole, state)


def _this_job() -> str | None:
    """The TrainJob this process runs for (``namespace/name``, from the pod's contract), if any."""
    name, namespace = os.environ.get("LARGO_JOB_NAME"), os.environ.get("LARGO_JOB_NAMESPACE")
    return f"{namespace}/{name}" if name and namespace else None


def shape_mismatch(state: dict[str, Any], config: ModelConfig) -> str | None:
    """How the model of checkpoint ``state`` (``checkpoint.model_shape``) differs from ``config``, or
    None. A checkpoint of another shape is never resumed from: a shallower model took the first blocks'
    weights without a word, a narrower one failed each attempt on a size mismatch. One written before
    checkpoints recorded their model is compared on what its tensors say (not the heads)."""
    try:
        saved = checkpoint.model_shape(state)
    except (KeyError, ValueError) as error:
        return f"not the reference model ({error!r})"
    wanted = [(key, value) for key, value in dataclasses.asdict(config).items() if key in saved]
    differing = [f"{key} {saved[key]} (now {value})" for key, value in wanted if saved[key] != value]
    return ", ".join(differing) or None


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads a whole-model checkpoint into this rank's part of the model, whatever layout wrote it:
    each stage takes its parameters' entries, FSDP and tensor parallelism shard them on the way in."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optimizer_state = parallel.select_state(
        state["model"], state["optimizer"], _unwrap(model).state_dict().keys()
    )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state or {},
        options=StateDictOptions(full_state_dict=True),
    )
    torch.set_rng_state(state["rng"])


def _keep_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float | None:
    """Sets ``lr`` (the arguments') on every parameter group after a restore, which brings back the
    checkpoint's own: an edit of a job's ``--lr`` reaches its next attempt (there is no schedule that
    would own it). Returns the checkpoint's learning rate when it differed, else None."""
    restored = [float(group["lr"]) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = lr
    differing = [value for value in restored if value != lr]
    return differing[0] if differing else None


def bad_arguments(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot train, if they cannot (pure)."""
    positive = (
        "steps",
        "batch_size",
        "context",
        "width",
        "depth",
        "heads",
        "checkpoint_every",
        "keep",
        "log_every",
        "stop_check_every",
    )
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}"
    if args.width % args.heads:
        return f"--heads {args.heads} must divide --width {args.width}"
    if args.data_bytes < 2:
        return f"--data-bytes must be at least 2, not {args.data_bytes}"
    if args.communication_sample_every < 0:
        return f"--communication-sample-every must be at least 0, not {args.communication_sample_every}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    default_backend = "nccl" if torch.cuda.is_available() else "gloo"
    backend = args.backend or os.environ.get("LARGO_BACKEND") or default_backend
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "OMP_NUM_THREADS" not in os.environ:  # torch reads it itself
        # torch's default is every core the process may run on: in a pod with a CPU quota, the node's.
        torch.set_num_threads(torch_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    distributed = world > 1
    config = ModelConfig(context=args.context, width=args.width, depth=args.depth, heads=args.heads)
    # What no restart can mend exits 2 (the reference's "bad arguments", for failurePolicy's
    # permanentExitCodes), before the process group: a crash would exit 1 and be retried.
    wrong = bad_arguments(args)
    if wrong is not None:
        logger.error("bad arguments: %s", wrong)
        return 2
    try:
        # The default corpus (the standard library's sources) is cut without a word: it is a sample.
        corpus = data.load_bytes(args.data or data.default_corpus(), args.data_bytes, say_cut=bool(args.data))
    except ValueError as error:
        logger.error("bad --data: %s", error)
        return 2
    needs = args.context + 2  # a window and the token after its last
    if len(corpus) < needs:
        logger.error("bad --data: %d bytes of text, fewer than the %d a window needs", len(corpus), needs)
        return 2
    try:
        layout = parallel.Layout(world, args.tp, args.pp)
        layout.check_model(config)
        microbatches = layout.microbatches(args.batch_size * args.tp * args.pp)
    except parallel.LayoutError as error:
        logger.error("layout refused: %s", error)
        return 2
    if distributed:
        dist.init_process_group(backend)
        logger.info(
            "process group up: %s, rank %d of %d on host %s; layout pipeline %d x data %d x tensor %d",
            backend,
            rank,
            world,
            socket.gethostname(),
            layout.pipeline,
            layout.data,
            layout.tensor,
        )

    # The same seed on every rank: identical initial weights, as DDP expects and as the tensor and
    # pipeline splits of one whole model need.
    torch.manual_seed(args.seed)
    model: nn.Module = TinyGPT(config).to(device)
    reporting = rank == layout.reporter
    recorder = metrics.TrainMetrics() if reporting else None

    mesh: Any = None
    schedule: Any = None
    stage, _, _ = layout.coordinates(rank)
    if layout.model_parallel:
        model, mesh = parallel.build(model, layout, rank, device)  # type: ignore[arg-type]
        schedule = parallel.pipeline_schedule(model, layout, rank, device, mesh, microbatches)
    elif distributed and args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in _unwrap(model).blocks:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
    elif distributed:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    # What this rank's replica group reduces: its own stage's parameters, whole (a pipeline stage holds
    # only its blocks; FSDP's shards are counted whole, as the gathers move them).
    parameter_bytes = sum(p.numel() * p.element_size() for p in _unwrap(model).parameters())
    # The ranks whose losses make the step's: the reporting rank's data-parallel group (under DDP or
    # FSDP every rank; with model parallelism the replicas of its stage and shard).
    loss_group = _loss_group(layout, mesh) if distributed else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    shards = layout.data_shards(rank)
    if recorder is not None:
        recorder.communication(
            layout.communication_bytes(config, args.batch_size * len(shards), parameter_bytes, args.fsdp)
        )

    directory = args.checkpoint_dir or (
        Path(os.environ["LARGO_CHECKPOINT_DIR"]) if os.environ.get("LARGO_CHECKPOINT_DIR") else None
    )
    start = 0
    resumed: tuple[int, float] | None = None  # the checkpoint resumed from: (step, when written)
    if directory is not None:
        try:
            state = _load_agreed(directory, distributed, rank, device)
        except (checkpoint.CheckpointError, checkpoint.CheckpointStorageError) as error:
            logger.error("%s; the gang restarts", error)
            return 1
        if state is not None:
            mismatch = shape_mismatch(state, config)
            if mismatch is not None:
                logger.error(
                    "the checkpoint of step %d in %s is of another model: %s; start the job with the "
                    "model it was trained with, or with another checkpoint directory",
                    state["step"],
                    directory,
                    mismatch,
                )
                return 2
            _restore(model, optimizer, state)
            start = int(state["step"])
            logger.info("resumed from checkpoint of step %d in %s", start, directory)
            if start >= args.steps:
                logger.info("step %d is at or past --steps %d: nothing left to train", start, args.steps)
            try:
                resumed = (start, checkpoint.checkpoint_path(directory, start).stat().st_mtime)
            except OSError:  # pruned since, or unreadable here: when it was read is close enough
                resumed = (start, time.time())
            restored_lr = _keep_learning_rate(optimizer, args.lr)
            if restored_lr is not None and rank == 0:
                logger.info(
                    "learning rate %g from the arguments replaces the checkpoint's %g", args.lr, restored_lr
                )
            written_by = state.get("writer")
            if rank == 0 and isinstance(written_by, str) and written_by != _this_job():
                # A new job on a finished one's directory continues its training: say so, once.
                logger.warning("the checkpoint of step %d was written by TrainJob %s", start, written_by)
    # The port the pod declares (LARGO_METRICS_PORT, named `metrics`) unless the command line says: served
    # by the reporting rank, on whichever pod it runs.
    port = args.metrics_port or int(os.environ.get("LARGO_METRICS_PORT") or 0) or None
    if recorder is not None and port is not None:
        metrics.serve(port)
    reporter = ProgressReporter(args.report_every_seconds) if reporting else None
    termination = Termination()
    tokens_per_step = args.batch_size * args.context * world
    started, started_step = time.perf_counter(), start

    code = 0
    step = start
    last_progress: tuple[int, int, float | None, float, float] | None = None  # the latest report's figures
    # The newest complete checkpoint: (step, when). The one resumed from until this run writes one, so
    # that a restarted run's reports still say how much work a failure would lose.
    saved: tuple[int, float] | None = resumed
    # The step's loss over the whole global batch, as of the last log line.
    step_loss: float | None = None
    writer = checkpoint.BackgroundWriter(directory, args.keep) if directory is not None else None
    # DDP times its own all-reduce; every other distributed layout is timed from gloo's own records.
    sampling = (
        recorder is not None
        and distributed
        and backend == "gloo"
        and not isinstance(model, DistributedDataParallel)
        and args.communication_sample_every > 0
    )
    for step in range(start + 1, args.steps + 1):
        step_started = time.perf_counter()
        inputs, targets = data.replica_batch(corpus, args.context, args.batch_size, args.seed, step, shards)
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        times = _GlooTimes() if sampling and step % args.communication_sample_every == 0 else None
        with times or contextlib.nullcontext():
            loss = _forward_backward(model, schedule, inputs, targets, stage, layout.pipeline)
            optimizer.step()
        sampled = (
            parallel.communication_seconds(times.events, tensor_parallel=layout.tensor > 1)
            if times is not None
            else None
        )
        stop = termination.requested
        written = (writer.written if writer is not None else None) or saved
        if not distributed:
            saved = written
        elif step % args.stop_check_every == 0:
            # Every rank must leave at the same step boundary, with the same checkpoint. Agreeing
            # costs a collective, so ranks agree every few steps rather than every step; the same
            # collective tells the reporting rank which checkpoint rank 0 has on disk.
            stop, saved = _agree(stop, written, device)
        else:
            stop = False
        if writer is not None and (step % args.checkpoint_every == 0 or step == args.steps or stop):
            _checkpoint(writer, step, model, optimizer, layout, mesh, rank)
        logged = step % args.log_every == 0 or step == args.steps or stop  # alike on every rank
        if logged and loss is not None:
            # Each replica's loss is of its own part of the batch: the step's is their mean, taken on the
            # log steps only (a collective on every step would cost the step time). Every rank of the
            # group computes a loss, so every one joins.
            step_loss = _mean_loss(loss, loss_group)
        if recorder is not None:
            elapsed = time.perf_counter() - started
            rate = (step - started_step) / elapsed if elapsed > 0 else 0.0
            assert loss is not None  # the reporting rank holds the last stage
            value = step_loss
            recorder.step(step, value, time.perf_counter() - step_started, rate * tokens_per_step)
            if sampled is not None:
                recorder.communication_time(sampled, 1 / rate if rate > 0 else 0.0)
            if logged:
                if isinstance(model, DistributedDataParallel):
                    recorder.collectives(model, 1 / rate if rate > 0 else 0.0)
                shown = value if value is not None and math.isfinite(value) else None  # NaN is no JSON
                print(json.dumps({"step": step, "loss": shown, "tokens_per_second": rate * tokens_per_step}))
                sys.stdout.flush()
            if reporter is not None:
                last_progress = (step, args.steps, value, rate * tokens_per_step, rate)
                reporter.report(progress_fields(*last_progress, time.time(), saved))
        if stop:
            if writer is not None:
                writer.wait()
                logger.info("SIGTERM: checkpoint of step %d written, leaving", step)
            else:
                logger.info("SIGTERM at step %d: no checkpoint directory, leaving without a checkpoint", step)
            code = EXIT_TERMINATED
            break
    if writer is not None:
        writer.close()
        # The last checkpoint (the final step's, or the one written on SIGTERM) is what a model server
        # following this job loads: the last report must name it.
        written = writer.written or saved
        saved = _agree(False, written, device)[1] if distributed else written
    if reporter is not None:
        if last_progress is not None:
            reporter.report(progress_fields(*last_progress, time.time(), saved))
        elif resumed is not None:
            # Resumed with nothing left to train (a new job on a finished one's directory): its
            # checkpoint is what a model server following this job loads, so the report names it.
            reporter.report(progress_fields(start, args.steps, None, 0.0, 0.0, time.time(), resumed))
        reporter.close()
    if distributed:
        # Gloo aborts the process ("terminate called without an active exception") when a process
        # group is torn down while its worker threads still hold work: let every rank finish, and drop
        # DDP's reducer (which owns such work) before the group goes.
        dist.barrier()
        del model, optimizer, schedule, mesh
        # FSDP and DTensor state sits in reference cycles: collect it while its groups still exist.
        gc.collect()
        dist.destroy_process_group()
    return code


def _loss_group(layout: parallel.Layout, mesh: Any) -> tuple[Any, int] | None:
    """The process group (None: the default one) over which the step's loss is averaged, and its size;
    None without data parallelism (the reporting rank's loss is the whole batch's)."""
    if layout.data == 1:
        return None
    return (mesh["data"].get_group() if layout.model_parallel else None), layout.data


def _mean_loss(loss: torch.Tensor, group: tuple[Any, int] | None) -> float:
    """The mean of ``loss`` over ``group``'s ranks (a collective: every rank of it calls this)."""
    if group is None:
        return float(loss.item())
    process_group, size = group
    total = loss.detach().clone()
    dist.all_reduce(total, group=process_group)  # gloo has no average: a sum, divided here
    return float(total.item()) / size


def _forward_backward(
    model: nn.Module, schedule: Any, inputs: torch.Tensor, targets: torch.Tensor, stage: int, stages: int
) -> torch.Tensor | None:
    """One step's forward and backward; the mean loss where this rank computes it (the last stage)."""
    if schedule is None:
        loss = model(inputs, targets)
        loss.backward()
        return loss  # type: ignore[no-any-return]
    losses: list[torch.Tensor] = []
    last = stage == stages - 1
    if stage == 0:
        schedule.step(inputs, losses=losses)
    else:
        schedule.step(target=targets if last else None, losses=losses)
    return torch.stack(losses).mean() if last else None


class _GlooTimes:
    """Profiles what runs inside it (CPU activity only) and keeps gloo's records of the operations it
    ran: ``events``, as (name, seconds). One profiled step costs about a third more than a plain one;
    reading the raw records costs a few milliseconds (torch's FunctionEvent tables cost ~100 ms)."""

    def __init__(self) -> None:
        # Kineto prints two stage lines on stderr at every start and stop otherwise.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.events: list[tuple[str, float]] = []

    def __enter__(self) -> _GlooTimes:
        self._profile.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.stop()
        results = self._profile.profiler.kineto_results if self._profile.profiler is not None else None
        if results is not None:
            self.events = [
                (event.name(), event.duration_ns() / 1e9)
                for event in results.events()
                if event.name().startswith("gloo:")
            ]


def _load_agreed(
    directory: Path, distributed: bool, rank: int, device: torch.device
) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from: the newest rank 0 reads back whole, told to the others.
    Each rank choosing its own would, after a read error on one (a network filesystem's moment), go on
    with two steps' weights mixed across the ranks and no error; a rank that cannot read rank 0's
    choice raises CheckpointError on every rank instead, so that the gang restarts."""
    if not distributed:
        return checkpoint.load_latest(directory)
    # Every rank reaches both collectives below whatever fails on it, or the others would wait in them
    # until the group's timeout.
    state: dict[str, Any] | None = None
    failure = None
    if rank == 0:
        try:
            state = checkpoint.load_latest(directory)
        except Exception as error:  # the directory cannot be listed (a stale handle, a permission)
            failure = f"rank 0 cannot look for a checkpoint in {directory}: {error!r}"
    chosen = -2 if failure else int(state["step"]) if state is not None else -1
    told = torch.tensor([chosen], dtype=torch.int64, device=device)
    dist.broadcast(told, src=0)
    step = int(told.item())
    if rank != 0 and step >= 0:
        try:
            state = checkpoint.read(checkpoint.checkpoint_path(directory, step), step)
        except Exception as error:  # CheckpointError, or what reading a network filesystem raises
            failure = f"rank {rank} cannot read the checkpoint of step {step}, rank 0's choice: {error}"
    read = torch.tensor([0 if failure or step == -2 else 1], dtype=torch.int64, device=device)
    dist.all_reduce(read, op=dist.ReduceOp.MIN)
    if failure is not None:
        raise checkpoint.CheckpointError(failure)
    if step == -2:
        raise checkpoint.CheckpointError(f"rank 0 cannot look for a checkpoint in {directory}")
    if read.item() == 0:
        raise checkpoint.CheckpointError(f"another rank cannot read the checkpoint of step {step}")
    return state


def _agree(
    stop: bool, written: tuple[int, float] | None, device: torch.device
) -> tuple[bool, tuple[int, float] | None]:
    """On every rank: whether any rank was asked to stop, and the newest checkpoint any rank knows is
    on disk (only rank 0 writes; the others learn it here)."""
    step, when = written if written is not None else (-1, 0.0)
    values = torch.tensor([1.0 if stop else 0.0, step, when], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    any_stop, newest, newest_at = values.tolist()
    return any_stop > 0, (int(newest), newest_at) if newest >= 0 else None


def _checkpoint(
    writer: checkpoint.BackgroundWriter,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: parallel.Layout,
    mesh: Any,
    rank: int,
) -> None:
    """Gathers the state (collective: every rank takes part) and hands rank 0's copy to the writer, so
    that no rank waits for the disk: training goes on while the file is written."""
    from torch.utils._pytree import tree_map_only

    state = _state(model, optimizer, layout, mesh, rank)
    if state is not None:
        # A snapshot: the gathered tensors may share storage with the live parameters and optimizer
        # state, which the next steps update in place while the writer pickles.
        writer.submit(step, tree_map_only(torch.Tensor, lambda tensor: tensor.detach().clone(), state))


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_finalizers(exit_code)
    sys.exit(exit_code)
