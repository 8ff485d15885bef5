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
from shitu.cli._options import (
    Backend,
    BackendOption,
    CalibrationOption,
    JsonOption,
    ModelNameOption,
    Precision,
    PrecisionOption,
    RandomWeightsOption,
)
from shitu.cli._output import Output
from shitu.cli._shared import chosen_backend
from shitu.cli._shared import shown_warnings as _shown_warnings
from shitu.errors import ShituError

index_app = typer.Typer(
    name="index",
    help="Build, change, inspect and evaluate retrieval indexes (usearch HNSW, cosine similarity).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class IndexDtype(StrEnum):
    auto = "auto"
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    i8 = "i8"


IndexOption = Annotated[Path, typer.Option("--index", help="The index folder.")]
ModelDirOption = Annotated[
    Path | None,
    typer.Option("--model-dir", help="Model bundle to embed with (default: the one the index was built with)."),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")]
MinScoreOption = Annotated[
    float | None,
    typer.Option(
        "--min-score", help="Answer 'unknown' when the best label's score is below this (default: the index's)."
    ),
]
MinMarginOption = Annotated[
    float | None,
    typer.Option(
        "--min-margin",
        help="Answer 'unknown' when the best label's score beats the next label's by less (default: the index's).",
    ),
]


class Vote(StrEnum):
    nearest = "nearest"
    rank = "rank"
    mean = "mean"
    sum = "sum"


VoteOption = Annotated[
    Vote | None,
    typer.Option("--vote", help="How the hits choose a label (default: the index's rule, else nearest)."),
]
InputsArgument = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders (recursive), globs ('photos/**/*'), .txt/.lst lists of paths, http(s) URLs, "
        "or '-' to read paths from stdin."
    ),
]


@index_app.command("build")
def build(
    gallery: Annotated[
        Path, typer.Option("--gallery", help="A '<path> <label>' list (e.g. DATASET/gallery.txt) or a dataset folder.")
    ],
    output: Annotated[Path, typer.Option("--output", help="The index folder to write.")],
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="The model bundle that embeds the gallery.")
    ] = None,
    model: ModelNameOption = None,
    random_weights: RandomWeightsOption = False,
    dtype: Annotated[
        IndexDtype,
        typer.Option(
            "--dtype",
            help="How the search graph stores vectors. auto: f32 under 100,000 images, else i8 with re-scoring.",
        ),
    ] = IndexDtype.auto,
    rescore: Annotated[
        int | None,
        typer.Option(
            "--rescore",
            min=0,
            help="Candidates per query re-scored exactly with float16 vectors kept beside the graph (0: off; "
            "default 20 for i8 and bf16, off for f32 and f16).",
        ),
    ] = None,
    batch_size: BatchSizeOption = 32,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index.")] = False,
    backend: BackendOption = Backend.jax,
    precision: PrecisionOption = Precision.fp32,
    calibration: CalibrationOption = None,
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
    with out.progress() as progress, _shown_warnings(out), chosen_backend(out, backend, precision, calibration):
        built = build_gallery_index(
            gallery,
            output,
            model_dir=model_dir,
            model=model,
            pretrained=not random_weights,
            dtype=dtype.value,
            rescore=rescore,
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
        f"({index.info.get('storage') or index.dtype}, {index.dim} dims) into {output} in {built.seconds:.1f} s"
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
    backend: BackendOption = Backend.jax,
    precision: PrecisionOption = Precision.fp32,
    calibration: CalibrationOption = None,
    json: JsonOption = False,
) -> int:
    """Embed more images and add them to an index (new keys; the index is rewritten as a unit)."""
    from shitu.index.ops import add_to_index
    from shitu.runtime import configure_jax

    out = Output(json)
    configure_jax()
    with out.progress() as progress, _shown_warnings(out), chosen_backend(out, backend, precision, calibration):
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


class HoldOut(StrEnum):
    image = "image"
    class_ = "class"


