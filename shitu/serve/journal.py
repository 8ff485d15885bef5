"""An append-only write-ahead journal: one checksummed JSON record per line, fsynced before it counts.

A record is ``<json>\\t<crc32 of the json, 8 hex digits>\\n``. :meth:`Journal.append` returns only once the
record is on disk (``os.fsync``), so a write acknowledged after it survives a crash. A crash while appending
can leave a torn last line: :func:`read_records` stops at the first line that is incomplete or fails its
checksum (what follows it was never acknowledged either), and :meth:`Journal.open` cuts the file back to the
good records before appending again, so a new record never follows a torn one.

Why a journal and not an atomic save of the whole index per write: a save rewrites every vector (megabytes
for a gallery of some thousand items), a journal record holds only the vectors of the write. The journal is
folded into an atomic index save (:meth:`Journal.reset` after :meth:`RetrievalIndex.save`) now and then.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shitu.errors import ShituError


def _encode(record: dict[str, Any]) -> bytes:
    body = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
    return f"{body}\t{zlib.crc32(body.encode('ascii')):08x}\n".encode("ascii")


def _decode(line: bytes) -> dict[str, Any] | None:
    """The record of one complete line (without its newline), or None when it is torn or damaged."""
    body, tab, checksum = line.rpartition(b"\t")
    if not tab or len(checksum) != 8:
        return None
    try:
        if int(checksum, 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The good records of the journal at ``path`` in order, and the length in bytes they take (a missing
    file has none). Reading stops at the first torn or damaged line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise ShituError(f"cannot read the journal: {exc.strerror or exc}", path=path) from None
    records: list[dict[str, Any]] = []
    good = 0
    for line in _lines(data):
        if not line.endswith(b"\n"):
            break
        record = _decode(line[:-1])
        if record is None:
            break
        records.append(record)
        good += len(line)
    return records, good


def _lines(data: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        yield data[start:end]
        start = end


class Journal:
    """The journal file of one gallery; not thread-safe (its owner serialises writes)."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self._handle = handle
        self.records = 0

    @classmethod
    def open(cls, path: Path) -> tuple[Journal, list[dict[str, Any]]]:
        """Open (or create) the journal at ``path`` for appending; returns it and the records it holds.
        A torn tail is cut off first."""
        records, good = read_records(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "ab")  # noqa: SIM115 - held open for the life of the gallery
        if handle.tell() != good:
            handle.truncate(good)
            handle.seek(good)
            os.fsync(handle.fileno())
        from shitu.fileio import fsync_directory

        fsync_directory(path.parent)
        journal = cls(path, handle)
        journal.records = len(records)
        return journal, records

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` and return once it is on disk."""
        self._handle.write(_encode(record))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records += 1

    def reset(self) -> None:
        """Empty the journal (after its records were saved in the index), durably."""
        self._handle.truncate(0)
        self._handle.seek(0)
        os.fsync(self._handle.fileno())
        self.records = 0

    def close(self) -> None:
        self._handle.close()
