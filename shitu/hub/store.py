"""The model cache: published weights fetched once, verified, and kept under ``shitu.runtime.cache_dir()``.

Layout::

    CACHE/models/NAME/                 the inference bundle (what ``create_model(NAME)`` loads)
      shitu_source.json                where it came from: URL, size and sha256 of the archive
    CACHE/hub/NAME/                    downloads of model NAME; the folder is also its lock
      record.json                      size and sha256 of every file first downloaded, by file name
      NAME_pretrained.pdparams         the training weights
      NAME_infer.tar.part              an interrupted download, resumed by the next call

A bundle is built from the extracted archive in a staging folder and published in one rename, so a kill at
any moment leaves no half bundle where a loader looks; the archive itself is removed once imported. A
process holds the lock of ``CACHE/hub/NAME`` while it fetches, so two processes asking for one model at once
download it once: the second waits, then finds it cached.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shitu.errors import ShituError
from shitu.fileio import atomic_directory, atomic_write_json, folder_lock
from shitu.hub.download import PART_SUFFIX, Downloaded, Progress, download, file_sha256
from shitu.hub.sources import PublishedWeights, mirrored

SOURCE_FILE = "shitu_source.json"
RECORD_FILE = "record.json"
_EXTRACT_PREFIX = ".extract-"


@dataclass(frozen=True)
class CachedFile:
    """A cached download: where it is, its size and sha256, and the URL it came from."""

    kind: str  # "bundle" or "pretrained"
    path: Path
    size: int
    sha256: str
    url: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "size": self.size, "sha256": self.sha256, "url": self.url}


# -- where things are -----------------------------------------------------------------------------------


def _cache() -> Path:
    from shitu.runtime import cache_dir

    return cache_dir()


def _plain_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or name.startswith("."):
        raise ShituError(f"model name {name!r} cannot name a cache folder")
    return name


def bundle_path(name: str) -> Path:
    """Where the inference bundle of model ``name`` is installed (``installed_bundle`` looks there)."""
    return _cache() / "models" / _plain_name(name)


def downloads_path(name: str) -> Path:
    """The folder of model ``name``'s downloads and its lock."""
    return _cache() / "hub" / _plain_name(name)


def _spec(spec_or_name: Any) -> Any:
    if isinstance(spec_or_name, str):
        from shitu.plugins import get_host

        return get_host().model(spec_or_name)
    return spec_or_name


def _published(spec: Any) -> PublishedWeights:
    published = getattr(spec, "published", None)
    if published is None:
        raise ShituError(
            f"model {spec.name} names no published weights", hint="import weights with shitu import-weights"
        )
    return published