@index_app.command("calibrate")
def calibrate(
    index_dir: IndexOption,
    dataset: Annotated[Path, typer.Option("--dataset", help="Dataset folder whose query.txt is searched.")],
    by: Annotated[
        HoldOut, typer.Option("--by", help="Split fit and held-out queries by class (unseen products) or image.")
    ] = HoldOut.class_,
    target_precision: Annotated[
        float | None,
        typer.Option("--target-precision", min=0.0, max=1.0, help="Largest recall at this precision [default: 0.99]."),
    ] = None,
    max_f1: Annotated[bool, typer.Option("--max-f1", help="The rule of largest F1 instead.")] = False,
    vote: VoteOption = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Hits per query the vote sees.")] = 5,
    held_out: Annotated[
        float, typer.Option("--held-out", min=0.05, max=0.95, help="Share of the queries kept out of the fit.")
    ] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the fit/held-out split.")] = 0,
    confidence: Annotated[
        float,
        typer.Option(
            "--confidence",
            min=0.0,
            max=0.999,
            help="The fit queries must show the target precision with this confidence (0: as observed).",
        ),
    ] = 0.9,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Folder for calibration.json and .png (default: INDEX-calibration beside it)."),
    ] = None,
    model_dir: ModelDirOption = None,
    batch_size: BatchSizeOption = 32,
    json: JsonOption = False,
) -> int:
    """Choose the index's decision rule (minimum score and margin) from a dataset's queries, and store it.

    Each query is searched as a known item (whole gallery: its label is right) and as an unknown one (its
    class held out of the gallery: "unknown" is right). The rule is fit on part of the queries and its
    precision and recall are reported on the rest (--by class: products never seen while fitting).
    """
    from rich.table import Table

    from shitu.index.calibrate import calibrate_index, summarise
    from shitu.runtime import configure_jax

    out = Output(json)
    if max_f1 and target_precision is not None:
        raise ShituError("give --target-precision or --max-f1, not both")
    configure_jax()
    with out.progress() as progress, _shown_warnings(out):
        result = calibrate_index(
            index_dir,
            dataset,
            by=by.value,
            target_precision=0.99 if target_precision is None else target_precision,
            max_f1=max_f1,
            vote=vote.value if vote is not None else None,
            k=k,
            held_out=held_out,
            seed=seed,
            confidence=confidence,
            model_dir=model_dir,
            output=output,
            batch_size=batch_size,
            progress=lambda n: progress("embedding", n, None),
        )
    out.emit(result.to_json())
    table = Table(title="precision / recall on the fit queries", title_justify="left")
    for column in ("min score", "precision", "recall"):
        table.add_column(column, justify="right")
    for point in summarise(result.curve):
        table.add_row(f"{point['min_score']:.4f}", f"{point['precision']:.4f}", f"{point['recall']:.4f}")
    out.render(table)
    rule = result.rule
    margin = "none" if rule.min_margin is None else f"{rule.min_margin:g}"
    goal = (
        "max F1"
        if result.objective == "max_f1"
        else f"precision ≥ {result.target_precision:g} with confidence {result.confidence:g}"
    )
    out.info(
        f"[green]Stored[/] vote {rule.vote}, min score {rule.min_score:.4f}, min margin {margin} ({goal}"
        + ("" if result.reached else ", [yellow]not reached: highest precision kept[/]")
        + ")"
    )
    for name, point in (("fit", result.fit), ("held out", result.held_out), ("held out, no rule", result.without_rule)):
        out.info(
            f"{name}: precision {point.precision:.4f}, recall {point.recall:.4f} ({point.known} known, "
            f"{point.unknown} unknown; {point.wrong_accepted} wrongly accepted, {point.unknown_rejected} unknown "
            "rejected)"
        )
    out.info(f"curve: {result.files['png']}")
    return 0


@index_app.command("audit")
def audit(
    index_dir: IndexOption,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Folder for audit.json and audit.html (default: INDEX-audit beside it)."),
    ] = None,
    near_duplicate: Annotated[
        float, typer.Option("--near", min=-1.0, max=1.0, help="Cosine from which two labels' items are 'the same'.")
    ] = 0.95,
    hub_count: Annotated[
        int, typer.Option("--hub-count", min=1, help="Other labels' items an item must be nearest to, to be a hub.")
    ] = 3,
    json: JsonOption = False,
) -> int:
    """Check a gallery by content: duplicates, likely mislabels, labels split apart, and hubs.

    Works on the stored vectors (the images are read only to compare their bytes) and writes a JSON report
    and a self-contained HTML page with the suspicious items side by side. Exit code 0 either way.
    """
    from shitu.index.audit import audit_index

    out = Output(json)
    report = audit_index(index_dir, output=output, near_duplicate=near_duplicate, hub_count=hub_count)
    out.emit(report.to_json())
    found = report.counts()
    out.info(
        f"{report.count} items, {report.num_labels} labels: {found['duplicates']} duplicate groups "
        f"({sum(g['conflicting_labels'] for g in report.duplicates)} with different labels), "
        f"{found['mislabels']} likely mislabels, {found['split_labels']} split labels, {found['hubs']} hubs"
        + (f", [yellow]{found['unreadable']} images unreadable[/]" if found["unreadable"] else "")
    )
    out.info(f"report: {report.files['html']}")
    return 0


def search(
    inputs: InputsArgument,
    index_dir: Annotated[Path | None, typer.Option("--index", help="The index folder.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Hits per input.")] = 5,
    exact: Annotated[bool, typer.Option("--exact", help="Compare with every stored vector (no HNSW).")] = False,
    model_dir: ModelDirOption = None,
    batch_size: BatchSizeOption = 32,
    min_score: MinScoreOption = None,
    min_margin: MinMarginOption = None,
    vote: VoteOption = None,
    backend: BackendOption = Backend.jax,
    precision: PrecisionOption = Precision.fp32,
    calibration: CalibrationOption = None,
    server: Annotated[
        str | None, typer.Option("--server", help="Search the gallery of a running 'shitu serve' at this URL.")
    ] = None,
    json: JsonOption = False,
) -> int:
    """Find the nearest gallery items of each input image, and the label they vote for, or "unknown".

    The decision rule is the index's (set by 'shitu index calibrate'; none: every input gets a label), with
    --min-score/--min-margin/--vote replacing its parts. With --json, one line per input on stdout: {"input",
    "label" (null: unknown), "score", "margin", "accepted", "reason", "candidate", "hits": [{"key", "label",
    "path", "score"}]}, hits best first; scores are cosine similarities. Unreadable inputs are reported on
    stderr, the others still run, and the exit code is then 1.
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
    with _shown_warnings(out), chosen_backend(out, backend, precision, calibration):
        results = search_images(
            index_dir,
            inputs,
            k=k,
            exact=exact,
            model_dir=model_dir,
            batch_size=batch_size,
            stdin=sys.stdin,
            report=report,
            min_score=min_score,
            min_margin=min_margin,
            vote=vote.value if vote is not None else None,
        )
        for result in results:
            out.emit(result.to_json())
            if result.accepted:
                out.info(f"[bold]{escape(result.input)}[/] → label {result.label} (score {result.score:.4f})")
            else:
                out.info(
                    f"[bold]{escape(result.input)}[/] → [yellow]unknown[/] (best: label {result.candidate}; "
                    f"{escape(result.reason or '')})"
                )
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
