"""The service's galleries: retrieval indexes that change while they are searched, and survive crashes.

Layout of the state folder (``--state-dir``, default ``shitu.runtime.cache_dir()/serve``)::

    STATE/galleries/NAME/
      index/         the last compacted RetrievalIndex folder (see shitu.index.core), saved as a unit
      journal.log    the writes since then, one fsynced record each (see shitu.serve.journal)
      labels.json    label names by label number (names are only ever added)

A write is acknowledged only after its journal record is on disk, then applied in memory under the write
side of a reader-writer lock, so a search sees a write whole or not at all. At startup the journal is
replayed onto the index, which is then saved and the journal emptied (compaction); compaction also runs
every ``compact_every`` records and at shutdown. Replaying is idempotent (an add whose keys the index has
already given out, or a removal of keys it no longer holds, is skipped), so a crash between the save and
the emptying of the journal does no harm.

Each stored item keeps the SHA-256 of the image it came from (in the index's ``path`` field, as
``upload:<sha256>`` or ``upload:<sha256>:<ref>`` with the client's own reference), so adding the same image
again returns the item already stored instead of a duplicate, unless asked.
"""

from __future__ import annotations

import base64
import itertools
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError

GALLERIES = "galleries"
INDEX_DIR = "index"
JOURNAL_FILE = "journal.log"
LABELS_FILE = "labels.json"
DEFAULT_GALLERY = "default"
UPLOAD_PREFIX = "upload:"
#: Gallery names: what PaddleX's ``indexKey`` may be; never a path.
GALLERY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: A client's own reference of an item: printable, no separators that could confuse a log line.
REF_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")


class NotFound(ShituError):
    """A gallery, item or label that does not exist (HTTP 404)."""


class Conflict(ShituError):
    """A write that contradicts what is stored, such as a reference already in use (HTTP 409)."""


class ReadWriteLock:
    """Many readers or one writer; a waiting writer keeps new readers out, so writes are never starved.

    The standard library has no reader-writer lock and the well-kept ones are asyncio-only; searches run in
    worker threads, so this is a threading one (a condition variable and two counters)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


@dataclass(frozen=True)
class StoredItem:
    """One gallery item as the API shows it."""

    id: int
    label: str
    sha256: str | None
    ref: str | None
    source: str | None  # the image path of an item imported from an index built offline

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "sha256": self.sha256, "ref": self.ref, "source": self.source}


@dataclass(frozen=True)
class Match:
    """One search result."""

    id: int
    label: str
    score: float
    ref: str | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "score": self.score, "ref": self.ref}


@dataclass(frozen=True)
class Added:
    """What an add did for one image: its id, and whether it was already stored (same content)."""

    id: int
    existing: bool


def _parse_path(path: str) -> tuple[str | None, str | None, str | None]:
    """``(sha256, ref, source)`` of an index item's path field."""
    if path.startswith(UPLOAD_PREFIX):
        digest, _, ref = path[len(UPLOAD_PREFIX) :].partition(":")
        return digest, ref or None, None
    return None, None, path


def _encode_vectors(matrix: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(matrix, dtype="<f4").tobytes()).decode("ascii")


