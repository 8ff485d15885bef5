"""Turning what a user names (files, folders, globs, list files, ``-`` for stdin, URLs) into image paths.

One resolver serves every command that reads images (``shitu predict``, ``shitu search``, ``shitu index
add``) and the Python API (``create_model(...).predict(...)``), so the same folder gives the same images
everywhere.

What an image is, is decided by Pillow, not by a fixed list of suffixes: in a folder or among the matches of
a pattern, a file whose suffix Pillow registers for a format it can decode is taken (decoding decides
whether it really is one: a broken ``.jpg`` is then reported by the command that reads it); any other
regular file is opened by Pillow to read its header only (no decoding), and taken when Pillow recognises
it. Every file found and not taken is reported with why: a hidden name, not an image, a pipe or device, a
link loop, a name too long... Nothing is opened before :func:`os.stat` says it is a regular file, so a
named pipe never blocks the resolver.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from shitu.errors import ShituError

#: Suffixes of text files read as lists of image paths, one per line.
LIST_SUFFIXES: frozenset[str] = frozenset({".txt", ".lst", ".list"})
#: Formats Pillow opens but cannot decode by itself: a header only (video), or a stub that needs a
#: separately installed handler (scientific data, Windows metafiles).
_UNDECODABLE_FORMATS = frozenset({"MPEG", "BUFR", "GRIB", "HDF5", "WMF"})

_GLOB_CHARS = re.compile(r"[*?[]")


class SkippedFileWarning(UserWarning):
    """A file found in a folder (or by a pattern) was not taken as an image; the message says why."""


@functools.cache
def image_formats() -> frozenset[str]:
    """The formats Pillow can open and decode here (``JPEG``, ``PNG``, ``TIFF``, ``WEBP``, ``PPM``...)."""
    from PIL import Image

    Image.init()
    return frozenset(name for name in Image.OPEN if name not in _UNDECODABLE_FORMATS)


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Lower-case suffixes Pillow registers for a format of :func:`image_formats` (``.jpg``, ``.pgm``...)."""
    from PIL import Image

    formats = image_formats()
    return frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in formats)


def is_image_name(path: str | os.PathLike[str]) -> bool:
    """Whether the suffix of ``path`` is one of :func:`image_suffixes` (no file is read)."""
    return Path(os.fspath(path)).suffix.lower() in image_suffixes()


def sniff_image(path: Path) -> str | None:
    """The format Pillow recognises in the header of the regular file ``path`` (nothing is decoded), or None
    when it recognises none (or cannot read it)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a huge header is still an image: decoding refuses it later
        try:
            with Image.open(path) as image:
                name = image.format
        except Image.DecompressionBombError:
            return "image"
        except Exception:  # whatever a plugin raises on a file that is not its format: not an image
            return None
    return name if name in image_formats() else None


def is_url(text: str) -> bool:
    """Whether ``text`` is an ``http://`` or ``https://`` URL."""
    return text[:8].lower().startswith(("http://", "https://"))


def file_kind(path: Path) -> tuple[str, str | None]:
    """What ``path`` is, found without opening it: ``folder``, ``file`` (a regular one, through links),
    ``missing`` (also a dangling link), or ``refused`` with why: a pipe, socket or device (opening a pipe
    blocks until someone writes; a device may never end), a link loop, a name too long..."""
    from shitu.data.lists import file_problem

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing", None
    except (OSError, ValueError):  # ELOOP, ENAMETOOLONG, EACCES on a folder above, a NUL in the name
        return "refused", file_problem(path)
    if stat.S_ISDIR(mode):
        return "folder", None
    if stat.S_ISREG(mode):
        return "file", None
    return "refused", file_problem(path)


