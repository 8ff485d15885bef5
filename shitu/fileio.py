"""Crash-safe file writing: every file shitu writes goes through here.

A file is written to a temporary sibling, flushed to disk, then renamed over the target, so a reader
(or a crash) only ever sees the old or the new content. Several files that belong together (the three
list files of a dataset) are replaced under a small journal: the new contents are staged first, the
journal names them, and the renames are rolled forward by :func:`recover` if a crash interrupts them. A
folder (a model bundle, an index, a check report) is built in a hidden staging sibling and swapped in whole
(:func:`atomic_directory`). Writers of one target exclude each other with :func:`exclusive_lock`.

A fault of the machine while writing (disk full, read-only, permission denied) leaves nothing half-written
and is raised as one :class:`~shitu.errors.StorageError` naming the target (see :func:`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from shitu.errors import ShituError, StorageError, storage_error

JOURNAL_NAME = ".shitu-journal.json"
#: The lock file of a folder that is replaced whole: ``.NAME.shitu-lock`` beside it (see :func:`folder_lock`).
LOCK_SUFFIX = ".shitu-lock"
#: The lock file inside a dataset folder while its list files are replaced (see :func:`replace_together`).
DATASET_LOCK = ".shitu-lock"


def fsync_directory(directory: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk; best effort where unsupported."""
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
    with writing(target):
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
        fsync_directory(target.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        fault = _fault(exc, target)
        if fault is not None:
            raise fault from exc
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


class _DropFaultRecords(logging.Filter):
    """Drops log records that report a machine fault: Orbax logs each failed asyncio write of a full disk
    with its traceback (through absl), and the same fault is then raised once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted is not ours to judge
            return True
        return storage_error(exc or RuntimeError(message), action=None) is None


#: The loggers through which Orbax and asyncio report failed background writes.
_LIBRARY_LOGGERS = ("absl", "asyncio")


@contextmanager
def _quiet_fault_logs() -> Iterator[None]:
    drop = _DropFaultRecords()
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _fault(exc: BaseException, target: Path, rerun: str | None = None) -> ShituError | None:
    """:func:`~shitu.errors.storage_error` for a write of ``target``, except a missing file elsewhere (an
    input read while writing: the caller's own "not found")."""
    missing = isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ENOTDIR) and exc.filename is not None
    if missing and not os.fsdecode(exc.filename).startswith(os.fspath(target.absolute().parent)):
        return None
    return storage_error(exc, target, rerun=rerun)


@contextmanager
def writing(path: str | os.PathLike[str], *, rerun: str | None = None) -> Iterator[None]:
    """Within it, a fault of the machine (an OSError such as ENOSPC, EROFS, EACCES, or a library's error that
    reports one) becomes one :class:`~shitu.errors.StorageError` naming ``path`` (or the OSError's own file
    when it names one); other exceptions pass unchanged. ``rerun`` is how to go on, when not "run the same
    command again". What to clean up stays the caller's job."""
    try:
        with _quiet_fault_logs():
            yield
    except ShituError:
        raise
    except Exception as exc:
        named = getattr(exc, "filename", None)
        fault = _fault(exc, Path(os.fsdecode(named) if isinstance(named, (str, bytes)) and named else path), rerun)
        if fault is None:
            raise
        raise fault from exc


#: Lock files this process holds, with how many times (flock is per open file: taking it twice would fail).
_held_locks: dict[Path, int] = {}


@contextmanager
def exclusive_lock(
    lock_file: str | os.PathLike[str],
    *,
    wait: bool = False,
    busy: str = "in use by another process",
    busy_path: str | os.PathLike[str] | None = None,
    hint: str | None = "wait for it to finish",
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if missing, the holder's PID written in it, removed
    again on release). With ``wait`` False a lock held by another process is a ShituError at once (``busy``,
    naming ``busy_path`` or the lock file, and ``hint``); with ``wait`` True it waits. Re-entrant within a
    process; a no-op where flock is unsupported. Removing the file on release is safe: a waiter that locked a
    file that is gone by then locks the new one (the inode is checked)."""
    lock = Path(lock_file).absolute()
    if lock in _held_locks:
        _held_locks[lock] += 1
        try:
            yield
        finally:
            _held_locks[lock] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, go on unlocked
        yield
        return
    while True:
        with writing(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise ShituError(busy, path=busy_path if busy_path is not None else lock, hint=hint) from None
        except OSError:  # a filesystem without flock: go on unlocked
            break
        try:  # the holder before us may have removed the file after we opened it: then lock the new one
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    with contextlib.suppress(OSError):  # who holds it, for people; a full disk must not stop the lock
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[lock] = 1
    try:
        yield
    finally:
        del _held_locks[lock]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked, so nobody can lock this file after it is gone
        os.close(fd)


def lock_of(folder: str | os.PathLike[str]) -> Path:
    """The lock file of a folder that is replaced whole: the hidden sibling ``.NAME.shitu-lock`` (the folder
    itself cannot carry it)."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def folder_lock(
    folder: str | os.PathLike[str],
    *,
    wait: bool = False,
    busy: str = "in use by another shitu process",
    hint: str | None = "wait for it to finish",
) -> contextlib.AbstractContextManager[None]:
    """:func:`exclusive_lock` on :func:`lock_of` ``folder``, naming ``folder`` when it is busy."""
    return exclusive_lock(lock_of(folder), wait=wait, busy=busy, busy_path=Path(folder).absolute(), hint=hint)


