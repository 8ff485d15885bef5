"""``shitu convert``: a foreign dataset layout into ShiTuRecDataset lists, in place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shitu.cli._options import JsonOption
from shitu.cli._output import Output
from shitu.cli._shared import report_broken_plugins


def convert(
    dataset: Annotated[Path, typer.Argument(help="The dataset folder, converted in place.")],
    source: Annotated[
        str | None, typer.Option("--from", help="Source format (see 'shitu plugins'); detected when omitted.")
    ] = None,
    train: Annotated[int | None, typer.Option("--train", help="Percent of images for train.")] = None,
    gallery: Annotated[int | None, typer.Option("--gallery", help="Percent of images for the gallery.")] = None,
    query: Annotated[int | None, typer.Option("--query", help="Percent of images for queries.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shuffle.")] = 0,
    by: Annotated[str, typer.Option("--by", help="Split by 'image' (closed-set) or 'class' (open-set).")] = "image",
    json: JsonOption = False,
) -> int:
    """Convert a dataset (LabelMe, ImageFolder via its plugin, ...) into ShiTuRecDataset lists.

    Writes train.txt, gallery.txt, query.txt (and label.txt) in the folder; files it replaces are kept
    as .bak. Without --train/--gallery/--query the format's own split applies (LabelMe: 50/30/20 in order).
    """
    from shitu.data.convert import convert_dataset
    from shitu.formats import SplitOptions

    out = Output(json)
    report_broken_plugins(out)
    options = None
    if any(v is not None for v in (train, gallery, query)):
        from shitu.errors import ShituError

        if None in (train, gallery, query):
            raise ShituError("give all three of --train, --gallery and --query, or none")
        options = SplitOptions(train=train, gallery=gallery, query=query, seed=seed, by=by)  # type: ignore[arg-type]
    name, written, notes = convert_dataset(dataset, source_format=source, options=options)
    for note in notes:
        out.warning(note)
    out.emit({"source_format": name, **written.to_json(), "notes": notes})
    counts = ", ".join(f"{k} {v}" for k, v in written.counts.items())
    out.info(f"[green]Converted[/] {dataset} from {name} to ShiTuRecDataset: {counts}")
    for backup in written.backups:
        out.info(f"kept the previous {backup.name.split('.bak')[0]} as {backup}")
    return 0


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
