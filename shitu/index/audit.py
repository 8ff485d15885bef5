"""A gallery that checks itself: suspicious items of an index, found from the stored vectors.

Findings (each a list in the report):

- ``duplicates``: groups of items that are the same picture: the same file bytes (SHA-256 of the stored
  path; the images are read only for that) or near-identical vectors (cosine >= ``identical``). A group
  with more than one label is a sure labelling mistake.
- ``mislabels``: pairs of items under different labels whose vectors are nearly the same picture
  (cosine >= ``near_duplicate``): likely one of them is mislabelled.
- ``split_labels``: labels whose items fall into groups that are far apart. Two items of a label are
  linked when their similarity reaches the median, over all items, of the similarity to the nearest item
  of *another* label (a link weaker than that is weaker than a typical confusion). A label with two or
  more linked groups is reported with its groups when its groups are also unusually far apart *for this
  gallery*: their best link is an outlier below the similarities of every item to its nearest item of
  the same label (Tukey's lower fence, ``Q1 - split_fence * IQR``, default 1.5). So a gallery where every
  product has a catalogue picture and a shelf photo that look little alike (a property of the gallery, not
  a mistake) does not flag every label; a label whose pictures are much farther apart than usual does.
- ``hubs``: items that are the nearest neighbour of at least ``hub_count`` items of other labels: they
  attract wrong matches (a generic background, a catalogue picture of a look-alike...).

Neighbours come from the index's own search (exact for small indexes), so the cost grows with N·k, not N².
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.index.core import Item, RetrievalIndex

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"
#: Up to this many items the neighbours are found by exact search.
EXACT_UP_TO = 20_000


def _item(item: Item) -> dict[str, Any]:
    return {"key": item.key, "label": item.label, "path": item.path}


class _Groups:
    """Union-find over positions 0..n-1 (a dozen lines; networkx would be a dependency for this alone)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)

    def groups(self) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            found.setdefault(self.find(i), []).append(i)
        return sorted(found.values(), key=lambda members: (-len(members), members[0]))


@dataclass
class AuditReport:
    """What :func:`audit_index` found; :meth:`to_json` is the report file's content."""

    index: str | None
    count: int
    num_labels: int
    thresholds: dict[str, float]
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    mislabels: list[dict[str, Any]] = field(default_factory=list)
    split_labels: list[dict[str, Any]] = field(default_factory=list)
    hubs: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "duplicates": len(self.duplicates),
            "mislabels": len(self.mislabels),
            "split_labels": len(self.split_labels),
            "hubs": len(self.hubs),
            "unreadable": len(self.unreadable),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "count": self.count,
            "num_labels": self.num_labels,
            "thresholds": self.thresholds,
            "found": self.counts(),
            "duplicates": self.duplicates,
            "mislabels": self.mislabels,
            "split_labels": self.split_labels,
            "hubs": self.hubs,
            "unreadable": self.unreadable,
            "files": self.files,
        }


def _file_digest(path: str) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def audit(
    index: RetrievalIndex,
    *,
    near_duplicate: float = 0.95,
    identical: float = 0.9999,
    hub_count: int = 3,
    k: int = 10,
    hash_files: bool = True,
    split_fence: float = 1.5,
) -> AuditReport:
    """Audit ``index`` (see the module docstring for what is looked for and the thresholds)."""
    items, vectors = index.vectors()
    n = len(items)
    labels = np.asarray([item.label for item in items], np.int64)
    report = AuditReport(
        index=str(index.path) if index.path is not None else None,
        count=n,
        num_labels=len(set(labels.tolist())),
        thresholds={"near_duplicate": near_duplicate, "identical": identical, "hub_count": hub_count},
    )
    if n < 2:
        return report
    position = {item.key: i for i, item in enumerate(items)}
    neighbours = index.search(vectors, min(k + 1, n), exact=n <= EXACT_UP_TO)

    # Duplicates: same bytes, or near-identical vectors among the neighbours.
    same = _Groups(n)
    same_bytes: set[int] = set()
    if hash_files:
        by_digest: dict[str, int] = {}
        for i, item in enumerate(items):
            digest = _file_digest(item.path)
            if digest is None:
                report.unreadable.append(item.path)
            elif digest in by_digest:
                same.join(i, by_digest[digest])
                same_bytes.update((i, by_digest[digest]))
            else:
                by_digest[digest] = i
    pairs: dict[tuple[int, int], float] = {}
    for i, hits in enumerate(neighbours):
        for hit in hits:
            j = position[hit.key]
            if j != i:
                pairs[(min(i, j), max(i, j))] = max(pairs.get((min(i, j), max(i, j)), -1.0), hit.score)
    for (i, j), score in pairs.items():
        if score >= identical:
            same.join(i, j)
    for members in same.groups():
        if len(members) < 2:
            continue
        group_labels = sorted({int(labels[m]) for m in members})
        report.duplicates.append(
            {
                "items": [_item(items[m]) for m in members],
                "labels": group_labels,
                "conflicting_labels": len(group_labels) > 1,
                "same_bytes": all(m in same_bytes for m in members),
            }
        )
    report.duplicates.sort(key=lambda group: (not group["conflicting_labels"], group["items"][0]["key"]))

    # Near-duplicates under different labels.
    for (i, j), score in sorted(pairs.items(), key=lambda pair: -pair[1]):
        if score >= near_duplicate and labels[i] != labels[j]:
            report.mislabels.append({"a": _item(items[i]), "b": _item(items[j]), "score": round(float(score), 6)})

    # Labels split in far-apart groups: the link threshold is the median nearest-other-label similarity.
    nearest_other = [next((h.score for h in hits if h.label != labels[i]), None) for i, hits in enumerate(neighbours)]
    known = [score for score in nearest_other if score is not None]
    link = float(np.median(known)) if known else 1.0
    within: dict[int, np.ndarray] = {}
    nearest_same: list[float] = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        if len(members) >= 2:
            sims = vectors[members] @ vectors[members].T
            within[label] = sims
            nearest_same.extend(np.where(np.eye(len(members), dtype=bool), -np.inf, sims).max(axis=1).tolist())
    # Tukey's fence: a robust "far below the usual" that needs no distribution and ignores a few outliers
    q1, q3 = np.quantile(nearest_same, [0.25, 0.75]) if nearest_same else (-1.0, -1.0)
    unusual = float(q1 - split_fence * (q3 - q1))
    report.thresholds["split_link"] = round(link, 6)
    report.thresholds["split_unusual_below"] = round(unusual, 6)
    for label, sims in within.items():
        members = np.flatnonzero(labels == label)
        groups = _Groups(len(members))
        for a, b in zip(*np.nonzero(np.triu(sims >= link, 1)), strict=True):
            groups.join(int(a), int(b))
        found = groups.groups()
        if len(found) < 2:
            continue
        first = np.asarray(found[0])
        rest = np.setdiff1d(np.arange(len(members)), first)
        if sims[np.ix_(first, rest)].max() >= unusual:
            continue  # split, but no farther apart than this gallery's labels usually are
        report.split_labels.append(
            {
                "label": int(label),
                "groups": [[_item(items[members[m]]) for m in group] for group in found],
                "best_link": round(float(sims[np.ix_(first, rest)].max()), 6),
            }
        )

    # Hubs: the nearest neighbour (itself and its duplicates aside) of many items of other labels.
    pulled: dict[int, list[int]] = {}
    for i, hits in enumerate(neighbours):
        first_other = next((position[h.key] for h in hits if position[h.key] != i and same.find(position[h.key])
                            != same.find(i)), None)  # fmt: skip
        if first_other is not None and labels[first_other] != labels[i]:
            pulled.setdefault(first_other, []).append(i)
    for hub, sources in sorted(pulled.items(), key=lambda pair: (-len(pair[1]), pair[0])):
        if len(sources) >= hub_count:
            report.hubs.append(
                {
                    "item": _item(items[hub]),
                    "count": len(sources),
                    "pulled": [_item(items[s]) for s in sources],
                }
            )
    return report


