"""``shitu models``: the registered models with their size, input, embedding and compute."""

from __future__ import annotations

import typer

from shitu.cli._options import JsonOption
from shitu.cli._output import Output
from shitu.cli._shared import report_broken_plugins


def models(json: JsonOption = False) -> int:
    """List models: name, parameters, input size, embedding size and GFLOPs per image."""
    from rich.markup import escape
    from rich.table import Table

    from shitu.models.info import model_facts
    from shitu.plugins import get_host

    out = Output(json)
    report_broken_plugins(out)
    specs = sorted(get_host().models.values(), key=lambda s: s.name)
    with out.progress() as progress:
        facts = []
        for spec in specs:
            facts.append(model_facts(spec))
            progress("measure models", 1, len(specs))
    out.emit({"models": [f.to_json() for f in facts]})
    table = Table(title="shitu models", title_justify="left")
    table.add_column("model", no_wrap=True)
    for column in ("parameters", "input", "embedding", "GFLOPs"):
        table.add_column(column, justify="right")
    for f in facts:
        table.add_row(
            escape(f.name), f"{f.parameters / 1e6:.2f}M", f"{f.input_size}²", str(f.embedding_size),
            f"{f.gflops:.2f}",
        )  # fmt: skip
    out.render(table)
    return 0


def register(app: typer.Typer) -> None:
    app.command("models")(models)
