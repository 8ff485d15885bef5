"""``shitu index build|add|remove|info|eval`` and ``shitu search``: retrieval indexes of gallery features."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

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
    list[str], typer.Argument(help="Image files, folders (searched recursively) or .txt files listing image paths.")
]


def _report_failures(out: Output, messages: list[str]) -> None:
    for message in messages:
        out.problem("error", message)


def _embed(out: Output, recognizer: Any, paths: list[str], batch_size: int) -> Any:
    with out.progress() as progress:
        return recognizer.embed(paths, batch_size=batch_size, progress=lambda n: progress("embedding", n, len(paths)))


@index_app.command("build")
def build(
    ctx: typer.Context,
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
    from shitu.index import build_index
    from shitu.index.core import check_replaceable, index_lock
    from shitu.index.ops import load_recognizer_for, read_labelled_list
    from shitu.runtime.distributed import embed_sharded, shard_range

    out, primary = join(
        json, distributed=distributed, coordinator=coordinator, num_processes=num_processes, process_id=process_id
    )
    listed = read_labelled_list(gallery, default_split="gallery")
    for warning in listed.warnings:
        out.warning(warning)
    if listed.errors:
        _report_failures(out, listed.errors)
        raise ShituError(f"{len(listed.errors)} problems in the gallery list; nothing was written", path=listed.file)
    if primary:  # the writer holds the index's lock to the end: a second build is refused at once
        ctx.with_resource(index_lock(output))
    check_replaceable(output.absolute(), overwrite=overwrite)  # before the embedding, which takes a while
    started = time.perf_counter()
    recognizer = load_recognizer_for(None, model_dir)
    with out.progress() as progress:
        here = len(shard_range(len(listed.paths)))
        embedded = embed_sharded(
            recognizer, listed.paths, batch_size=batch_size, progress=lambda n: progress("embedding", n, here)
        )
    failures = [f.message for f in embedded.failures]
    _report_failures(out, failures)
    if not embedded.indices:
        raise ShituError("no gallery image could be embedded; nothing was written", path=listed.file)
    if not primary:  # process 0 writes the index
        return 1 if failures else 0
    index = build_index(
        embedded.features,
        [listed.labels[i] for i in embedded.indices],
        [listed.paths[i] for i in embedded.indices],
        output=output,
        recognizer_info=recognizer.describe(),
        dtype=dtype.value,
        overwrite=overwrite,
    )
    seconds = time.perf_counter() - started
    out.emit({**index.info, "failures": failures, "seconds": round(seconds, 3)})
    out.info(
        f"[green]Indexed[/] {len(index)} images of {index.info['num_labels']} labels "
        f"({index.dtype}, {index.dim} dims) into {output} in {seconds:.1f} s"
        + (f"; [red]{len(failures)} left out[/]" if failures else "")
    )
    return 1 if failures else 0


@index_app.command("add")
def add(
    index_dir: IndexOption,
    inputs: Annotated[list[str] | None, typer.Argument(help="Images, folders or .txt files of paths.")] = None,
    label: Annotated[int | None, typer.Option("--label", help="The label of every INPUT.")] = None,
    list_file: Annotated[
        Path | None, typer.Option("--list", help="A '<path> <label>' list instead of INPUT and --label.")
    ] = None,
    model_dir: ModelDirOption = None,
    batch_size: BatchSizeOption = 32,
    json: JsonOption = False,
) -> int:
    """Embed more images and add them to an index (new keys; the index is rewritten as a unit)."""
    from shitu.index import open_index
    from shitu.index.inputs import resolve_inputs
    from shitu.index.ops import load_recognizer_for, read_labelled_list

    out = Output(json)
    if (list_file is None) == (label is None) or (list_file is not None and inputs):
        raise ShituError("give INPUT... with --label N, or --list FILE.txt alone")
    index = open_index(index_dir)
    problems: list[str] = []
    if list_file is not None:
        listed = read_labelled_list(list_file)
        for warning in listed.warnings:
            out.warning(warning)
        problems += listed.errors
        paths, labels = listed.paths, listed.labels
    else:
        resolved = resolve_inputs(inputs or [])
        problems += resolved.problems
        paths = [str(Path(p).absolute()) for p in resolved.paths]
        labels = [int(label)] * len(paths)  # type: ignore[arg-type]
    _report_failures(out, problems)
    recognizer = load_recognizer_for(index, model_dir)
    embedded = _embed(out, recognizer, paths, batch_size)
    failures = [f.message for f in embedded.failures]
    _report_failures(out, failures)
    known = {item.path for item in index.items}
    for i in embedded.indices:
        if paths[i] in known:
            out.warning(f"{paths[i]} is already in the index; added again under a new key")
    keys = index.add(embedded.features, [labels[i] for i in embedded.indices], [paths[i] for i in embedded.indices])
    if keys:
        index.save()
    added = [{"key": key, "label": labels[i], "path": paths[i]} for key, i in zip(keys, embedded.indices, strict=True)]
    out.emit({"index": str(index.path), "added": added, "count": len(index), "failures": problems + failures})
    out.info(f"[green]Added[/] {len(keys)} images; the index holds {len(index)}")
    return 1 if problems or failures else 0


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

    out = Output(json)
    ks = _parse_ks(k)
    index = open_index(index_dir)
    recognizer = load_recognizer_for(index, model_dir)
    with out.progress() as progress:
        result = evaluate_index(
            index, recognizer, dataset, ks=ks, batch_size=batch_size, progress=lambda n: progress("embedding", n, None)
        )
    _report_failures(out, result.failures)
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
    index_dir: IndexOption,
    k: Annotated[int, typer.Option("-k", min=1, help="Hits per input.")] = 5,
    exact: Annotated[bool, typer.Option("--exact", help="Compare with every stored vector (no HNSW).")] = False,
    model_dir: ModelDirOption = None,
    batch_size: BatchSizeOption = 32,
    json: JsonOption = False,
) -> int:
    """Find the nearest gallery items of each input image, and the label they vote for.

    With --json, one line per input on stdout: {"input", "label", "score", "hits": [{"key", "label", "path",
    "score"}]}, hits best first; score is the cosine similarity. Unreadable inputs are reported on stderr, the
    others still run, and the exit code is then 1.
    """
    from rich.markup import escape

    from shitu.index import open_index, vote
    from shitu.index.inputs import resolve_inputs
    from shitu.index.ops import load_recognizer_for

    out = Output(json)
    index = open_index(index_dir)
    resolved = resolve_inputs(inputs)
    _report_failures(out, resolved.problems)
    failed = bool(resolved.problems)
    recognizer = load_recognizer_for(index, model_dir)
    paths = resolved.paths
    for indices, features, failures in recognizer.iter_batches(paths, batch_size=batch_size):
        _report_failures(out, [f.message for f in failures])
        failed = failed or bool(failures)
        for position, hits in zip(indices, index.search(features, k, exact=exact), strict=True):
            label, score = vote(hits)
            out.emit({"input": paths[position], "label": label, "score": score, "hits": [h.to_json() for h in hits]})
            out.info(f"[bold]{escape(paths[position])}[/] → label {label} (score {score:.4f})")
            for rank, hit in enumerate(hits, start=1):
                out.info(f"  {rank:>2}. {hit.score:.4f}  label {hit.label:<6} key {hit.key:<6} {escape(hit.path)}")
    return 1 if failed else 0


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.command("search")(search)
