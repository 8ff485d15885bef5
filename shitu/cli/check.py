"""``shitu check``: validate a ShiTuRecDataset and write PaddleX's check outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shitu.cli._options import JsonOption, ModelOption, OutputDirOption, OverrideOption
from shitu.cli._output import Output
from shitu.cli._shared import report_broken_plugins
from shitu.errors import ShituError

MAX_LISTED = 50


def check(
    dataset: Annotated[
        Path | None, typer.Argument(help="Dataset root (holds train.txt, gallery.txt, query.txt).")
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Check the demo dataset that ships with shitu.")] = False,
    output: OutputDirOption = None,
    model: ModelOption = "PP-ShiTuV2_rec",
    override: OverrideOption = None,
    json: JsonOption = False,
) -> int:
    """Check a dataset: every list line and every image (decoded), with samples and a histogram.

    Writes OUTPUT/check_dataset_result.json, OUTPUT/check_dataset/demo_img/ and
    OUTPUT/check_dataset/histogram.png. Exits 1 when an error is found (warnings do not fail).
    As PaddleX, -o CheckDataset.convert.enable=True / CheckDataset.split.enable=True convert
    or re-split the dataset first.
    """
    from shitu.config import load_config
    from shitu.data.demo import demo_dataset_path
    from shitu.data.prepare import check_dataset_with_config

    out = Output(json)
    if demo == (dataset is not None):
        raise ShituError("give either a DATASET folder or --demo")
    config = load_config(model, list(override or []))
    target = demo_dataset_path() if demo else dataset
    report_broken_plugins(out)
    with out.progress() as progress:
        result, actions = check_dataset_with_config(target, config, output=output, on_progress=progress)
    for action in actions:
        out.info(action)
    doc = result.to_json()
    out.emit(doc)
    _render(out, result)
    return 0 if result.check_pass else 1


def _render(out: Output, result) -> None:
    from rich.table import Table

    for issue in (result.errors + result.warnings)[:MAX_LISTED]:
        out.problem(issue.severity, str(issue))
    hidden = len(result.issues) - MAX_LISTED
    if hidden > 0:
        out.info(f"… and {hidden} more problems (all in {result.output or 'the JSON result'})")
    table = Table(title=f"{result.dataset_path}", title_justify="left")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("classes", justify="right")
    for split in ("train", "gallery", "query"):
        table.add_row(split, str(len(result.entries[split])), str(len(result.class_counts(split))))
    out.render(table)
    summary = f"{len(result.errors)} errors, {len(result.warnings)} warnings; {len(result.images)} images decoded"
    if result.check_pass:
        out.info(f"[green]Check dataset passed[/] ({summary})")
    else:
        out.info(f"[red]Check dataset failed[/] ({summary})")
    if result.output is not None:
        out.info(f"results: {result.output / 'check_dataset_result.json'}")


def register(app: typer.Typer) -> None:
    app.command("check")(check)
