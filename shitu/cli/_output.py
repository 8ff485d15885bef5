"""The one output sink of every command: human text on stderr (rich), JSON on stdout (``--json``)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


#: Every character ``str.splitlines`` breaks a line at, written as its escape so a message stays one line.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(message: str) -> str:
    """``message`` with its line breaks (a file's own text may hold any) written as escapes."""
    return str(message).translate(_LINE_BREAKS)


def error_line(message: str) -> None:
    """Write one error line to stderr, never wrapped (a pipe reader sees exactly one line)."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    if os.environ.get("SHITU_DEBUG") and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()


def machine_fault_line(exc: BaseException) -> str | None:
    """The one line for an exception no command turned into a ShituError that is still a fault of the machine
    or its files (see :func:`shitu.errors.storage_error`): the path, what happened and what to do. None for
    anything else (an internal error)."""
    from shitu.errors import storage_error

    fault = storage_error(exc, action=None)
    if fault is not None:
        return str(fault)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{os.fsdecode(exc.filename)}: " if isinstance(exc.filename, (str, bytes)) else ""
        return f"{where}{exc.strerror.lower()}"
    return None


class Output:
    """Decides, once, what goes where: in JSON mode stdout carries only JSON documents or lines."""

    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

    # -- human output (stderr) ----------------------------------------------------------------------
    def info(self, message: str) -> None:
        """A line for people; dropped in JSON mode so pipelines see only what they asked for."""
        if not self.json_mode:
            self.console.print(message)

    def render(self, renderable: Any) -> None:
        """A rich table or panel for people; dropped in JSON mode."""
        if not self.json_mode:
            self.console.print(renderable)

    def warning(self, message: str) -> None:
        """A warning, always shown on stderr."""
        self.console.print(f"[yellow]warning:[/] {escape(one_line(message))}")

    def problem(self, severity: str, message: str) -> None:
        colour = "red" if severity == "error" else "yellow"
        self.console.print(f"[{colour}]{severity}:[/] {escape(one_line(message))}")

    # -- machine output (stdout) --------------------------------------------------------------------
    def emit(self, document: Any) -> None:
        """Print one JSON document (or one JSON line of a stream) on stdout, in JSON mode only."""
        if self.json_mode:
            sys.stdout.write(json.dumps(document, ensure_ascii=False, default=_json_default) + "\n")
            sys.stdout.flush()

    # -- progress -----------------------------------------------------------------------------------
    @contextmanager
    def progress(self) -> Iterator[Any]:
        """A callback ``(stage, advance, total)`` that drives one rich progress bar per stage on stderr."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        tasks: dict[str, Any] = {}

        def update(stage: str, advance: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], advance=advance, total=total)

        with bars:
            yield update
