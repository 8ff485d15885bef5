"""``shitu convert``: a foreign dataset layout into ShiTuRecDataset lists, in place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shitu.cli._options import JsonOption
from shitu.cli._output import Output
from shitu.cli._shared import report_backups, report_broken_plugins


def convert(
    dataset: Annotated[Path, typer.Argument(help="The dataset folder, converted in place.")],
    source: Annotated[
        str | None, typer.Option("--from", help="Source format (see 'shitu plugins'); detected when omitted.")
    ] = None,
    train: Annotated[int | None, typer.Option("--train", help="Percent of images for train.")] = None,
    gallery: Annotated[int | None, typer.Option("--gallery", help="Percent of images for the gallery.")] = None,
    query: Annotated[int | None, typer.Option("--query", help="Percent of images for queries.")] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the shuffle (with --train/--gallery/--query; default 0).")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="Split by 'image' (closed-set, default) or 'class' (open-set); needs the percents."),
    ] = None,
    json: JsonOption = False,
) -> int:
    """Convert a dataset (LabelMe, ImageFolder via its plugin, ...) into ShiTuRecDataset lists.

    Writes train.txt, gallery.txt, query.txt (and label.txt) in the folder; files it replaces are kept
    as .bak. Without --train/--gallery/--query the format's own split applies (LabelMe: 50/30/20 in order).
    """
    from rich.markup import escape

    from shitu.data.convert import convert_dataset
    from shitu.data.formats import SplitOptions
    from shitu.errors import ShituError

    out = Output(json)
    report_broken_plugins(out)
    options = None
    if any(v is not None for v in (train, gallery, query)):
        if None in (train, gallery, query):
            raise ShituError("give all three of --train, --gallery and --query, or none")
        options = SplitOptions(train=train, gallery=gallery, query=query, seed=seed or 0, by=by or "image")  # type: ignore[arg-type]
    elif seed is not None or by is not None:
        raise ShituError("--seed and --by need --train, --gallery and --query (the format's own split has neither)")
    name, written, notes = convert_dataset(dataset, source_format=source, options=options)
    for note in notes:
        out.warning(note)
    out.emit({"source_format": name, **written.to_json(), "notes": notes})
    counts = ", ".join(f"{k} {v}" for k, v in written.counts.items())
    if written.changed:
        out.info(f"[green]Converted[/] {escape(str(dataset))} from {name} to ShiTuRecDataset: {counts}")
    else:
        out.info(f"{escape(str(dataset))} is already converted from {name} ({counts}): nothing changed")
    report_backups(out, written.backups)
    return 0


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
