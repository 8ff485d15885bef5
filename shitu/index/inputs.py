"""Turning command-line inputs (image files, folders, text files of paths) into a list of image paths.

A minimal private version for ``shitu index`` and ``shitu search``; ``shitu.embed.predict.resolve_inputs`` (being
written in parallel) is meant to replace it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Suffixes taken as images when a folder is searched (the formats Pillow decodes that shitu accepts).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
#: Suffixes read as text files listing one image path per line.
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})


@dataclass
class ResolvedInputs:
    """The image paths found, in order, and one line per input that could not be resolved."""

    paths: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _list_file(file: Path, resolved: ResolvedInputs) -> None:
    """One path per line, relative to the list's folder; a ``<path> <integer label>`` line (ShiTuRecDataset
    list) gives its path. Blank lines and lines starting with ``#`` are skipped."""
    from shitu.data.lists import parse_line

    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        resolved.problems.append(f"{file}: cannot read: {exc}")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        candidate = file.parent / entry
        try:
            if not candidate.exists():
                parsed = parse_line(entry)
                if not isinstance(parsed, str) and (file.parent / parsed[0]).exists():
                    candidate = file.parent / parsed[0]
            found = candidate.is_file()
        except OSError as exc:  # a name too long, a permission problem: this line only
            resolved.problems.append(f"{file}:{number}: cannot read {entry}: {exc.strerror or exc}")
            continue
        if found:
            resolved.paths.append(str(candidate))
        else:
            resolved.problems.append(f"{file}:{number}: image not found: {entry}")


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> ResolvedInputs:
    """Image paths from ``inputs``: an image file as itself, a folder as every image below it (sorted,
    recursively, by suffix), a ``.txt``/``.lst`` file as the paths it lists. Missing inputs, empty folders and
    unreadable lists become problems; the others are still returned."""
    resolved = ResolvedInputs()
    for raw in inputs:
        path = Path(raw)
        try:
            path.stat()
        except FileNotFoundError:
            pass  # reported as "not found" below
        except OSError as exc:  # a name too long, a link loop, a permission problem: this input only
            resolved.problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                resolved.problems.append(f"{path}: no images in this folder")
            resolved.paths.extend(found)
        elif path.is_file():
            if path.suffix.lower() in LIST_SUFFIXES:
                _list_file(path, resolved)
            else:
                resolved.paths.append(str(path))
        else:
            resolved.problems.append(f"{path}: not found")
    return resolved