@dataclass
class ResolvedInputs:
    """What :func:`resolve` found: the images (paths and URLs, in order, duplicates kept), one line per
    input that resolved to nothing or could not be read (``problems``: errors), and one line per file
    found in a folder or by a pattern and not taken because it is no image (``skipped``: notes)."""

    paths: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Resolver:
    def __init__(self, stdin: IO[str] | None, urls: bool) -> None:
        self.stdin = stdin
        self.urls = urls
        self.result = ResolvedInputs()

    def problem(self, message: str, path: str | os.PathLike[str] | None = None, line: int | None = None) -> None:
        self.result.problems.append(str(ShituError(message, path=path, line=line)))

    def skip(self, path: str, why: str) -> None:
        self.result.skipped.append(str(ShituError(f"skipped: {why}", path=path)))

    def url(self, text: str, where: str | None = None, line: int | None = None) -> None:
        if self.urls:
            self.result.paths.append(text)
        elif where is None:
            self.problem("a URL is not accepted here: download the image first", path=text)
        else:
            self.problem(f"{text}: a URL is not accepted here: download the image first", path=where, line=line)

    def found(self, path: str) -> bool:
        """Take ``path`` (found in a folder or by a pattern) when it is an image; else report why not."""
        kind, why = file_kind(Path(path))
        if kind == "missing":
            self.problem("not found (a broken link?)", path=path)
        elif kind == "refused":
            self.problem(why or "cannot be read", path=path)
        elif kind == "folder":  # a pattern's match that is a folder is walked by the caller
            return False
        elif Path(path).name.startswith("."):
            self.skip(path, "hidden file")
        elif is_image_name(path) or sniff_image(Path(path)) is not None:
            self.result.paths.append(path)
            return True
        else:
            self.skip(path, "not an image Pillow can open")
        return False

    def below(self, folder: Path) -> list[str]:
        """The files below ``folder``, recursively, sorted by path; hidden folders, links to folders and
        folders that cannot be listed are reported, not entered."""
        files: list[str] = []

        def unreadable(error: OSError) -> None:
            self.problem(f"cannot list this folder: {error.strerror or error}", path=error.filename or folder)

        for root, dirs, names in os.walk(folder, onerror=unreadable):
            kept = []
            for name in sorted(dirs):
                path = os.path.join(root, name)
                if name.startswith("."):
                    self.skip(path, "hidden folder")
                elif os.path.islink(path):
                    self.skip(path, "a link to a folder (not followed)")
                else:
                    kept.append(name)
            dirs[:] = kept
            files.extend(os.path.join(root, name) for name in names)
        return sorted(files)

    def folder(self, folder: Path, shown: str) -> None:
        taken = [self.found(path) for path in self.below(folder)]
        if not any(taken):
            self.problem("no images in this folder", path=shown)

    def entry(self, text: str, base: Path | None, where: str, line: int) -> None:
        """One line of a list file or of stdin: a path (relative to ``base``), a URL or a folder."""
        if is_url(text):
            self.url(text, where, line)
            return
        candidate = Path(text) if base is None else base / text
        kind, why = file_kind(candidate)
        if kind == "missing":
            from shitu.data.lists import parse_line

            parsed = parse_line(text)  # a ShiTuRecDataset line "<path> <label>" gives its path
            if not isinstance(parsed, str):
                labelled = Path(parsed[0]) if base is None else base / parsed[0]
                if file_kind(labelled)[0] != "missing":
                    candidate = labelled
                    kind, why = file_kind(labelled)
        if kind == "folder":
            self.folder(candidate, str(candidate))
        elif kind == "file":
            self.result.paths.append(str(candidate))
        elif kind == "refused":
            self.problem(f"{text}: {why}", path=where, line=line)
        else:
            self.problem(f"not found: {text}", path=where, line=line)

    def lines(self, text: str, base: Path | None, where: str) -> None:
        for number, raw in enumerate(text.splitlines(), start=1):
            entry = raw.strip()
            if entry and not entry.startswith("#"):
                self.entry(entry, base, where, number)

    def list_file(self, file: Path) -> None:
        try:
            text = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(f"cannot read the list: {exc}", path=file)
            return
        self.lines(text, file.parent, str(file))

    def glob(self, pattern: str) -> None:
        import glob

        files: set[str] = set()
        for match in glob.glob(pattern, recursive=True):
            if file_kind(Path(match))[0] == "folder":
                files.update(self.below(Path(match)))
            else:
                files.add(match)
        taken = [self.found(path) for path in sorted(files)]  # once each, even when a folder and its files match
        if not any(taken):
            self.problem("no image matches this pattern", path=pattern)

    def one(self, raw: str | os.PathLike[str]) -> None:
        text = os.fspath(raw)
        if text == "-":
            stream = self.stdin if self.stdin is not None else sys.stdin
            self.lines(stream.read(), None, "<stdin>")
            return
        if is_url(text):
            self.url(text)
            return
        path = Path(text)
        kind, why = file_kind(path)
        if kind == "folder":
            self.folder(path, text)
        elif kind == "file" and path.suffix.lower() in LIST_SUFFIXES:
            self.list_file(path)
        elif kind == "file":
            self.result.paths.append(text)
        elif _GLOB_CHARS.search(text):
            self.glob(text)
        elif kind == "refused":
            self.problem(why or "cannot be read", path=text)
        else:
            self.problem("not found", path=text)


