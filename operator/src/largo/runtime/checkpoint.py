"""Checkpoints written atomically (write aside, fsync, rename) and read back newest-complete-first.

A crash or a SIGKILL mid-write leaves at most a ``.partial`` file, never a truncated checkpoint under a
final name; a checkpoint that cannot be read anyway (a damaged disk, a copy gone wrong) is skipped with
a log line, and the one before it is used.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT = "largo.checkpoint/v1"
_NAME = re.compile(r"^step-(\d{9})\.pt$")
PARTIAL_SUFFIX = ".partial"


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}.pt"


def save(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Writes ``state`` as the checkpoint of ``step``; readers never see a half-written file."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    with partial.open("wb") as out:
        torch.save({**state, "format": FORMAT, "step": step}, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, final)
    # The rename itself must survive a crash too.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return final


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


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest checkpoint that reads back whole, or None; unreadable ones are skipped and logged."""
    for step, path in complete(directory):
        try:
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any reason a file cannot be read means: try the previous one
            logger.warning("skipping unreadable checkpoint %s: %s", path, error)
            continue
        if state.get("format") != FORMAT or state.get("step") != step:
            logger.warning("skipping checkpoint %s: not a %s checkpoint of step %d", path, FORMAT, step)
            continue
        return state
    return None


def prune(directory: Path, keep: int) -> list[Path]:
    """Removes all but the newest ``keep`` checkpoints, and leftovers of interrupted writes."""
    removed = [path for _, path in complete(directory)[keep:]]
    if directory.is_dir():
        removed += [path for path in directory.iterdir() if path.name.endswith(PARTIAL_SUFFIX)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def latest_checkpoint(directory: str | os.PathLike[str] | None = None) -> Path | None:
    """For users' own scripts: the newest checkpoint file in ``directory`` or ``$LARGO_CHECKPOINT_DIR``."""
    root = directory or os.environ.get("LARGO_CHECKPOINT_DIR")
    if not root:
        return None
    found = complete(Path(root))
    return found[0][1] if found else None
