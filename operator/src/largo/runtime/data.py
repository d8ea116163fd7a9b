"""Training text: files that ship with the repository or already lie on the machine; nothing downloaded.

Batches are a pure function of (seed, step, rank): a run resumed at step s sees exactly the batches an
uninterrupted run would have seen, so the data position is the step itself.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
# Bytes of text read by default: every rank holds them (the reference model learns from far less).
DEFAULT_LIMIT = 2_000_000


def default_corpus() -> list[Path]:
    """Python's own standard library sources: present wherever the runtime runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def text_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and the text files under the directories named; ValueError for a path that
    does not exist (a mistyped one would otherwise train on the others without a word)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path} is neither a file nor a directory")
    return files


def load_bytes(paths: Iterable[Path], limit: int = DEFAULT_LIMIT, say_cut: bool = True) -> torch.Tensor:
    """The files' bytes, concatenated in order, as a uint8 tensor of at most ``limit`` tokens; a cut is
    logged (``say_cut``), with how much of the text it left out."""
    paths = list(paths)
    files = text_files(paths)
    chunks: list[bytes] = []
    total = 0
    for index, path in enumerate(files):
        # Only what is kept is read: a corpus of tens of GB in one file held it all in every rank's
        # memory before the cut.
        with path.open("rb") as handle:
            chunk = handle.read(limit - total)
            size = os.fstat(handle.fileno()).st_size
        chunks.append(chunk)
        total += len(chunk)
        if total >= limit:
            left = max(size - len(chunk), 0) + sum(p.stat().st_size for p in files[index + 1 :])
            if left and say_cut:
                logger.warning(
                    "training on the first %d bytes of the text (--data-bytes): %d bytes left out, "
                    "starting in %s",
                    limit,
                    left,
                    path if len(chunk) < size else files[index + 1],
                )
            break
    if total < 2:
        raise ValueError(f"no training text found in {[str(p) for p in paths]}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def batch(
    corpus: torch.Tensor, context: int, size: int, seed: int, step: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` windows of ``context`` tokens and their next tokens, chosen by (seed, step, rank)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank)
    starts = torch.randint(0, len(corpus) - context - 1, (size,), generator=generator)
    offsets = torch.arange(context)
    windows = corpus[starts[:, None] + offsets].long()
    targets = corpus[starts[:, None] + offsets + 1].long()
    return windows, targets


def replica_batch(
    corpus: torch.Tensor, context: int, size: int, seed: int, step: int, shards: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches of ``shards`` (a model replica's ranks, largo.runtime.parallel) as one batch."""
    batches = [batch(corpus, context, size, seed, step, shard) for shard in shards]
    return torch.cat([inputs for inputs, _ in batches]), torch.cat([targets for _, targets in batches])
