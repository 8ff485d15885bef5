"""Self-contained HTML reports: one file, every image embedded, no network needed to open it.

Written by hand rather than with a template engine: the page is a handful of sections, tables and
thumbnails, and a dependency for that would be heavier than the code.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu.fileio import atomic_write_text

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 1rem; }
h1 { font-size: 1.8rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: .8rem 0; } th, td { padding: .35rem .8rem; border-bottom: 1px solid #eee;
       text-align: right; } th:first-child, td:first-child { text-align: left; } th { background: #f6f6f6; }
img.figure { max-width: 100%; border: 1px solid #eee; }
.grid { display: flex; flex-direction: column; gap: .6rem; }
.row { display: flex; gap: .5rem; align-items: flex-start; }
.cell { width: 112px; font-size: .72rem; text-align: center; word-break: break-all; }
.cell img { width: 104px; height: 104px; object-fit: cover; border: 4px solid #ccc; border-radius: 4px; }
.cell.query img { border-color: #3b6fd8; } .cell.hit img { border-color: #2e9e44; }
.cell.miss img { border-color: #d33b3b; } .arrow { align-self: center; font-size: 1.4rem; color: #999; }
.note { color: #555; font-size: .9rem; }
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_tag(source: str | os.PathLike[str] | bytes, alt: str) -> str:
    """An <img> holding a PNG file (or PNG bytes) inline."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return f'<img class="figure" alt="{html.escape(alt)}" src="{_data_uri(data, "image/png")}">'


def thumbnail_uri(path: str | os.PathLike[str], size: int = 104) -> str:
    """A small JPEG of an image file, as a data URI (a grey square if it cannot be read)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image) or image
            image = image.convert("RGB")
            image.thumbnail((size * 2, size * 2))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=82)
    except (OSError, ValueError):
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), (200, 200, 200)).save(buffer, format="JPEG")
    return _data_uri(buffer.getvalue(), "image/jpeg")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; floats are shown with 4 decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class MatchRow:
    """One query and its ranked matches: (path, label, score) each; ``label_names`` maps labels to text."""

    query_path: str
    query_label: int | None
    matches: list[tuple[str, int, float]]
    predicted_label: int | None = None


def match_grid(rows: Sequence[MatchRow], label_names: dict[int, str] | None = None) -> str:
    """Queries with their top matches, framed green (same label as the query) or red (another label)."""
    names = label_names or {}

    def name(label: int | None) -> str:
        if label is None:
            return "?"
        return names.get(label, str(label))

    parts = ['<div class="grid">']
    for row in rows:
        parts.append('<div class="row">')
        caption = f"query: {name(row.query_label)}"
        parts.append(
            f'<div class="cell query"><img alt="query" src="{thumbnail_uri(row.query_path)}">'
            f'<br>{html.escape(caption)}</div><div class="arrow">&rarr;</div>'
        )
        for rank, (path, label, score) in enumerate(row.matches, start=1):
            kind = "hit" if row.query_label is not None and label == row.query_label else "miss"
            mark = "right" if kind == "hit" else "wrong"
            parts.append(
                f'<div class="cell {kind}"><img alt="match {rank}" src="{thumbnail_uri(path)}">'
                f"<br>#{rank} {html.escape(name(label))}<br>{score:.3f} ({mark})</div>"
            )
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


@dataclass
class Report:
    """A report built section by section and written as one HTML file."""

    title: str
    subtitle: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, heading: str, body_html: str) -> None:
        self.sections.append((heading, body_html))

    def to_html(self) -> str:
        body = "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in self.sections)
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{html.escape(self.title)}</h1>{sub}{body}</body></html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the page atomically; returns its path."""
        target = Path(path)
        atomic_write_text(target, self.to_html())
        return target