def resolve(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    stdin: IO[str] | None = None,
    urls: bool = True,
) -> ResolvedInputs:
    """The images that ``inputs`` stand for, with every problem and every skipped file (never raises for
    an input).

    Each input is, in this order of precedence:

    - ``-``: one entry per line of ``stdin`` (default ``sys.stdin``), relative to the working folder;
    - an ``http://`` / ``https://`` URL: kept as it is (fetched when decoded); a problem when ``urls`` is
      False (where a path must be stored);
    - a folder: every image below it (see the module's docstring), recursively, sorted by path;
    - a ``.txt`` / ``.lst`` / ``.list`` file: one entry per line, relative to the file's folder; blank lines
      and lines starting with '#' are skipped; a ShiTuRecDataset line ``<path> <label>`` gives its path;
    - any other regular file (through links): itself, whatever it holds (decoding decides);
    - a pattern with ``*``, ``?`` or ``[`` that is not an existing path: the images among the files it
      matches and below the folders it matches (``**`` spans folders), each once, sorted; so a quoted
      pattern works as the shell would expand it.

    An entry of a list or of stdin may be a path, a folder or a URL (not a pattern). Something that
    resolves to nothing (missing path, folder without images, pattern without match, unreadable list) or
    that is no regular file (a named pipe, a device, a socket, a link loop, a name too long; also when
    found in a folder or by a pattern) is a problem, named (a list's at its line). A hidden name (starting
    with '.'), a link to a folder inside a folder, and a file Pillow does not recognise are skipped.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    resolver = _Resolver(stdin, urls)
    for raw in inputs:
        resolver.one(raw)
    return resolver.result


def resolve_inputs(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    stdin: IO[str] | None = None,
    problems: list[str] | None = None,
    skipped: list[str] | None = None,
    urls: bool = True,
) -> list[str]:
    """The image paths and URLs that ``inputs`` stand for, in order (duplicates kept); see :func:`resolve`.

    Problems raise a one-line ShituError (the first one), or, when ``problems`` is a list, are appended to
    it and the rest is still resolved. Skipped files are appended to ``skipped`` when it is a list, else
    each is issued as a :class:`SkippedFileWarning`.
    """
    result = resolve(inputs, stdin=stdin, urls=urls)
    if skipped is not None:
        skipped.extend(result.skipped)
    else:
        for line in result.skipped:
            warnings.warn(SkippedFileWarning(line), stacklevel=2)
    if problems is None and result.problems:
        raise ShituError(result.problems[0])
    if problems is not None:
        problems.extend(result.problems)
    return result.paths
