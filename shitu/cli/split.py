"""``shitu split``: re-divide a ShiTuRecDataset into train / gallery / query."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shitu.cli._options import JsonOption
from shitu.cli._output import Output
from shitu.cli._shared import report_backups


def split(
    dataset: Annotated[Path, typer.Argument(help="Dataset root (holds train.txt, gallery.txt, query.txt).")],
    train: Annotated[int, typer.Option("--train", help="Percent of images (or classes, with --by class) for train.")],
    gallery: Annotated[int, typer.Option("--gallery", help="Percent for the gallery.")],
    query: Annotated[int, typer.Option("--query", help="Percent for queries.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same split.")] = 0,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="'image': shuffle images (PaddleX, closed-set); 'class': whole classes "
            "to train, the others' images to gallery/query (open-set).",
        ),
    ] = "image",
    json: JsonOption = False,
) -> int:
    """Re-split all images of the three lists; the old lists are kept as .bak files."""
    from rich.markup import escape

    from shitu.data.formats import SplitOptions
    from shitu.data.split import split_dataset

    out = Output(json)
    written = split_dataset(dataset, SplitOptions(train=train, gallery=gallery, query=query, seed=seed, by=by))  # type: ignore[arg-type]
    out.emit(written.to_json())
    counts = ", ".join(f"{k} {v}" for k, v in written.counts.items())
    if written.changed:
        out.info(f"[green]Split[/] {escape(str(written.root))} by {escape(by)} (seed {seed}): {counts}")
    else:
        out.info(f"{escape(str(written.root))} is already split this way ({counts}): nothing changed")
    report_backups(out, written.backups)
    return 0


def register(app: typer.Typer) -> None:
    app.command("split")(split)
