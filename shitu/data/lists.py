"""Reading and writing ShiTuRecDataset list files (``train.txt``, ``gallery.txt``, ``query.txt``).

A line is ``<image path relative to the dataset root> <integer label>``. PaddleX splits on every space,
so an image path with a space in it breaks there; shitu splits on the last space, so such paths work.
Every problem is reported as an :class:`~shitu.data.formats.Issue` with its file and line; nothing raises.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from shitu.data.formats import SPLITS, Issue, Sample
from shitu.errors import ShituError

_INTEGER = re.compile(r"[+-]?[0-9]+")
_LABEL_MIN, _LABEL_MAX = -(2**63), 2**63 - 1  # labels are int64, as in PaddleClas


@dataclass(frozen=True)
class ListEntry:
    """A parsed line: the sample and where it came from."""

    sample: Sample
    file: str
    line: int


@dataclass
class ParsedList:
    """The good entries of one list file and the issues found while parsing it."""

    split: str
    file: Path
    entries: list[ListEntry] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    exists: bool = True


def locate_root(path: str | os.PathLike[str]) -> Path:
    """The dataset root for ``path``: the folder itself when it holds a list file, else (as PaddleX) the
    parent of the only ``images`` folder below it. Raises ShituError when neither applies."""
    folder = Path(path)
    if not folder.exists():
        raise ShituError("dataset folder does not exist", path=folder)
    if not folder.is_dir():
        raise ShituError("not a folder (give the dataset's root folder)", path=folder)
    if any((folder / f"{split}.txt").is_file() for split in SPLITS):
        return folder
    candidates = [p for p in folder.rglob("images") if p.is_dir()]
    roots = {p.parent for p in candidates if any((p.parent / f"{s}.txt").is_file() for s in SPLITS)}
    if len(roots) == 1:
        return roots.pop()
    if len(roots) > 1:
        listed = ", ".join(sorted(str(r) for r in roots))
        raise ShituError(f"several datasets below this folder ({listed}); give one of them", path=folder)
    raise ShituError(
        "not a ShiTuRecDataset: no train.txt, gallery.txt or query.txt here",
        path=folder,
        hint="convert a foreign layout first with 'shitu convert'",
    )


def path_problem(relative: str) -> str | None:
    """Why an image path in a list may not be used (empty, absolute, or leaving the root), or None."""
    if not relative:
        return "empty image path"
    if relative != relative.strip():
        return f"image path {relative!r} has leading or trailing whitespace"
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or relative.startswith("\\"):
        return f"absolute image path {relative!r} (paths must be relative to the dataset root)"
    parts = re.split(r"[/\\]", relative)
    if ".." in parts:
        return f"image path {relative!r} leaves the dataset root through '..'"
    if "\x00" in relative:
        return "image path contains a NUL character"
    return None


def resolve_inside(root: Path, relative: str) -> tuple[Path | None, str | None]:
    """``root / relative`` with every symbolic link followed: ``(path, None)`` when it stays inside ``root``,
    else ``(None, why)``. Never raises: a loop of links or a name the system refuses is a reason, not a crash
    (``Path.resolve`` raises RuntimeError for a loop before Python 3.13)."""
    try:
        real_root = root.resolve()
        resolved = (root / relative).resolve()
    except RuntimeError:
        return None, f"image path {relative!r} is a loop of symbolic links"
    except (OSError, ValueError) as exc:
        return None, f"image path {relative!r} cannot be resolved ({getattr(exc, 'strerror', None) or exc})"
    if not resolved.is_relative_to(real_root):
        return None, f"image path {relative!r} resolves outside the dataset root (through a symbolic link)"
    return resolved, None


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file (missing, a folder, a pipe or device...), or None.

    Checked before opening, so a named pipe never blocks a reader and a device is never read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "image file not found"
    except (OSError, ValueError) as exc:
        return f"cannot access the file ({getattr(exc, 'strerror', None) or exc})"
    if stat.S_ISDIR(mode):
        return "is a folder, not an image file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe, socket or device): refused"
    return None


def parse_line(text: str) -> tuple[str, int] | str:
    """Parse one line's text (without its line ending) into (path, label), or return why it is malformed."""
    path, sep, label = text.rpartition(" ")
    if not sep or not path:
        return f"malformed line {text[:80]!r}: expected '<image path> <integer label>' separated by one space"
    if label == "":
        return f"malformed line {text[:80]!r}: trailing space after the label"
    if not _INTEGER.fullmatch(label):
        return f"label {label[:40]!r} is not an integer"
    value = int(label)
    if not _LABEL_MIN <= value <= _LABEL_MAX:
        return f"label {label[:40]} does not fit in a 64-bit integer"
    return path, value


