"""Helpers shared by the hardening tests (tests/hardening/test_hardening_*.py; see docs/RELIABILITY.md).

``SHITU_FUZZ_SCALE=N`` multiplies every hypothesis example count (``nox -s reliability`` runs with 10).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from shitu.errors import ShituError

SCALE = max(1, int(os.environ.get("SHITU_FUZZ_SCALE", "1") or "1"))


def fuzz(examples: int) -> settings:
    """Hypothesis settings for ``examples`` × SCALE examples, no deadline (2 shared cores are noisy).

    Function-scoped fixtures are allowed: each test rewrites its files on every example.
    """
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def assert_located(exc: ShituError, file: Path | None = None, *, lines: int | None = None) -> None:
    """``exc`` is one line; it names ``file`` (when given) and, if it has a line, one within ``1..lines``."""
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    if file is not None:
        assert exc.path is not None and Path(exc.path) == Path(file), (exc.path, file, text)
        assert str(file) in text
    if exc.line is not None:
        assert exc.line >= 1, text
        if lines is not None:
            assert exc.line <= lines, (exc.line, lines, text)
        assert f":{exc.line}:" in text


def assert_cli_failed_cleanly(result: Any, *, code: int | tuple[int, ...] = (1, 2)) -> str:
    """A CLI run that failed as the contract says: the exit code, nothing on stdout, exactly one stderr line
    ``error: ...``, no traceback and no 'internal error'. Returns that line."""
    codes = (code,) if isinstance(code, int) else code
    assert result.code in codes, (result.code, result.stderr)
    assert result.stdout == "", result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return lines[0]


# -- watching file access in-process: sys.addaudithook ----------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {  # event → the positions of its path arguments
    "os.rename": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.symlink": (0, 1),
    "os.link": (0, 1),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.move": (1,),
}


@dataclass
class FileAccess:
    """The files opened for reading and the paths written (opened for writing, renamed, removed...)."""

    reads: list[Path] = field(default_factory=list)
    writes: list[tuple[str, Path]] = field(default_factory=list)

    def read_under(self, folder: Path) -> list[Path]:
        return [p for p in self.reads if _inside(p, folder)]

    def writes_outside(self, *allowed: Path) -> list[tuple[str, Path]]:
        return [(event, p) for event, p in self.writes if not any(_inside(p, a) for a in allowed)]


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path == folder or path.is_relative_to(folder)
    except (TypeError, ValueError):
        return False


def _as_path(value: Any) -> Path | None:
    if isinstance(value, int) or value is None:
        return None
    try:
        return Path(os.path.abspath(os.fsdecode(value)))
    except (TypeError, ValueError):
        return None


_active: list[FileAccess] = []
_lock = threading.Lock()
_installed = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _active:
        return
    if event == "open":
        path = _as_path(args[0])
        if path is None:
            return
        mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        for access in _active:
            if writing:
                access.writes.append(("open", path))
            else:
                access.reads.append(path)
        return
    positions = _PATH_EVENTS.get(event)
    if positions is None:
        return
    for position in positions:
        path = _as_path(args[position]) if position < len(args) else None
        if path is not None:
            for access in _active:
                access.writes.append((event, path))


@contextmanager
def watch_files() -> Iterator[FileAccess]:
    """Record, in this process and its threads, every file opened and every path written while inside.

    Audit hooks cannot be removed, so one is installed for the whole session; it does nothing outside a
    ``watch_files`` block. Paths are absolute but not resolved (a link is recorded as named).
    """
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_audit)
            _installed = True
    access = FileAccess()
    _active.append(access)
    try:
        yield access
    finally:
        _active.remove(access)


def never_called(reason: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"called although {reason}: {args!r}")

    return refuse


# -- commands stopped before each file-system step (the kill loops) ---------------------------------------

STEP_WRAPPER = r"""
import importlib, os, sys

def stepped(name, real):
    def step(*args, **kwargs):
        where = args[0] if args and isinstance(args[0], (str, bytes, os.PathLike)) else "-"
        sys.stdout.write(name + "\t" + os.fsdecode(where).replace("\n", " ") + "\n")
        sys.stdout.flush()
        if sys.stdin.readline() != "go\n":
            os._exit(3)
        return real(*args, **kwargs)
    return step

for name in ("replace", "rename", "fsync", "unlink"):
    setattr(os, name, stepped(name, getattr(os, name)))
for spec in filter(None, os.environ.get("SHITU_STEP_EXTRA", "").split(",")):
    module, function = spec.split(":")
    owner = importlib.import_module(module)
    setattr(owner, function, stepped(function, getattr(owner, function)))
from shitu.cli import main
main(sys.argv[1:])
"""


@dataclass
class SteppedCommand:
    """``shitu ARGS`` under a wrapper that prints ``name<TAB>first argument`` before each file-system step
    (``os.replace``, ``os.rename``, ``os.fsync``, ``os.unlink``, and the ``module:function`` names in
    ``extra``) and waits for ``go`` on stdin: the test lets it run to step k and kills it there (SIGKILL)."""

    wrapper: Path
    args: list[str]
    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path, args: list[str], extra: tuple[str, ...] = ()) -> SteppedCommand:
        wrapper = folder / "stepped_shitu.py"
        wrapper.write_text(STEP_WRAPPER)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "SHITU_STEP_EXTRA": ",".join(extra)}
        return cls(wrapper, [str(a) for a in args], extra, env)

    @property
    def stderr_file(self) -> Path:
        return self.wrapper.with_suffix(".stderr")

    def start(self) -> Any:
        """The process, its stdin and stdout pipes open (stderr goes to :attr:`stderr_file`: a pipe nobody
        reads would block it)."""
        import subprocess

        with self.stderr_file.open("w") as stderr:
            return subprocess.Popen(
                [sys.executable, str(self.wrapper), *self.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=self.env,
            )

    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    @staticmethod
    def go(process: Any) -> None:
        """Let ``process`` take the step it waits before."""
        process.stdin.write("go\n")
        process.stdin.flush()

    @staticmethod
    def close(process: Any) -> None:
        """Kill ``process`` (if still running) and close its pipes."""
        process.kill()
        process.wait(timeout=60)
        process.stdin.close()
        process.stdout.close()

    def steps(self, timeout: float = 300) -> tuple[list[str], int, str]:
        """Run it through every step: the steps (``name<TAB>path``), the exit code and stderr."""
        process = self.start()
        steps = []
        try:
            while line := process.stdout.readline():
                steps.append(line.rstrip("\n"))
                self.go(process)
            code = process.wait(timeout=timeout)
        finally:
            self.close(process)
        return steps, code, self.stderr()

    def kill_before(self, step: int) -> str:
        """Run it up to step ``step`` (0-based) and kill it with SIGKILL while it waits there; that step's
        line."""
        process = self.start()
        try:
            for _ in range(step):
                assert process.stdout.readline(), self.stderr()
                self.go(process)
            waiting = process.stdout.readline().rstrip("\n")
            assert waiting, self.stderr()
        finally:
            self.close(process)  # SIGKILL
        return waiting
