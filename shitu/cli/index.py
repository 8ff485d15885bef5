"""``shitu index build|add|remove|info|eval`` and ``shitu search``: retrieval indexes of gallery features."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from shitu.cli._distributed import (
    CoordinatorOption,
    DistributedOption,
    NumProcessesOption,
    ProcessIdOption,
    join,
)
from shitu.cli._options import JsonOption
from shitu.cli._output import Output
from shitu.cli._shared import shown_warnings as _shown_warnings
from shitu.errors import ShituError

index_app = typer.Typer(
    name="index",
    help="Build, change, inspect and evaluate retrieval indexes (usearch HNSW, cosine similarity).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class IndexDtype(StrEnum):
    f32 = "f32"
    f16 = "f16"
    i8 = "i8"


IndexOption = Annotated[Path, typer.Option("--index", help="The index folder.")]
ModelDirOption = Annotated[
    Path | None,
    typer.Option("--model-dir", help="Model bundle to embed with (default: the one the index was built with)."),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")]
InputsArgument = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders (recursive), globs ('photos/**/*'), .txt/.lst lists of paths, http(s) URLs, "
        "or '-' to read paths from stdin."
    ),
]


@index_app.command("build")
def build(
    model_dir: Annotated[Path, typer.Option("--model-dir", help="The model bundle that embeds the gallery.")],
    gallery: Annotated[
        Path, typer.Option("--gallery", help="A '<path> <label>' list (e.g. DATASET/gallery.txt) or a dataset folder.")
    ],
    output: Annotated[Path, typer.Option("--output", help="The index folder to write.")],
    dtype: Annotated[IndexDtype, typer.Option("--dtype", help="How vectors are stored.")] = IndexDtype.f32,
    batch_size: BatchSizeOption = 32,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index.")] = False,
    json: JsonOption = False,
    distributed: DistributedOption = False,
    coordinator: CoordinatorOption = None,
    num_processes: NumProcessesOption = None,
    process_id: ProcessIdOption = None,
) -> int:
    """Embed the gallery images and write a retrieval index.

    Paths in the list are relative to its folder (the dataset root). Unreadable images are reported and
    left out; the index of the others is still written, and the exit code is 1. With several processes
    (--distributed, or --coordinator/--num-processes/--process-id) each embeds its share of the gallery and
    process 0 writes the index.
    """
    from shitu.index.ops import build_gallery_index
    from shitu.runtime import configure_jax

    out, primary = join(
        json, distributed=distributed, coordinator=coordinator, num_processes=num_processes, process_id=process_id
    )
    configure_jax()
    with out.progress() as progress, _shown_warnings(out):
        built = build_gallery_index(
            gallery,
            output,
            model_dir=model_dir,
            dtype=dtype.value,
            batch_size=batch_size,
            overwrite=overwrite,
            primary=primary,
            report=out.problem,
            progress=progress,
        )
    failures = built.failures
    if built.index is None:  # process 0 writes the index
        return 1 if failures else 0
    index = built.index
    out.emit({**index.info, "failures": failures, "seconds": round(built.seconds, 3)})
    out.info(
        f"[green]Indexed[/] {len(index)} images of {index.info['num_labels']} labels "
        f"({index.dtype}, {index.dim} dims) into {output} in {built.seconds:.1f} s"
        + (f"; [red]{len(failures)} left out[/]" if failures else "")
    )
    return 1 if failures else 0


@index_app.command("add")
def add(
    index_dir: IndexOption,
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Images, folders, globs, .txt files of paths, or '-' for stdin.")
    ] = None,
    label: Annotated[int | None, typer.Option("--label", help="The label of every INPUT.")] = None,
    list_file: Annotated[
        Path | None, typer.Option("--list", help="A '<path> <label>' list instead of INPUT and --label.")
    ] = None,
    model_dir: ModelDirOption = None,
    batch_size: BatchSizeOption = 32,
    json: JsonOption = False,
) -> int:
    """Embed more images and add them to an index (new keys; the index is rewritten as a unit)."""
    from shitu.index.ops import add_to_index
    from shitu.runtime import configure_jax

    out = Output(json)
    configure_jax()
    with out.progress() as progress, _shown_warnings(out):
        result = add_to_index(
            index_dir,
            inputs=inputs,
            label=label,
            list_file=list_file,
            model_dir=model_dir,
            batch_size=batch_size,
            stdin=sys.stdin,
            report=out.problem,
            progress=progress,
        )
    index = result.index
    out.emit({"index": str(index.path), "added": result.added, "count": len(index), "failures": result.failures})
    out.info(f"[green]Added[/] {len(result.added)} images; the index holds {len(index)}")
    return 1 if result.failures else 0


@index_app.command("remove")
def remove(
    index_dir: IndexOption,
    keys_or_paths: Annotated[list[str], typer.Argument(help="Keys or stored image paths to remove.")],
    json: JsonOption = False,
) -> int:
    """Remove items by key or by path (all or nothing: an unknown one removes none)."""
    from shitu.index import open_index

    out = Output(json)
    index = open_index(index_dir)
    removed = index.remove(keys_or_paths)
    index.save()
    out.emit(
        {
            "index": str(index.path),
            "removed": [{"key": it.key, "label": it.label, "path": it.path} for it in removed],
            "count": len(index),
        }
    )
    out.info(f"[green]Removed[/] {len(removed)} items; the index holds {len(index)}")
    return 0


@index_app.command("info")
def info(index_dir: IndexOption, json: JsonOption = False) -> int:
    """Describe an index (and verify its files: checksums, counts, dimensions)."""
    from rich.markup import escape
    from rich.table import Table

    from shitu.index import open_index

    out = Output(json)
    doc = open_index(index_dir).info
    out.emit(doc)
    table = Table(title=escape(str(doc["path"])), title_justify="left", show_header=False)
    for key, value in doc.items():
        if key == "recognizer":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(key, escape(str(value)))
    out.render(table)
    return 0


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ShituError(f"-k expects comma-separated integers such as 1,5, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ShituError(f"-k expects positive integers, got {text!r}")
    return ks


@index_app.command("eval")
def evaluate(
    index_dir: IndexOption,
    dataset: Annotated[Path, typer.Option("--dataset", help="Dataset folder whose query.txt is searched.")],
    model_dir: ModelDirOption = None,
    k: Annotated[str, typer.Option("-k", help="Comma-separated k values.")] = "1,5",
    batch_size: BatchSizeOption = 32,
    json: JsonOption = False,
) -> int:
    """Approximate search against exact search on the dataset's queries, and the top-1 label accuracy.

    recall@k: the exact nearest item is within the approximate top k. match@k: the approximate top k is
    the exact top k. vote@k: the label voted over the approximate top k is the query's.
    """
    from rich.table import Table

    from shitu.index import open_index
    from shitu.index.ops import evaluate_index, load_recognizer_for
    from shitu.runtime import configure_jax

    out = Output(json)
    ks = _parse_ks(k)
    configure_jax()
    index = open_index(index_dir)
    with _shown_warnings(out):
        recognizer = load_recognizer_for(index, model_dir)
    with out.progress() as progress:
        result = evaluate_index(
            index, recognizer, dataset, ks=ks, batch_size=batch_size, progress=lambda n: progress("embedding", n, None)
        )
    for failure in result.failures:
        out.problem("error", failure)
    out.emit(result.to_json())
    table = Table(title=f"{result.num_queries} queries", title_justify="left")
    for column in ("k", "ANN recall", "ANN top-k = exact", "vote accuracy"):
        table.add_column(column, justify="right")
    for value in ks:
        table.add_row(
            str(value),
            f"{result.recall[value]:.4f}",
            f"{result.topk_match[value]:.4f}",
            f"{result.accuracy_vote[value]:.4f}",
        )
    out.render(table)
    out.info(f"top-1 label accuracy: {result.accuracy_top1:.4f} (exact search: {result.accuracy_top1_exact:.4f})")
    return 1 if result.failures else 0


def search(
    inputs: InputsArgument,
    index_dir: Annotated[Path | None, typer.Option("--index", help="The index folder.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Hits per input.")] = 5,
    exact: Annotated[bool, typer.Option("--exact", help="Compare with every stored vector (no HNSW).")] = False,
    model_dir: ModelDirOption = None,
    batch_size: BatchSizeOption = 32,
    server: Annotated[
        str | None, typer.Option("--server", help="Search the gallery of a running 'shitu serve' at this URL.")
    ] = None,
    json: JsonOption = False,
) -> int:
    """Find the nearest gallery items of each input image, and the label they vote for.

    With --json, one line per input on stdout: {"input", "label", "score", "hits": [{"key", "label", "path",
    "score"}]}, hits best first; score is the cosine similarity. Unreadable inputs are reported on stderr, the
    others still run, and the exit code is then 1.
    """
    from rich.markup import escape

    from shitu.index.ops import search_images
    from shitu.runtime import configure_jax

    out = Output(json)
    errors: list[str] = []

    def report(severity: str, message: str) -> None:
        if severity == "error":
            errors.append(message)
        out.problem(severity, message)

    if server is not None:
        return _search_remote(out, server, inputs, k=k, batch_size=batch_size)
    if index_dir is None:
        raise ShituError("give --index DIR (or --server URL)")
    configure_jax()
    with _shown_warnings(out):
        results = search_images(
            index_dir,
            inputs,
            k=k,
            exact=exact,
            model_dir=model_dir,
            batch_size=batch_size,
            stdin=sys.stdin,
            report=report,
        )
        for result in results:
            out.emit(result.to_json())
            out.info(f"[bold]{escape(result.input)}[/] → label {result.label} (score {result.score:.4f})")
            for rank, hit in enumerate(result.hits, start=1):
                out.info(f"  {rank:>2}. {hit.score:.4f}  label {hit.label:<6} key {hit.key:<6} {escape(hit.path)}")
    return 1 if errors else 0


def _search_remote(out: Output, server: str, inputs: list[str], *, k: int, batch_size: int) -> int:
    """``search --server``: the inputs are read here and searched in the server's default gallery."""
    from rich.markup import escape

    from shitu.data.inputs import resolve
    from shitu.serve.client import remote_search

    resolved = resolve(inputs, stdin=sys.stdin, urls=False)
    for problem in resolved.problems:
        out.problem("error", problem)
    for result in remote_search(server, resolved.paths, k=k, batch_size=batch_size):
        out.emit(result)
        out.info(f"[bold]{escape(result['input'])}[/] → label {escape(str(result['label']))} ({result['score']:.4f})")
    return 1 if resolved.problems else 0


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.command("search")(search)
