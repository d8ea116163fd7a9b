"""Checkpoints written atomically (write aside, fsync, rename) and read back newest-complete-first.

A crash or a SIGKILL mid-write leaves at most a ``.partial`` file, never a truncated checkpoint under a
final name; a checkpoint whose contents cannot be read (truncated, a flipped bit, a copy gone wrong) is
skipped with a log line, and the one before it is used. A checkpoint the storage fails to give (an
I/O error, a network filesystem's timeout, a permission) is not skipped: nothing is known of it, and
resuming from an older one, or from nothing, would silently undo training. A checkpoint is a zip archive
(torch.save's format) whose records carry a CRC-32 that torch.load does not check: ``read`` checks
them first, so a flipped byte in the weights is refused rather than trained on or served.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
import uuid
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

FORMAT = "largo.checkpoint/v2"
# v1: one fused qkv projection per block; optimizer state keyed by parameter position (DDP runs).
FORMAT_V1 = "largo.checkpoint/v1"
# At least nine digits: ``checkpoint_path`` pads to nine, and a step of 10^9 or more takes more.
_NAME = re.compile(r"^step-(\d{9,})\.pt$")
PARTIAL_SUFFIX = ".partial"


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}.pt"


def save(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Writes ``state`` as the checkpoint of ``step``; readers never see a half-written file."""
    created = not directory.is_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if created:  # the directory's own entry must survive a crash, as the file's rename below
        _fsync_directory(directory.parent)
    final = checkpoint_path(directory, step)
    # A name of its own: two processes saving one step (a user's script run on every rank) never write
    # into each other's file, and each renames a whole one.
    partial = final.with_name(f"{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        with partial.open("xb") as out:
            torch.save({**state, "format": FORMAT, "step": step}, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        # A full disk's half-written file would keep the space the restarted attempt's write needs.
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, final)
    _fsync_directory(directory)  # the rename itself must survive a crash too
    return final


# What a filesystem that cannot sync a directory says (some FUSE and network filesystems, where a rename
# is durable once it returns): the checkpoint was already renamed whole, and failing the save then failed
# every save and the job (PostgreSQL ignores EBADF and EINVAL there too).
_DIRECTORY_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in _DIRECTORY_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(descriptor)


class BackgroundWriter:
    """Writes checkpoints on a thread of their own, so that training goes on while one is pickled,
    fsynced and renamed. At most one write is in flight (a second waits for the first: memory stays
    bounded to one snapshot); a failed write is raised by the next ``submit`` or by ``close``.

    The state handed over must be a snapshot the training loop no longer mutates.
    """

    def __init__(self, directory: Path, keep: int):
        self.directory = directory
        self.keep = keep
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future[None] | None = None
        self._written: tuple[int, float] | None = None

    @property
    def written(self) -> tuple[int, float] | None:
        """The newest checkpoint on disk from this writer: (step, when it became durable)."""
        return self._written

    def submit(self, step: int, state: dict[str, Any]) -> None:
        self.wait()
        self._pending = self._executor.submit(self._write, step, state)

    def wait(self) -> None:
        """Returns when no write is in flight; raises the error of a write that failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def _write(self, step: int, state: dict[str, Any]) -> None:
        save(self.directory, step, state)
        self._written = (step, time.time())
        try:
            prune(self.directory, self.keep, written=step)
        except OSError as error:
            # The checkpoint is durable: an old one left behind must not fail the run.
            logger.warning(
                "checkpoint of step %d written, but pruning %s failed: %s", step, self.directory, error
            )


def complete(directory: Path) -> list[tuple[int, Path]]:
    """Checkpoints under their final name, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


# Listings taken again when a checkpoint vanishes between listing and reading (pruned by the trainer
# as it wrote a newer one) before giving up.
RELISTS = 3


def load_latest(directory: Path, mapped: bool = False) -> dict[str, Any] | None:
    """The newest checkpoint that reads back whole, or None when there is none (``newest``). ``mapped``:
    as ``read``."""
    return newest(directory, lambda step, path: read(path, step, mapped))


def newest(directory: Path, take: Callable[[int, Path], T]) -> T | None:
    """``take(step, path)`` of the newest checkpoint it takes, or None when there is none; one it refuses
    as damaged (CheckpointError) is skipped and logged. One pruned while this ran makes it list again: a
    newer one was written meanwhile, and the older ones may be pruned too. Raises
    CheckpointStorageError when the storage fails, and CheckpointError when checkpoints keep vanishing."""
    for _ in range(RELISTS):
        try:
            found = complete(directory)
        except OSError as error:  # the directory cannot be listed: a stale handle, an I/O error
            raise _unreadable(directory, error) from error
        for step, path in found:
            try:
                return take(step, path)
            except CheckpointGoneError:
                break
            except CheckpointError as error:  # damaged: try the previous one
                logger.warning("skipping checkpoint %s: %s", path, error)
        else:
            return None
    raise CheckpointError(f"checkpoints in {directory} were removed as they were read, {RELISTS} times")


class CheckpointError(Exception):
    """The file is not a readable largo checkpoint of the step its name says."""


class CheckpointGoneError(CheckpointError):
    """The file was removed after it was listed (pruned as a newer one was written)."""


class CheckpointStorageError(Exception):
    """The storage failed to give the file's bytes (an I/O error, a network filesystem's timeout or
    stale handle, a permission): nothing is known of the checkpoint itself, so it must not be skipped
    for an older one. Not a CheckpointError on purpose."""


# What the storage, not the file's contents, answers: a damaged archive raises other errors.
_STORAGE_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.ENOTCONN,
        errno.ECONNRESET,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EACCES,
        errno.EPERM,
        errno.EAGAIN,
        errno.EINTR,
        errno.ENXIO,
    }
)


