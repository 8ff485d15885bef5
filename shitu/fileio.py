"""Crash-safe file writing: every file shitu writes goes through here.

A file is written to a temporary sibling, flushed to disk, then renamed over the target, so a reader
(or a crash) only ever sees the old or the new content. Several files that belong together (the three
list files of a dataset) are replaced under a small journal: the new contents are staged first, the
journal names them, and the renames are rolled forward by :func:`recover` if a crash interrupts them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
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
        try:
            handle_cm = os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "")
        except BaseException:
            os.close(fd)
            raise
        with handle_cm as handle:
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


def _backups_of(path: Path) -> list[tuple[int, Path]]:
    """The existing backups of ``path``: ``x.bak`` as number 0, ``x.bak.N`` as N, in number order."""
    found: list[tuple[int, Path]] = []
    plain = path.with_name(path.name + ".bak")
    if plain.exists():
        found.append((0, plain))
    numbered = re.compile(re.escape(path.name) + r"\.bak\.([1-9][0-9]*)")
    for candidate in path.parent.glob(glob.escape(path.name) + ".bak.*"):
        match = numbered.fullmatch(candidate.name)
        if match:
            found.append((int(match.group(1)), candidate))
    return sorted(found)


def backup_name(path: Path) -> Path | None:
    """Where the current content of ``path`` should be kept before it is replaced, or None if not needed.

    None when ``path`` does not exist, or when ``x.bak`` or any numbered ``x.bak.N`` already holds exactly
    this content. Otherwise ``x.bak`` when there is no backup yet, else ``x.bak.N`` with N one above the
    highest number in use (so numbers follow time even after a backup was deleted). Nothing is ever
    overwritten.
    """
    if not path.exists():
        return None
    current = path.read_bytes()
    existing = _backups_of(path)
    for _, candidate in existing:
        # A link is never read: it may lead out of the folder (it still takes its number).
        if candidate.is_file() and not candidate.is_symlink() and candidate.read_bytes() == current:
            return None
    if not existing:
        return path.with_name(path.name + ".bak")
    return path.with_name(f"{path.name}.bak.{existing[-1][0] + 1}")


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``directory`` (POSIX ``flock`` on the folder itself, so no lock
    file is left behind). Two shitu processes then never update or recover the same folder at once. Where
    locking is not available it does nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: go on unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _remove_leftovers(directory: Path, names: list[str]) -> None:
    """Remove what a crash before the commit point can leave: staged ``.<name>.*.new`` files and the
    temporary ``.<name>*.tmp`` files of interrupted atomic writes (backups, journal). Call with the
    directory lock held and no journal pending."""
    for name in [*names, JOURNAL_NAME]:
        for pattern in (f".{glob.escape(name)}.*.new", f".{glob.escape(name)}.*.tmp"):
            for leftover in directory.glob(pattern):
                if leftover.is_file() and not leftover.is_symlink():
                    leftover.unlink(missing_ok=True)


def replace_together(files: Mapping[Path, bytes], *, backup: bool = True) -> list[Path]:
    """Replace several files in one directory as one unit, keeping backups of what they held.

    Files whose content is unchanged are left alone. Returns the backup files written. After a crash at
    any point, each file holds either its old or its new content, and :func:`recover` (called by every
    command that reads a dataset) completes an interrupted replacement.
    """
    if not files:
        return []
    directories = {Path(p).parent for p in files}
    if len(directories) != 1:
        raise ValueError("replace_together needs files of one directory")
    directory = directories.pop()
    with _directory_lock(directory):
        _recover_locked(directory)  # finish an interrupted update before comparing with the current files
        _remove_leftovers(directory, [Path(p).name for p in files])
        changed = {
            Path(p): data for p, data in files.items() if not (Path(p).is_file() and Path(p).read_bytes() == data)
        }
        if not changed:
            return []
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
                staged[Path(tmp_name).name] = path.name
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp_name, 0o644)
            # The journal is the commit point: once it exists, recover() finishes the renames.
            atomic_write_json(directory / JOURNAL_NAME, {"rename": staged})
        except BaseException:
            for tmp in staged:
                (directory / tmp).unlink(missing_ok=True)
            raise
        _recover_locked(directory)
    return backups


def _journal_renames(journal: Path) -> list[tuple[str, str]]:
    """The (staged file, target) pairs a journal names, keeping only safe ones: both plain names of files in
    the journal's own folder, the staged one a ``.<target>.*.new`` file. Anything else is ignored, and a
    journal that is a symbolic link is never read (shitu writes journals as plain files)."""
    if journal.is_symlink():
        return []
    try:
        document = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # a journal is written atomically, so this is a foreign file: leave data alone
    renames = document.get("rename") if isinstance(document, dict) else None
    if not isinstance(renames, dict):
        return []
    safe: list[tuple[str, str]] = []
    for tmp, name in renames.items():
        if not isinstance(tmp, str) or not isinstance(name, str):
            continue
        plain = all(
            text not in ("", ".", "..") and Path(text).name == text and "/" not in text and "\\" not in text
            for text in (tmp, name)
        )
        if not plain or name == JOURNAL_NAME:
            continue  # never follow a path out of this directory
        if not (tmp.startswith(f".{name}.") and tmp.endswith(".new")):
            continue  # only ever move one of our staged files over its own target
        safe.append((tmp, name))
    return safe


def _recover_locked(directory: Path) -> bool:
    journal = directory / JOURNAL_NAME
    if not journal.is_file():
        return False
    for tmp, name in _journal_renames(journal):
        try:
            os.replace(directory / tmp, directory / name)
        except FileNotFoundError:
            continue  # already renamed before the interruption
    _fsync_dir(directory)
    journal.unlink(missing_ok=True)
    _fsync_dir(directory)
    return True


def recover(directory: str | os.PathLike[str]) -> bool:
    """Finish a replacement interrupted by a crash in ``directory``; True if there was one to finish."""
    directory = Path(directory)
    if not (directory / JOURNAL_NAME).is_file():
        return False
    with _directory_lock(directory):
        return _recover_locked(directory)


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
