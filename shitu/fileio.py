"""Crash-safe file writing: every file shitu writes goes through here.

A file is written to a temporary sibling, flushed to disk, then renamed over the target, so a reader
(or a crash) only ever sees the old or the new content. Several files that belong together (the three
list files of a dataset) are replaced under a small journal: the new contents are staged first, the
journal names them, and the renames are rolled forward by :func:`recover` if a crash interrupts them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

JOURNAL_NAME = ".shitu-journal.json"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. some network filesystems)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8, line endings as given) to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 4) -> None:
    """Write ``obj`` as JSON (UTF-8, non-ASCII kept) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def backup_name(path: Path) -> Path | None:
    """Where the current content of ``path`` should be kept before it is replaced, or None if not needed.

    ``x.bak`` when free; when ``x.bak`` (or a numbered ``x.bak.N``) already holds exactly this content,
    no new backup is needed; otherwise the next free ``x.bak.N``. Nothing is ever overwritten.
    """
    if not path.exists():
        return None
    current = path.read_bytes()
    candidate = path.with_name(path.name + ".bak")
    number = 0
    while candidate.exists():
        if candidate.read_bytes() == current:
            return None
        number += 1
        candidate = path.with_name(f"{path.name}.bak.{number}")
    return candidate


def replace_together(files: Mapping[Path, bytes], *, backup: bool = True) -> list[Path]:
    """Replace several files in one directory as one unit, keeping backups of what they held.

    Files whose content is unchanged are left alone. Returns the backup files written. After a crash at
    any point, each file holds either its old or its new content, and :func:`recover` (called by every
    command that reads a dataset) completes an interrupted replacement.
    """
    changed = {p: data for p, data in files.items() if not (p.exists() and p.read_bytes() == data)}
    if not changed:
        return []
    directories = {p.parent for p in changed}
    if len(directories) != 1:
        raise ValueError("replace_together needs files of one directory")
    directory = directories.pop()
    recover(directory)
    backups: list[Path] = []
    if backup:
        for path in changed:
            target = backup_name(path)
            if target is not None:
                atomic_write_bytes(target, path.read_bytes())
                backups.append(target)
    staged: dict[str, str] = {}
    try:
        for path, data in changed.items():
            fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".new")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, 0o644)
            staged[Path(tmp_name).name] = path.name
        # The journal is the commit point: once it exists, recover() finishes the renames.
        atomic_write_json(directory / JOURNAL_NAME, {"rename": staged})
    except BaseException:
        for tmp in staged:
            (directory / tmp).unlink(missing_ok=True)
        raise
    recover(directory)
    return backups


def recover(directory: str | os.PathLike[str]) -> bool:
    """Finish a replacement interrupted by a crash in ``directory``; True if there was one to finish."""
    directory = Path(directory)
    journal = directory / JOURNAL_NAME
    if not journal.exists():
        return False
    try:
        renames = json.loads(journal.read_text(encoding="utf-8"))["rename"]
    except (OSError, ValueError, KeyError, TypeError):
        renames = {}  # a journal is written atomically, so this is a foreign file: leave data alone
    for tmp, name in renames.items():
        if Path(tmp).name != tmp or Path(name).name != name:
            continue  # never follow a path out of this directory
        if (directory / tmp).exists():
            os.replace(directory / tmp, directory / name)
    _fsync_dir(directory)
    journal.unlink(missing_ok=True)
    return True


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory in a temporary sibling; on a clean exit it takes the place of ``path``.

    The old directory (if any) is removed only after the new one is in place.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