def _cells(entries: Sequence[dict[str, Any]], caption: str = "") -> str:
    from shitu.demo.report import thumbnail_uri

    parts = ['<div class="row">']
    for entry in entries:
        parts.append(
            f'<div class="cell"><img alt="key {entry["key"]}" src="{thumbnail_uri(entry["path"])}">'
            f"<br>label {entry['label']} · key {entry['key']}<br>{html.escape(Path(entry['path']).name)}</div>"
        )
    if caption:
        parts.append(f'<div class="arrow">{html.escape(caption)}</div>')
    parts.append("</div>")
    return "".join(parts)


def write_html(report: AuditReport, target: Path) -> Path:
    """A self-contained page (thumbnails inlined) with every finding side by side."""
    from shitu.demo.report import Report, table

    page = Report(title="Gallery audit", subtitle=f"{report.index} · {report.count} items, {report.num_labels} labels")
    page.add("Summary", table(["finding", "count"], list(report.counts().items())))
    page.add(
        "Same picture, stored more than once",
        "".join(
            _cells(group["items"], ("different labels!" if group["conflicting_labels"] else "same label")
                   + (" · same bytes" if group["same_bytes"] else " · same vector"))
            for group in report.duplicates
        ) or "<p>none</p>",
    )  # fmt: skip
    page.add(
        "Near-duplicates under different labels (likely mislabels)",
        "".join(_cells([pair["a"], pair["b"]], f"cosine {pair['score']:.4f}") for pair in report.mislabels)
        or "<p>none</p>",
    )
    page.add(
        "Labels split into far-apart groups",
        "".join(
            f"<h3>label {split['label']} (best link between groups {split['best_link']:.4f})</h3>"
            + "".join(_cells(group, f"group {n + 1}") for n, group in enumerate(split["groups"]))
            for split in report.split_labels
        )
        or "<p>none</p>",
    )
    page.add(
        "Hubs: nearest neighbour of many other labels' items",
        "".join(
            _cells([hub["item"]], f"pulls {hub['count']} items:") + _cells(hub["pulled"][:8]) for hub in report.hubs
        )
        or "<p>none</p>",
    )
    return page.write(target)


def default_output(index_dir: str | os.PathLike[str]) -> Path:
    """``INDEX_DIR-audit`` beside the index (the index folder holds only its own files)."""
    folder = Path(index_dir).absolute()
    return folder.with_name(folder.name + "-audit")


def audit_index(
    index_dir: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    near_duplicate: float = 0.95,
    identical: float = 0.9999,
    hub_count: int = 3,
    k: int = 10,
) -> AuditReport:
    """Open the index, :func:`audit` it, and write ``audit.json`` and ``audit.html`` to ``output`` (default
    :func:`default_output`), both atomically."""
    from shitu.fileio import atomic_write_json
    from shitu.index.core import open_index

    report = audit(open_index(index_dir), near_duplicate=near_duplicate, identical=identical, hub_count=hub_count, k=k)
    folder = Path(output) if output is not None else default_output(index_dir)
    report.files = {"json": str(folder / AUDIT_JSON), "html": str(folder / AUDIT_HTML)}
    write_html(report, folder / AUDIT_HTML)
    atomic_write_json(folder / AUDIT_JSON, report.to_json())
    return report