def remove_stale_lock(lock_file: str | os.PathLike[str]) -> bool:
    """Delete ``lock_file`` if nobody holds it (what a killed writer left); True if it was removed."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(lock_file)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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
    with writing(directory), exclusive_lock(directory / DATASET_LOCK, wait=True):
        _recover_locked(directory)  # finish an interrupted update before comparing with the current files
        _remove_leftovers(directory, [Path(p).name for p in files])
        changed = {
            Path(p): data for p, data in files.items() if not (Path(p).is_file() and Path(p).read_bytes() == data)
        }
        if not changed:
            return []
        backups: list[Path] = []
        staged: dict[str, str] = {}
        try:
            if backup:
                for path in changed:
                    target = backup_name(path)
                    if target is not None:
                        atomic_write_bytes(target, path.read_bytes())
                        backups.append(target)
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
            for written in backups:  # nothing was replaced: a backup of the unchanged file would be a stray copy
                written.unlink(missing_ok=True)
            raise
        try:
            _recover_locked(directory)
        except Exception:  # a fault of the machine while renaming (a kill is finished by recover() instead)
            if all((directory / tmp).exists() for tmp in staged):  # no list replaced yet: undo it all
                with contextlib.suppress(OSError):
                    (directory / JOURNAL_NAME).unlink()
                    for tmp in staged:
                        (directory / tmp).unlink(missing_ok=True)
                    for written in backups:
                        written.unlink(missing_ok=True)
            raise  # else the journal stays: every command that reads the lists finishes the renames first
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
    fsync_directory(directory)
    journal.unlink(missing_ok=True)
    fsync_directory(directory)
    return True


def recover(directory: str | os.PathLike[str]) -> bool:
    """Finish a replacement interrupted by a crash in ``directory``; True if there was one to finish."""
    directory = Path(directory)
    if not (directory / JOURNAL_NAME).is_file():
        return False
    with writing(directory), exclusive_lock(directory / DATASET_LOCK, wait=True):
        return _recover_locked(directory)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange_directories(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot. The standard library has no such call: two renames leave a moment with
    neither in place."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(error, os.strerror(error), os.fspath(second))


#: A staging entry of :func:`atomic_open` / :func:`atomic_directory`: ``.NAME.`` + tempfile's 8 random
#: characters + ``.tmp``, or ``.old`` for a folder set aside by the two-rename swap (the fallback's journal).
STAGING_NAME = r"\.{name}\.[a-z0-9_]{{8}}\.(tmp|old)"


def staging_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """The staging entries of ``target`` beside it (see :data:`STAGING_NAME`), matched exactly, so another
    target's (``NAME.v2``) are never taken for ours."""
    target = Path(target).absolute()
    pattern = re.compile(STAGING_NAME.format(name=re.escape(target.name)))
    try:
        return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_entry(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _recover_directory_locked(target: Path) -> bool:
    """Put back ``target`` when a two-rename swap was stopped between its renames (it sits in a ``.old``
    folder beside it); True if it did."""
    if target.exists() or target.is_symlink():
        return False
    aside = [p / target.name for p in staging_leftovers(target) if p.name.endswith(".old")]
    aside = [p for p in aside if p.exists() and not p.is_symlink()]
    if not aside:
        return False
    os.replace(aside[-1], target)
    fsync_directory(target.parent)
    return True


def recover_directory(target: str | os.PathLike[str]) -> bool:
    """Readers call this when ``target`` is missing: it puts back a folder that an interrupted two-rename swap
    left aside (only the fallback has that moment). True if it did; never raises (a read-only place is
    left as it is)."""
    target = Path(target).absolute()
    if target.exists() or not any(p.name.endswith(".old") for p in staging_leftovers(target)):
        return False
    try:
        with folder_lock(target, wait=True):
            return _recover_directory_locked(target)
    except (OSError, ShituError):
        return False


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (what a library wrote there need not be)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(folder))


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``: one ``renameat2`` exchange where available (the
    previous folder then sits in ``staging`` and is deleted), else two renames with the previous folder
    set aside in a ``.old`` sibling first (so :func:`_recover_directory_locked` can put it back)."""
    exists = target.exists() or target.is_symlink()
    if exists and _exchange_directories(staging, target):
        fsync_directory(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the previous folder
        return
    if not exists:
        os.replace(staging, target)
        fsync_directory(target.parent)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, aside / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside / target.name, target)
        raise
    fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike[str], *, wait: bool = True) -> Iterator[Path]:
    """Build a folder in a hidden staging sibling; on a clean exit it takes the place of ``path`` whole.

    Holds :func:`folder_lock` on ``path`` throughout (``wait`` False: refuse at once when another process
    holds it; re-entrant, so a caller may take it first). First puts back a folder a killed swap left aside
    and removes what killed writers left beside ``path``; the staged folder is flushed to disk before the
    swap (:func:`_swap_in`), so a crash at any moment leaves the old or the new folder. On an exception the
    staging folder is removed and ``path`` is left as it was; a fault of the machine is a StorageError
    naming ``path``.
    """
    target = Path(path).absolute()
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target, wait=wait):
        with writing(target):
            _recover_directory_locked(target)
            for leftover in staging_leftovers(target):
                _remove_entry(leftover)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            yield staging
            _fsync_tree(staging)
            _swap_in(staging, target)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            fault = _fault(exc, target)
            if fault is not None:
                raise _named_in_target(fault, staging, target) from exc
            raise


def _named_in_target(fault: ShituError, staging: Path, target: Path) -> ShituError:
    """``fault`` naming the file's place in ``target`` instead of in the (removed) staging folder."""
    if not isinstance(fault, StorageError) or fault.path is None:
        return fault
    try:
        inside = Path(fault.path).relative_to(staging)
    except ValueError:
        return fault
    return StorageError(fault.errno, fault.message, path=target / inside, hint=fault.hint or "")