def _decode_vectors(text: str, rows: int, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(rows, dim).astype(np.float32)


class Gallery:
    """One named, live, durable gallery. Methods are thread-safe; they may block on disk writes."""

    def __init__(self, name: str, folder: Path, index: Any, names: dict[int, str], compact_every: int) -> None:
        from shitu.serve.journal import Journal

        self.name = name
        self.folder = folder
        self.index = index
        self.compact_every = compact_every
        self._lock = ReadWriteLock()
        self._writer = threading.Lock()  # one write at a time: journal order = apply order
        self._names: dict[int, str] = dict(names)
        self._numbers: dict[str, int] = {}
        self._meta: dict[int, tuple[int, str | None, str | None, str | None]] = {}
        self._by_hash: dict[str, dict[int, None]] = {}  # content hash → the keys stored with it, oldest first
        self._by_ref: dict[str, int] = {}
        self._by_label: dict[int, dict[int, None]] = {}
        for item in index.items:
            self._remember(item.key, item.label, item.path)
        self._numbers = {name: number for number, name in self._names.items()}
        self.journal, records = Journal.open(folder / JOURNAL_FILE)
        replayed = sum(self._replay(record) for record in records)
        if records:
            self.compact()
        self.replayed = replayed

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _label_name(self, number: int) -> str:
        if number not in self._names:
            self._names[number] = str(number)  # an index built offline has numbers only
            self._numbers.setdefault(str(number), number)
        return self._names[number]

    def _remember(self, key: int, label: int, path: str) -> None:
        digest, ref, source = _parse_path(path)
        self._label_name(label)
        self._meta[key] = (label, digest, ref, source)
        if digest is not None:
            self._by_hash.setdefault(digest, {})[key] = None
        if ref is not None:
            self._by_ref[ref] = key
        self._by_label.setdefault(label, {})[key] = None

    def _forget(self, key: int) -> None:
        label, digest, ref, _ = self._meta.pop(key)
        copies = self._by_hash.get(digest) if digest is not None else None
        if copies is not None:
            copies.pop(key, None)
            if not copies:
                del self._by_hash[digest]  # type: ignore[arg-type]
        if ref is not None:
            self._by_ref.pop(ref, None)
        members = self._by_label.get(label)
        if members is not None:
            members.pop(key, None)
            if not members:
                del self._by_label[label]

    def _item(self, key: int) -> StoredItem:
        label, digest, ref, source = self._meta[key]
        return StoredItem(key, self._names[label], digest, ref, source)

    # -- journal --------------------------------------------------------------------------------------
    def _apply(self, record: dict[str, Any]) -> None:
        """Apply a journal record to the index and the bookkeeping (the caller holds the write lock)."""
        if record["op"] == "add":
            rows = record["rows"]
            vectors = _decode_vectors(record["vectors"], len(rows), self.index.dim)
            for row in rows:
                self._names.setdefault(int(row["label"]), str(row["name"]))
                self._numbers.setdefault(str(row["name"]), int(row["label"]))
            keys = self.index.add(vectors, [int(r["label"]) for r in rows], [str(r["path"]) for r in rows])
            if keys and keys[0] != record["first_key"]:
                raise ShituError(
                    f"journal record gave keys from {record['first_key']}, the index from {keys[0]}",
                    path=self.journal.path,
                )
            for key, row in zip(keys, rows, strict=True):
                self._remember(key, int(row["label"]), str(row["path"]))
        elif record["op"] == "remove":
            present = [key for key in record["keys"] if key in self._meta]
            if present:
                self.index.remove(present)
            for key in present:
                self._forget(key)
        else:
            raise ShituError(f"unknown journal record {record['op']!r}", path=self.journal.path)

    def _replay(self, record: dict[str, Any]) -> bool:
        """Apply a record found at startup unless the index already holds it; True if applied."""
        if record.get("op") == "add" and int(record["first_key"]) < int(self.index.info["next_key"]):
            return False
        if record.get("op") == "remove" and not any(key in self._meta for key in record["keys"]):
            return False
        with self._lock.write():
            self._apply(record)
        return True

    def _commit(self, record: dict[str, Any]) -> None:
        """Make ``record`` durable, then visible (the caller holds ``_writer``)."""
        self.journal.append(record)
        with self._lock.write():
            self._apply(record)
        if self.journal.records >= self.compact_every:
            self._compact_locked()

    def compact(self) -> None:
        """Save the index as a unit and empty the journal."""
        with self._writer:
            self._compact_locked()

    def _compact_locked(self) -> None:
        from shitu.fileio import atomic_write_json

        with self._lock.read():
            # Names first: they are only ever added, so names ahead of the index are harmless.
            atomic_write_json(self.folder / LABELS_FILE, {"names": {str(k): v for k, v in self._names.items()}})
            self.index.save(self.folder / INDEX_DIR, overwrite=True)
        self.journal.reset()

    def close(self) -> None:
        with self._writer:
            if self.journal.records:
                self._compact_locked()
            self.journal.close()

    # -- writes ---------------------------------------------------------------------------------------
    def add(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        digests: Sequence[str],
        refs: Sequence[str | None] | None = None,
        *,
        allow_duplicates: bool = False,
    ) -> list[Added]:
        """Store one item per feature row; returns each row's id (an image already stored, by content hash,
        gives its existing id unless ``allow_duplicates``). A ``ref`` already in use is a :class:`Conflict`."""
        refs = list(refs) if refs is not None else [None] * len(labels)
        if not len(features) == len(labels) == len(digests) == len(refs):
            raise ShituError("features, labels, hashes and refs differ in number")
        with self._writer:
            seen_refs = [ref for ref in refs if ref is not None]
            taken = [ref for ref in seen_refs if ref in self._by_ref]
            if taken or len(set(seen_refs)) != len(seen_refs):
                raise Conflict(f"ref already in use: {(taken or seen_refs)[0]!r}")
            results: list[Added | None] = [None] * len(labels)
            new_rows: list[int] = []
            first_in_request: dict[str, int] = {}
            for position, digest in enumerate(digests):
                if not allow_duplicates and refs[position] is None:
                    if digest in self._by_hash:
                        results[position] = Added(next(iter(self._by_hash[digest])), True)
                        continue
                    if digest in first_in_request:
                        continue  # resolved below, once its first copy has an id
                    first_in_request[digest] = position
                new_rows.append(position)
            next_label = max(self._names, default=-1) + 1
            numbers: dict[str, int] = {}
            rows = []
            for position in new_rows:
                name = labels[position]
                number = self._numbers.get(name, numbers.get(name))
                if number is None:
                    number = numbers[name] = next_label
                    next_label += 1
                ref = refs[position]
                path = f"{UPLOAD_PREFIX}{digests[position]}" + (f":{ref}" if ref is not None else "")
                rows.append({"label": number, "name": name, "path": path})
            first_key = int(self.index.info["next_key"])
            if rows:
                vectors = np.asarray(features, dtype=np.float32)[new_rows]
                self._commit({"op": "add", "first_key": first_key, "rows": rows, "vectors": _encode_vectors(vectors)})
            for offset, position in enumerate(new_rows):
                results[position] = Added(first_key + offset, False)
            for position, digest in enumerate(digests):
                if results[position] is None:
                    results[position] = Added(results[first_in_request[digest]].id, True)  # type: ignore[union-attr]
            return [result for result in results if result is not None]

    def remove(
        self,
        *,
        ids: Sequence[int] = (),
        labels: Sequence[str] = (),
        refs: Sequence[str] = (),
    ) -> list[StoredItem]:
        """Remove the items named by id, label or ref, all or nothing: an unknown id or ref is
        :class:`NotFound` (an unknown label just matches nothing). Returns what was removed."""
        with self._writer:
            unknown = [str(i) for i in ids if i not in self._meta] + [r for r in refs if r not in self._by_ref]
            if unknown:
                raise NotFound(f"no such item: {', '.join(unknown[:5])}")
            keys = set(ids) | {self._by_ref[r] for r in refs}
            for name in labels:
                number = self._numbers.get(name)
                if number is not None:
                    keys.update(self._by_label.get(number, {}))
            ordered = sorted(keys)
            removed = [self._item(key) for key in ordered]
            if ordered:
                self._commit({"op": "remove", "keys": ordered})
            return removed

    # -- reads ----------------------------------------------------------------------------------------
    def search(
        self, features: np.ndarray, *, k: int, min_score: float = -1.0, labels: Sequence[str] | None = None
    ) -> list[list[Match]]:
        """The ``k`` best matches of each query row with a score of at least ``min_score``, best first;
        with ``labels``, only items of those labels."""
        with self._lock.read():
            total = len(self.index)
            wanted = None
            if labels is not None:
                wanted = {self._numbers[name] for name in labels if name in self._numbers}
            results: list[list[Match]] = []
            for query in np.asarray(features, dtype=np.float32):
                tried = k if wanted is None else min(total, max(4 * k, 64))
                while True:
                    hits = self.index.search(query, k=max(1, tried))[0] if total else []
                    kept = [h for h in hits if h.score >= min_score and (wanted is None or h.label in wanted)]
                    if len(kept) >= k or tried >= total or (hits and hits[-1].score < min_score) or not wanted:
                        break
                    tried = min(total, tried * 4)
                results.append(
                    [Match(h.key, self._names[h.label], float(h.score), self._meta[h.key][2]) for h in kept[:k]]
                )
            return results

    def get(self, item_id: int) -> StoredItem:
        with self._lock.read():
            if item_id not in self._meta:
                raise NotFound(f"no such item: {item_id}")
            return self._item(item_id)

    def by_ref(self, ref: str) -> StoredItem:
        with self._lock.read():
            if ref not in self._by_ref:
                raise NotFound(f"no item with ref {ref!r}")
            return self._item(self._by_ref[ref])

    def page(self, *, offset: int, limit: int, label: str | None = None) -> tuple[list[StoredItem], int]:
        """Items in id order from ``offset``, at most ``limit``, and how many there are in all."""
        with self._lock.read():
            if label is None:
                keys: Any = self._meta
            else:
                number = self._numbers.get(label)
                keys = self._by_label.get(number, {}) if number is not None else {}
            return [self._item(key) for key in itertools.islice(keys, offset, offset + limit)], len(keys)

    def id_map(self) -> dict[int, str]:
        """Every id with its label name (PaddleX's ``idMap``)."""
        with self._lock.read():
            return {key: self._names[meta[0]] for key, meta in self._meta.items()}

    def info(self) -> dict[str, Any]:
        with self._lock.read():
            info = self.index.info
            return {
                "name": self.name,
                "count": len(self._meta),
                "num_labels": len(self._by_label),
                "dim": info["dim"],
                "dtype": info["dtype"],
                "metric": info["metric"],
                "recognizer": info.get("recognizer"),
                "pending_journal_records": self.journal.records,
            }

    def __len__(self) -> int:
        return len(self._meta)


class GalleryStore:
    """The galleries under ``STATE/galleries``, opened (journals replayed) at startup."""

    def __init__(
        self, state_dir: Path, recognizer_info: dict[str, Any], *, dtype: str = "f32", compact_every: int = 256
    ):
        self.root = Path(state_dir).absolute() / GALLERIES
        self.recognizer_info = dict(recognizer_info)
        self.dtype = dtype
        self.compact_every = compact_every
        self._galleries: dict[str, Gallery] = {}
        self._lock = threading.Lock()

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not GALLERY_NAME.fullmatch(name):
            raise ShituError(f"invalid gallery name {name!r} (1-64 letters, digits, '_' or '-')")
        return name

    def open_all(self, seed_index: Path | None = None) -> None:
        """Open every gallery on disk; create the default one (from ``seed_index`` when given) if missing."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and GALLERY_NAME.fullmatch(folder.name):
                self._galleries[folder.name] = self._open(folder)
        if DEFAULT_GALLERY not in self._galleries:
            self._galleries[DEFAULT_GALLERY] = self._create(DEFAULT_GALLERY, seed_index=seed_index)

    def _open(self, folder: Path) -> Gallery:
        from shitu.index.core import open_index

        if (folder / INDEX_DIR).exists():
            index = open_index(folder / INDEX_DIR, recognizer_info=self.recognizer_info)
        else:
            index = _empty_index(self.recognizer_info, self.dtype)
        return Gallery(folder.name, folder, index, _read_names(folder), self.compact_every)

    def _create(self, name: str, *, seed_index: Path | None = None) -> Gallery:
        """A new gallery, empty or a copy of the index folder ``seed_index``, written as a unit."""
        from shitu.fileio import atomic_directory, atomic_write_json
        from shitu.index.core import open_index

        target = self.root / self.check_name(name)
        if target.exists():
            raise Conflict(f"gallery {name!r} exists already")
        if seed_index is not None:
            index = open_index(seed_index, recognizer_info=self.recognizer_info)
        else:
            index = _empty_index(self.recognizer_info, self.dtype)
        with atomic_directory(target) as staging:
            index.save(staging / INDEX_DIR)
            atomic_write_json(staging / LABELS_FILE, {"names": {}})
        return self._open(target)

    def create(self, name: str) -> Gallery:
        """Create the empty gallery ``name`` (a :class:`Conflict` if it exists)."""
        with self._lock:
            if name in self._galleries:
                raise Conflict(f"gallery {name!r} exists already")
            gallery = self._galleries[name] = self._create(name)
            return gallery

    def get(self, name: str | None) -> Gallery:
        name = self.check_name(name or DEFAULT_GALLERY)
        gallery = self._galleries.get(name)
        if gallery is None:
            raise NotFound(f"no gallery {name!r}")
        return gallery

    def names(self) -> list[str]:
        return sorted(self._galleries)

    def close(self) -> None:
        for gallery in self._galleries.values():
            gallery.close()


def _read_names(folder: Path) -> dict[int, str]:
    import json

    file = folder / LABELS_FILE
    if not file.is_file():
        return {}
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        return {int(number): str(name) for number, name in doc["names"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ShituError(f"unreadable label names: {exc}", path=file) from None


def _empty_index(recognizer_info: dict[str, Any], dtype: str) -> Any:
    from shitu.index.core import build_index

    dim = int(recognizer_info["embedding_size"])
    return build_index(
        np.zeros((0, dim), np.float32), [], [], output=None, recognizer_info=recognizer_info, dtype=dtype
    )