def storage_failed(error: BaseException) -> bool:
    """Whether ``error`` is the storage's failure rather than anything about a file's contents."""
    return isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: Python's MemoryError, or torch's, which its allocator and
    its mapping of a file raise as RuntimeError (under a hard memory cap, an address-space limit)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "Cannot allocate memory" in text or f"({errno.ENOMEM})" in text
    )


def _too_big(path: Path, error: BaseException) -> MemoryError:
    if isinstance(error, MemoryError):
        return error
    return MemoryError(f"checkpoint {path} does not fit in memory: {error}")


def _unreadable(path: Path, error: BaseException) -> Exception:
    """What a failed read of ``path`` means: gone, the storage's failure, or a damaged file."""
    if isinstance(error, FileNotFoundError) and not path.is_symlink():
        return CheckpointGoneError(f"removed before it could be read: {error}")
    if storage_failed(error):
        return CheckpointStorageError(f"checkpoint {path} could not be read from its storage: {error!r}")
    return CheckpointError(f"cannot be read: {error}")


def damaged_record(path: Path) -> str | None:
    """The first record of the archive at ``path`` whose bytes do not match their CRC-32, or None.
    Raises (zipfile.BadZipFile, OSError, and others for damaged headers) for what is not a whole zip."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def check_whole(path: Path) -> Path:
    """``path``, once every record of its archive matched its checksum; CheckpointError (or its
    storage's failure) otherwise."""
    try:
        damaged = damaged_record(path)
    except Exception as error:  # a damaged archive's headers raise many kinds, as torch.load does
        if out_of_memory(error):  # not the file's fault, and an older checkpoint is no smaller
            raise _too_big(path, error) from error
        raise _unreadable(path, error) from error
    if damaged is not None:
        raise CheckpointError(f"damaged: record {damaged} does not match its checksum")
    return path


def read(path: Path, step: int, mapped: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path``, in the current format whatever format it was written in.

    ``mapped``: its tensors are backed by the file, mapped, and read from it as they are used, not all
    read at once: a server, which takes only the model's weights, never holds the optimizer's state (the
    trainer's Adam moments, twice the weights). Only for a state dropped soon after: a tensor left
    mapped reads a file that a checkpoint's retention, on another node of a network filesystem, may
    delete under it."""
    check_whole(path)
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as error:  # torch.load raises many kinds for a damaged file
        if out_of_memory(error):  # not the file's fault: an older one, loaded instead, would be wrong
            raise _too_big(path, error) from error
        raise _unreadable(path, error) from error
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(f"not a largo checkpoint of step {step}")
    if state.get("format") == FORMAT_V1:
        try:
            return upgrade_v1(state)
        except (KeyError, TypeError, ValueError) as error:  # a v1 file without a v1 checkpoint's entries
            raise CheckpointError(f"not a readable {FORMAT_V1} checkpoint: {error!r}") from error
    if state.get("format") != FORMAT:
        raise CheckpointError(f"format {state.get('format')!r}, expected {FORMAT} or {FORMAT_V1}")
    return state


def model_shape(state: dict[str, Any]) -> dict[str, Any]:
    """The reference model's shape a checkpoint is of: the ``config`` the trainer records, else (written
    before it did) what its tensors say: vocabulary, context, width and depth, not the heads. Raises
    KeyError or ValueError for weights that are not the reference model's."""
    recorded = state.get("config")
    if isinstance(recorded, dict):
        return dict(recorded)
    weights = state["model"]
    try:
        vocab, width = weights["tokens.weight"].shape
        context = weights["positions.weight"].shape[0]
    except (AttributeError, TypeError) as error:  # weights that are no tensors
        raise ValueError(f"not the reference model's weights: {error}") from error
    depth = len({key.split(".")[1] for key in weights if key.startswith("blocks.")})
    return {"vocab_size": vocab, "context": context, "width": width, "depth": depth}


_FUSED = re.compile(r"^(blocks\.\d+\.)qkv\.(weight|bias)$")


def upgrade_v1(state: dict[str, Any]) -> dict[str, Any]:
    """A v1 checkpoint as v2: each fused qkv projection split into query, key and value (weights, and
    the optimizer's per-parameter tensors alike), optimizer state keyed by parameter name."""
    names = list(state["model"])  # v1 wrote the model's state_dict: parameters in optimizer order
    model: dict[str, Any] = {}
    for name, tensor in state["model"].items():
        model.update(_split_fused(name, tensor))
    optimizer = state.get("optimizer")
    if optimizer is not None:
        # DDP runs keyed state by position, FSDP runs by name already.
        keyed = {
            names[key] if isinstance(key, int) else key: value for key, value in optimizer["state"].items()
        }
        per_name: dict[str, Any] = {}
        for name, entries in keyed.items():
            for index, new_name in enumerate(_split_fused(name, None)):
                per_name[new_name] = {
                    key: (value.chunk(3)[index] if _is_split(name) and value.dim() > 0 else value)
                    for key, value in entries.items()
                }
        groups = [
            {
                **group,
                "params": [
                    new
                    for old in group["params"]
                    for new in _split_fused(names[old] if isinstance(old, int) else old, None)
                ],
            }
            for group in optimizer["param_groups"]
        ]
        optimizer = {"state": per_name, "param_groups": groups}
    return {**state, "model": model, "optimizer": optimizer, "format": FORMAT}


def _is_split(name: str) -> bool:
    return _FUSED.match(name) is not None


def _split_fused(name: str, tensor: torch.Tensor | None) -> dict[str, Any]:
    """``{name: tensor}``, or for a fused qkv parameter its three parts under their v2 names."""
    match = _FUSED.match(name)
    if match is None:
        return {name: tensor}
    parts = tensor.chunk(3) if tensor is not None else (None, None, None)
    return {
        f"{match.group(1)}{kind}.{match.group(2)}": part
        for kind, part in zip(("query", "key", "value"), parts, strict=True)
    }


# A temporary file untouched this long is a leftover of an interrupted write; a younger one may be
# another writer's, in flight (an earlier attempt's rank 0 still running on a lost node, say).
STALE_PARTIAL_SECONDS = 600.0


def prune(directory: Path, keep: int, written: int | None = None) -> list[Path]:
    """Removes all but the newest ``keep`` checkpoints (at least one), and leftovers of interrupted
    writes; never the one of step ``written``, the checkpoint just written: a newer-numbered file (a
    damaged one that resuming skipped, or another run's) would otherwise push it out."""
    removed = [path for step, path in complete(directory)[max(keep, 1) :] if step != written]
    if directory.is_dir():
        now = time.time()
        for path in directory.iterdir():
            if path.name.endswith(PARTIAL_SUFFIX) and _untouched_for(path, now) > STALE_PARTIAL_SECONDS:
                removed.append(path)
    # Each on its own: one that cannot go (a directory of that name, a permission) must not keep every
    # older one on the disk, at every checkpoint; the first failure is raised once the rest are gone.
    failures: list[OSError] = []
    for path in removed:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            failures.append(error)
    if failures:
        raise failures[0]
    return removed


def _untouched_for(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:  # renamed by its writer meanwhile
        return 0.0


def latest_checkpoint(directory: str | os.PathLike[str] | None = None) -> Path | None:
    """For users' own scripts: the newest checkpoint file in ``directory`` or ``$LARGO_CHECKPOINT_DIR``
    whose records match their checksums (a flipped bit, which torch.load reads without a word, or a
    truncated file is skipped and logged, as when largo's trainer resumes)."""
    root = directory or os.environ.get("LARGO_CHECKPOINT_DIR")
    if not root:
        return None
    return newest(Path(root), lambda step, path: check_whole(path))
