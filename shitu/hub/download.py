"""Downloading one file: resumable, retried, verified. The only code in shitu that opens a network connection.

It uses the standard library's ``urllib``: one GET with an optional ``Range`` header is all that is needed,
and it honours the usual proxy variables, so no HTTP client dependency is added for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shitu.errors import ShituError
from shitu.fileio import fsync_directory

OFFLINE_ENV = "SHITU_OFFLINE"
#: Seconds to wait for a connection or for the next bytes of a response.
TIMEOUT_SECONDS = 30.0
#: Further attempts after a failed one (a dropped connection resumes where it stopped).
RETRIES = 5
#: The first wait between attempts; it doubles each time, up to :data:`MAX_BACKOFF_SECONDS`.
BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
CHUNK_BYTES = 1 << 20  # at most this much is read (and written) at once
PART_SUFFIX = ".part"

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

#: ``progress(done_bytes, total_bytes_or_None)``; called as bytes arrive.
Progress = Callable[[int, int | None], None]


def offline() -> bool:
    """Whether ``SHITU_OFFLINE`` forbids the network."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix (dropped connection, timeout, server error)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _total_of(response: object, offset: int) -> tuple[int, int | None]:
    """Where the body of ``response`` starts in the file and the file's total size (None if unknown)."""
    status = getattr(response, "status", 200)
    headers = response.headers  # type: ignore[attr-defined]
    if status == 206:
        match = _CONTENT_RANGE.fullmatch((headers.get("Content-Range") or "").strip())
        if not match:
            raise _Retry("a partial response without a valid Content-Range")
        start = int(match.group(1))
        total = None if match.group(3) == "*" else int(match.group(3))
        return start, total
    length = headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def download(
    url: str,
    target: Path,
    *,
    what: str,
    hint: str,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    recorded_sha256: str | None = None,
    progress: Progress | None = None,
) -> Downloaded:
    """Fetch ``url`` into ``target``: the bytes go to ``target.part`` first, which a later call resumes with an
    HTTP ``Range`` request; only a complete, verified file is renamed to ``target``.

    Verified: the size the server announced (and ``expected_size``), ``expected_sha256`` (the publisher's)
    and ``recorded_sha256`` (the first download's). A mismatch removes the partial file and is a ShituError,
    as is a failure that :data:`RETRIES` more attempts did not fix; ``hint`` (how to install the file by hand)
    ends those messages. ``SHITU_OFFLINE=1`` makes this a ShituError before any connection is opened.
    """
    if offline():
        raise ShituError(f"{what} is not in the cache and {OFFLINE_ENV} is set: not downloading it", hint=hint)
    part = target.with_name(target.name + PART_SUFFIX)
    target.parent.mkdir(parents=True, exist_ok=True)
    failure = ""
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(min(BACKOFF_SECONDS * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))
        try:
            _attempt(url, part, expected_size=expected_size, progress=progress)
        except _Retry as exc:
            failure = str(exc)
            continue
        except ShituError as exc:
            part.unlink(missing_ok=True)
            if exc.hint is None:
                raise ShituError(exc.message, hint=hint) from None
            raise
        break
    else:
        raise ShituError(f"cannot download {what} from {url}: {failure} ({RETRIES + 1} attempts)", hint=hint)
    size = part.stat().st_size
    digest = file_sha256(part)
    for expected, source in ((expected_sha256, "the published"), (recorded_sha256, "the first download's")):
        if expected and digest != expected.lower():
            part.unlink(missing_ok=True)
            raise ShituError(
                f"the download of {what} from {url} has sha256 {digest}, not {source} {expected.lower()}: refused",
                hint="the file was changed or damaged on the way; nothing was installed",
            )
    os.replace(part, target)
    fsync_directory(target.parent)
    return Downloaded(path=target, size=size, sha256=digest)


def _attempt(url: str, part: Path, *, expected_size: int | None, progress: Progress | None) -> None:
    """One GET, resuming ``part`` when it holds bytes; returns once ``part`` is complete."""
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    from shitu import __version__

    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"shitu/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is no prefix of this one: start again
            part.unlink(missing_ok=True)
            raise _Retry("the partial download did not fit the file on the server") from None
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        raise ShituError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Retry(f"the server cannot be reached ({reason})") from None
    with response:
        start, total = _total_of(response, offset)
        if start != offset:  # a server that ignores Range answers 200 with the whole file
            offset = 0
        if expected_size is not None and total is not None and total != expected_size:
            raise ShituError(f"{url} is {total} bytes, not the expected {expected_size}: refused")
        done = offset
        try:
            # unbuffered: whatever arrived is on disk (for the next attempt to resume) even after a kill -9
            handle = open(part, "ab" if offset else "wb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ShituError(f"cannot write the download: {exc.strerror or exc}", path=part) from None
        with handle:
            if progress:
                progress(done, total)
            while total is None or done < total:
                try:
                    block = response.read1(CHUNK_BYTES)  # what has arrived, so progress and resumption are fine
                except (OSError, HTTPException) as exc:  # a dropped connection or a timeout: resume from here
                    raise _Retry(f"the connection broke after {done} bytes ({exc.__class__.__name__})") from None
                if not block:
                    break
                try:
                    view = memoryview(block)
                    while view:  # a raw file may take part of a block
                        written = handle.write(view)
                        if not written:
                            raise OSError("the file took no bytes")
                        view = view[written:]
                except OSError as exc:  # a full disk is not fixed by trying again
                    raise ShituError(f"cannot write the download: {exc.strerror or exc}", path=part) from None
                done += len(block)
                if progress:
                    progress(done, total)
            with contextlib.suppress(OSError):
                os.fsync(handle.fileno())
    if total is None:
        return  # nothing to check the length against; the digest checks below still apply
    if done < total:
        raise _Retry(f"the connection closed after {done} of {total} bytes")
