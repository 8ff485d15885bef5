"""``shitu demo``: check → train → evaluate → index → search on the bundled grocery photos, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from shitu.cli._options import JsonOption
from shitu.cli._output import Output


def demo_command(
    output: Annotated[Path, typer.Option("--output", help="Folder for everything the demo writes.")] = Path(
        "shitu-demo"
    ),
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            help="quick: 64 px, a few minutes on 2 CPU cores; full: PaddleX's recipe at 224 px (long on a CPU).",
        ),
    ] = "quick",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier demo in --output.")] = False,
    json: JsonOption = False,
) -> int:
    """Run the whole job on real photos that ship with shitu and write OUTPUT/report.html.

    Checks the bundled dataset (20 grocery products), measures the untrained model, trains
    PP-ShiTuV2_rec, measures it again, builds a vector index of the gallery and recognises held-out photos.
    """
    from shitu.demo.run import BUDGETS, run_demo
    from shitu.errors import ShituError
    from shitu.runtime import configure_jax

    out = Output(json)
    if budget not in BUDGETS:
        raise ShituError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    configure_jax()
    plan = BUDGETS[budget]
    out.info(
        f"[bold]shitu demo[/] · budget {plan.name}: PP-ShiTuV2_rec at {plan.input_size} px, {plan.epochs} epochs, "
        f"batch {plan.batch_size}{', from the bundled starting weights' if plan.start_weights else ''} → {output}"
    )
    renderer = _Renderer(out)
    result = run_demo(output, budget=plan, overwrite=overwrite, on_event=renderer)
    document = result.to_json()
    out.emit(document)
    _summary(out, document)
    return 0


class _Renderer:
    """Stage lines on stderr; one line per training epoch."""

    def __init__(self, out: Output) -> None:
        self.out = out

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        out = self.out
        if kind == "stage-start":
            out.info(f"[cyan]▶ {data['name']}[/]")
        elif kind == "stage":
            out.info(f"  done in {data['seconds']:.1f} s")
        elif kind == "train" and data.get("kind") == "epoch":
            parts = [f"epoch {data.get('epoch')}"]
            for key in ("loss", "recall1", "mAP"):
                if isinstance(data.get(key), (int, float)):
                    parts.append(f"{key} {data[key]:.4f}")
            if isinstance(data.get("images_per_s"), (int, float)):
                parts.append(f"{data['images_per_s']:.0f} img/s")
            out.info("  " + " · ".join(parts))
        elif kind == "train" and data.get("kind") == "warning":
            message = str(data.get("message"))
            if "head starts from random weights" in message:  # expected: the starting weights know other products
                out.info(f"  {message}")
            else:
                out.warning(message)


def _summary(out: Output, document: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="Retrieval on held-out photos", title_justify="left")
    columns = [("untrained", document["metrics_before"])]
    if document.get("metrics_start") is not None:
        columns = [("random", document["metrics_before"]), ("starting weights", document["metrics_start"])]
    columns.append(("trained", document["metrics_after"]))
    table.add_column("metric")
    for title, _ in columns:
        table.add_column(title, justify="right")
    for key in ("recall1", "recall5", "mAP"):
        table.add_row(key, *(f"{values.get(key, 0):.4f}" for _, values in columns))
    out.render(table)
    seconds = document["seconds"]
    out.info(
        "time: " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        + f" (total {sum(seconds.values()):.0f} s)"
    )  # fmt: skip
    searched = len(document["search"])
    out.info(f"recognised {document['search_accuracy']:.0%} of {searched} held-out query photos with the index")
    out.info(f"[green]report:[/] {document['report']}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