def read_list(root: Path, split: str, *, display_root: Path | None = None) -> ParsedList:
    """Parse ``<root>/<split>.txt``. Issues name the file as ``<display_root>/<split>.txt``."""
    file = root / f"{split}.txt"
    shown = str((display_root or root) / f"{split}.txt")
    parsed = ParsedList(split=split, file=file)
    if not file.exists() and not file.is_symlink():
        parsed.exists = False
        parsed.issues.append(Issue("error", shown, f"{split}.txt is missing", code="missing-list"))
        return parsed
    resolved, problem = resolve_inside(root, file.name)
    if resolved is None:  # a link out of the dataset: never read a file outside it as data
        message = str(problem).replace("image path", "list file", 1)
        parsed.issues.append(Issue("error", shown, message, code="path-outside-root"))
        return parsed
    problem = file_problem(resolved)
    if problem is not None:
        parsed.issues.append(Issue("error", shown, problem.replace("image file", "list file"), code="unreadable"))
        return parsed
    try:
        raw = file.read_bytes()
    except OSError as exc:
        parsed.issues.append(Issue("error", shown, f"cannot read: {exc.strerror}", code="unreadable"))
        return parsed
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    seen: dict[str, int] = {}
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if line_bytes.endswith(b"\r"):
            line_bytes = line_bytes[:-1]
        try:
            text = line_bytes.decode("utf-8")
        except UnicodeDecodeError:
            parsed.issues.append(Issue("error", shown, "line is not valid UTF-8", number, "encoding"))
            continue
        if not text.strip():
            if number != raw.count(b"\n") + 1:  # the empty string after the final newline is no line
                parsed.issues.append(Issue("warning", shown, "blank line ignored", number, "blank-line"))
            continue
        result = parse_line(text)
        if isinstance(result, str):
            code = "non-integer-label" if "not an integer" in result else "malformed-line"
            parsed.issues.append(Issue("error", shown, result, number, code))
            continue
        path, label = result
        problem = path_problem(path)
        if problem is not None:
            parsed.issues.append(Issue("error", shown, problem, number, "path-outside-root"))
            continue
        if text in seen:
            parsed.issues.append(
                Issue("warning", shown, f"duplicate of line {seen[text]} ({path})", number, "duplicate-line")
            )
            continue
        seen[text] = number
        parsed.entries.append(ListEntry(Sample(path, label), shown, number))
    if not parsed.entries and not any(i.severity == "error" for i in parsed.issues):
        parsed.issues.append(Issue("error", shown, f"{split}.txt lists no images", code="empty-list"))
    return parsed


def format_lines(samples: Iterable[Sample]) -> bytes:
    """The bytes of a list file for ``samples`` (UTF-8, ``\\n`` endings, final newline)."""
    for sample in samples:
        if "\n" in sample.path or "\r" in sample.path or path_problem(sample.path):
            raise ShituError(f"cannot write image path {sample.path!r} into a list file")
    return "".join(f"{s.path} {s.label}\n" for s in samples).encode("utf-8")


def read_dataset_lists(root: Path) -> dict[str, ParsedList]:
    """Parse all three list files of the dataset at ``root``."""
    return {split: read_list(root, split) for split in SPLITS}
