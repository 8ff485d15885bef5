"""The one exception type users see: a located, one-line message."""

from __future__ import annotations

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
