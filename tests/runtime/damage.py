"""Damage done to checkpoint files as a disk or a copy may do it, for the tests that they are refused."""

from __future__ import annotations

import zipfile
from pathlib import Path


def flip_a_byte_of_the_weights(path: Path) -> str:
    """Flips one bit in the middle of the largest tensor record of the checkpoint at ``path`` (the file
    stays a whole, loadable archive); returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
    record = max(tensors, key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    at = record.header_offset
    # A record's bytes follow its local header: 30 bytes, then its name and its extra field.
    name_length = int.from_bytes(data[at + 26 : at + 28], "little")
    extra_length = int.from_bytes(data[at + 28 : at + 30], "little")
    data[at + 30 + name_length + extra_length + record.file_size // 2] ^= 0x10
    path.write_bytes(data)
    return record.filename


def mark_a_record_with_an_unknown_compression(path: Path) -> None:
    """Sets the compression method of the archive's first record, in its central directory entry, to
    one no reader knows (a damaged header: the archive still opens, reading the record fails)."""
    with zipfile.ZipFile(path) as archive:
        directory = archive.start_dir
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02", directory)
    data[entry + 10 : entry + 12] = (99).to_bytes(2, "little")
    path.write_bytes(data)
