"""Training text: files that ship with the repository or already lie on the machine; nothing downloaded.

Batches are a pure function of (seed, step, rank): a run resumed at step s sees exactly the batches an
uninterrupted run would have seen, so the data position is the step itself.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
_DEFAULT_LIMIT = 2_000_000


def default_corpus() -> list[Path]:
    """Python's own standard library sources: present wherever the runtime runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def text_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
    return files


def load_bytes(paths: Iterable[Path], limit: int = _DEFAULT_LIMIT) -> torch.Tensor:
    """The files' bytes, concatenated in order, as a uint8 tensor of at most ``limit`` tokens."""
    chunks: list[bytes] = []
    total = 0
    for path in text_files(paths):
        chunk = path.read_bytes()[: limit - total]
        chunks.append(chunk)
        total += len(chunk)
        if total >= limit:
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
