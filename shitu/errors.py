"""The one exception type users see: a located, one-line message."""

from __future__ import annotations

import errno
import os


class ShituError(Exception):
    """A problem the user can fix, rendered as one line ``path:line: message``.

    ``path`` and ``line`` locate the problem when it is tied to a file; ``hint`` is an optional
    second sentence (how to fix it) appended to the same line.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.line = line
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        location = ""
        if self.path is not None:
            location = self.path if self.line is None else f"{self.path}:{self.line}"
            location += ": "
        text = f"{location}{self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split("\n"))


class StorageError(ShituError, OSError):
    """A fault of the machine while using a path (disk full, read-only file system, permission denied, a
    folder gone): a ShituError naming the path and what to do, and still an OSError with the errno."""

    def __init__(self, errno_code: int, message: str, *, path: str | os.PathLike[str] | None, hint: str) -> None:
        super().__init__(message, path=path, hint=hint)
        self.errno = errno_code
        self.strerror = os.strerror(errno_code)
        self.filename = self.path


_RERUN = "run the same command again"
#: errno → (what happened, what to do). The one table of machine faults every command reports from.
_FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", f"free space and {_RERUN}"),
    errno.EDQUOT: ("disk quota exceeded", f"free space or raise the quota, then {_RERUN}"),
    errno.EFBIG: ("file too large for the file system", f"choose a folder on another file system and {_RERUN}"),
    errno.EROFS: ("read-only file system", f"choose a writable folder (or remount it read-write) and {_RERUN}"),
    errno.EACCES: ("permission denied", f"allow writing there or choose another folder, then {_RERUN}"),
    errno.EPERM: ("operation not permitted", f"allow writing there or choose another folder, then {_RERUN}"),
    errno.ENOENT: ("the folder does not exist (any more)", f"create it or choose another folder, then {_RERUN}"),
    errno.ENOTDIR: ("a part of the path is not a folder", f"choose another folder and {_RERUN}"),
    errno.EIO: ("input/output error", f"check the disk and {_RERUN}"),
}
#: How libraries that report a fault as text (Orbax and TensorStore inside asyncio, usearch) spell these errnos.
_FAULT_TEXTS: tuple[tuple[str, int], ...] = (
    ("no space left on device", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT),
    ("read-only file system", errno.EROFS),
    ("permission denied", errno.EACCES),
    ("operation not permitted", errno.EPERM),
)


def _fault_errno(exc: BaseException) -> int | None:
    """The errno of a machine fault behind ``exc`` (an OSError, its cause or context, or its text), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FAULTS:
            return current.errno
        text = str(current).lower()
        for needle, code in _FAULT_TEXTS:
            if needle in text:
                return code
        current = current.__cause__ or current.__context__
    return None


def storage_error(
    exc: BaseException,
    path: str | os.PathLike[str] | None = None,
    *,
    action: str | None = "writing",
    rerun: str | None = None,
) -> StorageError | None:
    """``exc`` as one :class:`StorageError` line when it is a machine fault (see ``_FAULTS``; also when a
    library reports one as text), else None. ``path`` is what was being written; without it the OSError's
    own file name is used. ``action`` completes "... while <action>" (None: left out); ``rerun`` replaces
    "run the same command again" in the hint. A missing file or folder only counts while writing (when
    reading it is the caller's "not found")."""
    if isinstance(exc, StorageError):
        return exc
    code = _fault_errno(exc)
    if code is None or (code in (errno.ENOENT, errno.ENOTDIR) and action is None):
        return None
    if path is None and isinstance(exc, OSError):
        path = exc.filename
    what, hint = _FAULTS[code]
    if rerun is not None:
        hint = hint.replace(_RERUN, rerun)
    return StorageError(code, what if action is None else f"{what} while {action}", path=path, hint=hint)