@contextmanager
def _locked(name: str) -> Iterator[Path]:
    """Hold model ``name``'s download lock (:func:`shitu.fileio.folder_lock` on its downloads folder)."""
    folder = downloads_path(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShituError(f"cannot create the model cache: {exc.strerror or exc}", path=folder) from None
    with folder_lock(folder, wait=True):
        _remove_leftovers(name)
        yield folder


def _remove_leftovers(name: str) -> None:
    """What a killed fetch leaves besides its ``.part``: extraction folders and staged bundles. Lock held."""
    for leftover in downloads_path(name).glob(f"{_EXTRACT_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    models = bundle_path(name).parent
    # atomic_directory stages in ".NAME.*.tmp" (and save_bundle inside it in "..NAME.*"); an ".old" copy is
    # atomic_directory's own to put back or remove
    for pattern in (f".{name}.*.tmp", f"..{name}.*"):
        for leftover in models.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


# -- the record of first downloads ----------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ShituError(f"cannot read the download record: {exc}", path=path, hint="delete it to start over") from None
    if not isinstance(document, dict):
        raise ShituError("the download record is not a JSON object", path=path, hint="delete it to start over")
    return document


def _recorded(name: str, file_name: str) -> dict[str, Any] | None:
    entry = _read_json(downloads_path(name) / RECORD_FILE).get("files", {}).get(file_name)
    return entry if isinstance(entry, dict) else None


def _record(name: str, file_name: str, url: str, size: int, sha256: str) -> None:
    path = downloads_path(name) / RECORD_FILE
    document = _read_json(path)
    files = document.setdefault("files", {})
    if file_name not in files:  # the first download's digest is kept: later ones are checked against it
        files[file_name] = {
            "url": url,
            "size": size,
            "sha256": sha256,
            "downloaded": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        atomic_write_json(path, document)


# -- progress -------------------------------------------------------------------------------------------


@contextmanager
def _progress_bar(label: str, show: bool) -> Iterator[Progress | None]:
    """A rich bar on stderr (size, speed, time left) while a file downloads; nothing when stderr is no terminal."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bars.add_task(label, total=None)

    def update(done: int, total: int | None) -> None:
        bars.update(task, completed=done, total=total)

    with bars:
        yield update


# -- the public API -------------------------------------------------------------------------------------


def _manual_bundle_hint(name: str, url: str) -> str:
    archive = url.rsplit("/", 1)[-1]
    folder = archive.removesuffix(".tar")
    return (
        f"download {url} by hand, then run: tar -xf {archive} && "
        f"shitu import-weights {folder} --model {name} --output {bundle_path(name)}"
    )


def _download_checked(
    name: str,
    url: str,
    target: Path,
    *,
    label: str,
    what: str,
    hint: str,
    expected_size: int | None,
    expected_sha256: str | None,
    show_progress: bool,
) -> Downloaded:
    """:func:`download` ``url`` to ``target`` under a progress bar, checked also against the sha256 recorded
    when model ``name``'s file of that name was first downloaded. The caller holds the model's lock."""
    recorded = _recorded(name, target.name)
    with _progress_bar(label, show_progress) as progress:
        return download(
            url,
            target,
            what=what,
            hint=hint,
            expected_size=expected_size,
            expected_sha256=expected_sha256,
            recorded_sha256=recorded["sha256"] if recorded else None,
            progress=progress,
        )


def ensure_inference_bundle(spec_or_name: Any, *, show_progress: bool = True) -> Path:
    """The inference bundle of a model (a registered name or a ``ModelSpec``), fetched if not cached.

    A bundle installed at ``cache_dir()/models/NAME`` is returned as it is, without touching the network
    (``shitu import-weights ... --output`` that folder installs one by hand). Otherwise the spec's published
    inference archive is downloaded (resumably; verified), extracted safely, imported with
    :func:`shitu.weights.importer.import_weights` and published atomically. Raises ShituError when the model
    publishes no weights, when offline (``SHITU_OFFLINE=1``) or unreachable (naming the URL to fetch by hand
    and the command that installs it), and when a download or archive is refused.
    """
    from shitu.models.bundle import INFO_FILE

    spec = _spec(spec_or_name)
    target = bundle_path(spec.name)
    if (target / INFO_FILE).is_file():
        return target
    published = _published(spec)
    if not published.inference_url:
        raise ShituError(f"model {spec.name} publishes no inference model")
    url = mirrored(published.inference_url)
    hint = _manual_bundle_hint(spec.name, url)
    with _locked(spec.name) as folder:
        if (target / INFO_FILE).is_file():  # another process installed it while we waited for the lock
            return target
        archive_name = published.inference_url.rsplit("/", 1)[-1] or f"{spec.name}_infer.tar"
        archive = folder / archive_name
        fetched = _download_checked(
            spec.name,
            url,
            archive,
            label=f"{spec.name} inference model",
            what=f"the inference model of {spec.name}",
            hint=hint,
            expected_size=published.inference_size,
            expected_sha256=published.inference_sha256,
            show_progress=show_progress,
        )
        try:
            _install_bundle(spec, archive, target, url=url, size=fetched.size, sha256=fetched.sha256)
        finally:
            archive.unlink(missing_ok=True)  # a refused archive is not kept; an imported one is not needed
        _record(spec.name, archive_name, url, fetched.size, fetched.sha256)
    return target


def _install_bundle(spec: Any, archive: Path, target: Path, *, url: str, size: int, sha256: str) -> None:
    from shitu.weights.importer import import_weights

    extract = Path(tempfile.mkdtemp(dir=archive.parent, prefix=_EXTRACT_PREFIX))
    try:
        from shitu.hub.archive import find_inference_model, safe_extract

        safe_extract(archive, extract)
        model_folder = find_inference_model(extract)
        if target.exists() and not target.is_dir():
            raise ShituError("exists and is not a model bundle folder; refusing to replace it", path=target)
        if target.is_dir() and any(target.iterdir()):
            raise ShituError(
                "exists and is not a shitu model bundle; refusing to replace it",
                path=target,
                hint="move it away to let shitu install the published weights there",
            )
        with atomic_directory(target) as staging:
            try:
                import_weights(spec.name, model_folder, staging)
            except ShituError as exc:
                raise ShituError(f"the archive from {url} cannot be imported: {exc}") from None
            atomic_write_json(
                staging / SOURCE_FILE, {"url": url, "archive": archive.name, "size": size, "sha256": sha256}
            )
    finally:
        shutil.rmtree(extract, ignore_errors=True)


def published_training_weights(spec_or_name: Any, *, show_progress: bool = True) -> Path:
    """The published training weights (``.pdparams``) of a model, fetched if not cached.

    A cached file is checked against the sha256 recorded when it was first downloaded: a file changed since
    is a ShituError (delete it to download it again). Offline, unreachable and refused downloads are
    ShituErrors as for :func:`ensure_inference_bundle`.
    """
    spec = _spec(spec_or_name)
    published = _published(spec)
    if not published.pretrained_url:
        raise ShituError(f"model {spec.name} publishes no training weights")
    return training_weights_from_url(spec, published.pretrained_url, show_progress=show_progress)


def training_weights_from_url(spec_or_name: Any, url: str, *, show_progress: bool = True) -> Path:
    """Training weights (a ``.pdparams`` or other weight file) at ``url``, cached beside the model's other
    downloads: what ``Train.pretrain_weight_path`` means when it is an http(s) URL, as in PaddleX's configs.

    The model's published training weights keep their published size and sha256 checks; ``SHITU_MODEL_MIRROR``
    applies to every URL. Cached files are checked as for :func:`published_training_weights`.
    """
    spec = _spec(spec_or_name)
    published = spec.published
    is_published = published is not None and url == published.pretrained_url
    expected_size = published.pretrained_size if is_published else None
    expected_sha256 = published.pretrained_sha256 if is_published else None
    file_name = _plain_name(url.rsplit("/", 1)[-1].split("?", 1)[0] or f"{spec.name}_pretrained.pdparams")
    target = downloads_path(spec.name) / file_name
    if target.is_file():  # only ever replaced whole (a rename), so it can be read without the lock
        _verify_cached(spec.name, target)
        return target
    url = mirrored(url)
    hint = f"download {url} by hand and save it as {target}"
    with _locked(spec.name):
        if target.is_file():
            _verify_cached(spec.name, target)
            return target
        fetched = _download_checked(
            spec.name,
            url,
            target,
            label=f"{spec.name} training weights",
            what=f"the training weights file of {spec.name}",
            hint=hint,
            expected_size=expected_size,
            expected_sha256=expected_sha256,
            show_progress=show_progress,
        )
        _record(spec.name, file_name, url, fetched.size, fetched.sha256)
    return target


def _verify_cached(name: str, path: Path) -> None:
    """A cached download must still have the sha256 recorded when it was downloaded."""
    entry = _recorded(name, path.name)
    if entry is None:
        return  # placed there by hand: nothing to compare with
    digest = file_sha256(path)
    if digest != entry.get("sha256"):
        raise ShituError(
            f"the cached file changed since it was downloaded: sha256 {digest}, recorded {entry.get('sha256')}",
            path=path,
            hint="delete it to download it again",
        )


def cached_files(spec_or_name: Any) -> list[CachedFile]:
    """What the cache holds for a model: its bundle (with the archive it came from) and training weights."""
    from shitu.models.bundle import INFO_FILE

    spec = _spec(spec_or_name)
    found: list[CachedFile] = []
    bundle = bundle_path(spec.name)
    if (bundle / INFO_FILE).is_file():
        source = {}
        with suppress(ShituError):
            source = _read_json(bundle / SOURCE_FILE)
        size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and not p.is_symlink())
        found.append(
            CachedFile(
                "bundle", bundle, size, str(source.get("sha256", "")), str(source.get("url", "imported by hand"))
            )
        )
    folder = downloads_path(spec.name)
    published = getattr(spec, "published", None)
    if published is not None and published.pretrained_url:
        file_name = published.pretrained_url.rsplit("/", 1)[-1]
        path = folder / file_name
        if path.is_file():
            entry = {}
            with suppress(ShituError):
                entry = _recorded(spec.name, file_name) or {}
            found.append(
                CachedFile(
                    "pretrained", path, path.stat().st_size, str(entry.get("sha256", "")), str(entry.get("url", ""))
                )
            )
    return found


def partial_downloads(name: str) -> list[Path]:
    """Interrupted downloads of model ``name`` that the next fetch resumes."""
    return sorted(downloads_path(name).glob(f"*{PART_SUFFIX}"))
