"""``shitu import-weights``: PaddleClas / PaddleX weights into a shitu model bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shitu.cli._options import JsonOption
from shitu.cli._output import Output


def import_weights(
    file: Annotated[Path, typer.Argument(help="A .pdparams file, or a Paddle inference model (file or folder).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Which model the weights are for.")],
    output: Annotated[Path, typer.Option("--output", help="The bundle folder to write.")],
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", help="Training-head classes (default: the file's head).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    json: JsonOption = False,
) -> int:
    """Import Paddle weights into a bundle that eval, predict and train --pretrained accept.

    A .pdparams file is read with a restricted unpickler: a file that would run code is refused.
    Parameters whose shape differs (e.g. a head for another class count) are listed and skipped.
    """
    from rich.markup import escape

    from shitu.runtime import configure_jax
    from shitu.weights.importer import import_weights as run_import

    out = Output(json)
    configure_jax()
    result = run_import(model, file, output, num_classes=num_classes, overwrite=overwrite)
    out.emit(result.to_json())
    report = result.report
    for key, file_shape, model_shape in report.skipped:
        out.warning(f"skipped {key}: shape {list(file_shape)} in the file, {list(model_shape)} in the model")
    if report.unused:
        out.info(f"{len(report.unused)} keys of the file are not used by the model (e.g. {report.unused[0]})")
    out.info(
        f"[green]Imported[/] {len(report.loaded)} tensors of {escape(result.model)} ({result.source}) into "
        f"{escape(str(result.bundle))}"
    )
    return 0


def register(app: typer.Typer) -> None:
    app.command("import-weights")(import_weights)
