"""``shitu models``: the registered models (size, input, embedding, compute) and what the cache holds;
``shitu models pull NAME`` fetches a model's published weights."""

from __future__ import annotations

from typing import Annotated

import typer

from shitu.cli._options import JsonOption
from shitu.cli._output import Output
from shitu.cli._shared import report_broken_plugins

models_app = typer.Typer(
    name="models",
    help="List models and their cached weights; pull published weights.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def _size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    return str(size)


def list_models(json: bool) -> int:
    """List models: name, parameters, input size, embedding size, GFLOPs per image, and cached weights."""
    from rich.markup import escape
    from rich.table import Table

    from shitu.hub import cached_files
    from shitu.models.info import model_facts
    from shitu.plugins import get_host
    from shitu.runtime import cache_dir

    out = Output(json)
    report_broken_plugins(out)
    specs = sorted(get_host().models.values(), key=lambda s: s.name)
    with out.progress() as progress:
        facts = []
        for spec in specs:
            facts.append(model_facts(spec))
            progress("measure models", 1, len(specs))
    cached = {spec.name: cached_files(spec) for spec in specs}
    out.emit(
        {"models": [{**f.to_json(), "cached": [c.to_json() for c in cached[f.name]]} for f in facts]}
    )  # fmt: skip
    table = Table(title="shitu models", title_justify="left")
    table.add_column("model", no_wrap=True)
    for column in ("parameters", "input", "embedding", "GFLOPs"):
        table.add_column(column, justify="right")
    any_cached = any(cached.values())
    if any_cached:  # only then: the table keeps its width otherwise
        table.add_column("cached")
    for f in facts:
        row = [
            escape(f.name), f"{f.parameters / 1e6:.2f}M", f"{f.input_size}²", str(f.embedding_size), f"{f.gflops:.2f}"
        ]  # fmt: skip
        if any_cached:
            row.append(escape(", ".join(f"{c.kind} {_size(c.size)}" for c in cached[f.name]) or "-"))
        table.add_row(*row)
    out.render(table)
    if not any_cached:
        out.info(f"No weights cached in {escape(str(cache_dir()))} yet ('shitu models pull NAME' fetches them).")
        return 0
    where = Table(title="cached weights", title_justify="left")
    for column in ("file", "size", "sha256", "source"):
        where.add_column(column, overflow="fold")
    for name in sorted(cached):
        for c in cached[name]:
            where.add_row(escape(str(c.path)), _size(c.size), c.sha256[:16] or "-", escape(c.url))
    out.render(where)
    return 0


@models_app.callback()
def models(ctx: typer.Context, json: JsonOption = False) -> int | None:
    """List models: name, parameters, input size, embedding size, GFLOPs per image, and cached weights."""
    if ctx.invoked_subcommand is None:
        return list_models(json)
    return None


@models_app.command("list")
def list_command(json: JsonOption = False) -> int:
    """List models and what the cache holds for each (path, size, sha256, source URL)."""
    return list_models(json)


@models_app.command("pull")
def pull(
    name: Annotated[str, typer.Argument(help="A registered model, e.g. PP-ShiTuV2_rec.")],
    pretrained: Annotated[
        bool,
        typer.Option("--pretrained", help="Fetch the training weights (.pdparams) instead of the inference model."),
    ] = False,
    json: JsonOption = False,
) -> int:
    """Fetch a model's published weights into the cache (once; later calls use the cache).

    The inference model becomes the bundle that `predict`, `eval` and `index` load by name; the training
    weights (--pretrained) are what `train` starts from. SHITU_MODEL_MIRROR=http://host:port fetches from a
    mirror; SHITU_OFFLINE=1 never downloads.
    """
    from rich.markup import escape

    from shitu.hub import cached_files, ensure_inference_bundle, published_training_weights
    from shitu.plugins import get_host
    from shitu.runtime import configure_jax

    out = Output(json)
    configure_jax()
    spec = get_host().model(name)
    path = published_training_weights(spec) if pretrained else ensure_inference_bundle(spec)
    kind = "pretrained" if pretrained else "bundle"
    entry = next((c for c in cached_files(spec) if c.kind == kind), None)
    document = entry.to_json() if entry else {"kind": kind, "path": str(path)}
    out.emit({"model": spec.name, **document})
    label = "Training weights" if pretrained else "Inference bundle"
    out.info(f"[green]{label}[/] of {escape(spec.name)}: {escape(str(path))}")
    return 0


def register(app: typer.Typer) -> None:
    app.add_typer(models_app)
