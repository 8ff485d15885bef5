"""``shitu predict``: unit-length features of images (PaddleX's ``Global.mode=predict``), optionally searched."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

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
from shitu.errors import ShituError

#: Rows of the summary table shown to people (all results still go to the files asked for).
MAX_TABLE_ROWS = 50


def predict(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT...",
            help="Image files, folders (recursive), globs ('photos/**/*.jpg'), .txt/.lst lists of paths "
            "(one per line, relative to the list), http(s) URLs, or '-' to read paths from stdin.",
        ),
    ],
    model: ModelNameOption = None,
    random_weights: RandomWeightsOption = False,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="A model bundle folder (shitu import-weights / train).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per model call.")] = 8,
    input_size: Annotated[
        int | None, typer.Option("--input-size", min=8, help="Resize to this size (default: the model's).")
    ] = None,
    save_dir: Annotated[
        Path | None,
        typer.Option("--save-dir", help="Write <stem>_res.json per image here (PaddleX's save_to_json)."),
    ] = None,
    save_img: Annotated[
        Path | None,
        typer.Option("--save-img", help="Write <stem>_res.<ext> per image here: the image (and its matches)."),
    ] = None,
    npy: Annotated[
        Path | None,
        typer.Option("--npy", help="Write all features as one float32 [N, D] .npy matrix and FILE.paths.txt."),
    ] = None,
    index: Annotated[
        Path | None, typer.Option("--index", help="Search each feature in this retrieval index (shitu index).")
    ] = None,
    topk: Annotated[int, typer.Option("--topk", "-k", min=1, help="Matches per image with --index.")] = 5,
    min_score: Annotated[
        float | None,
        typer.Option(
            "--min-score", help="With --index: 'unknown' (label null) below this score (default: the index's rule)."
        ),
    ] = None,
    min_margin: Annotated[
        float | None,
        typer.Option("--min-margin", help="With --index: 'unknown' below this margin over the next label."),
    ] = None,
    backend: BackendOption = Backend.jax,
    precision: PrecisionOption = Precision.fp32,
    calibration: CalibrationOption = None,
    server: Annotated[
        str | None, typer.Option("--server", help="Embed with a running 'shitu serve' at this URL instead.")
    ] = None,
    json: JsonOption = False,
) -> int:
    """Compute the feature of every input image: float32, unit length (e.g. 512-d).

    --json: one line per image on stdout, {"input_path", "page_index": null, "feature": [...]}; with --index also
    "hits", "label" (null: "unknown", see --min-score) and "decision".

    An input that cannot be read (or resolves to nothing) is one error line on stderr; the others still run; exit 1.

    --save-dir names files as PaddleX (<stem>_res.json); a repeated stem becomes <stem>_2_res.json, ... in input order.

    --npy writes the features of the images that worked, in input order, and their paths in FILE.paths.txt.
    """
    from rich.markup import escape

    from shitu.cli._shared import chosen_backend, shown_warnings
    from shitu.data.inputs import resolve
    from shitu.embed.predict import UniqueNames, create_model, write_feature_matrix
    from shitu.runtime import configure_jax

    out = Output(json)
    if server is not None:
        return _predict_remote(out, server, inputs, batch_size=batch_size)
    if (model is None) == (model_dir is None):
        raise ShituError("give either --model NAME or --model-dir BUNDLE")
    resolved = resolve(inputs, stdin=sys.stdin)
    for skipped in resolved.skipped:
        out.problem("warning", skipped)
    problems = resolved.problems
    for problem in problems:
        out.problem("error", problem)
    paths = resolved.paths
    if not paths:
        raise ShituError("no images to predict" + (" (see the errors above)" if problems else ""))

    configure_jax()
    with shown_warnings(out), chosen_backend(out, backend, precision, calibration):
        chosen: str | Path = model_dir if model_dir is not None else str(model)
        predictor = create_model(chosen, index=index, input_size=input_size, topk=topk, pretrained=not random_weights)
    out.info(_model_line(predictor))

    failures: list[Any] = []
    features: list[Any] = []
    feature_paths: list[str | None] = []
    rows: list[tuple[str, Any, Any]] = []  # the first MAX_TABLE_ROWS results, for the summary table
    json_names = UniqueNames()
    image_names = UniqueNames()
    done = 0

    def save(result: Any, default: Path, names: Any, writer: Any) -> None:
        target = names(default)
        if target != default:
            out.warning(f"{result['input_path']}: saved as {target.name} ({default.name} is another input's)")
        writer(target)

    with out.progress() as progress:

        def failed(failure: Any) -> None:
            failures.append(failure)
            out.problem("error", failure.message)
            progress("embedding", 1, len(paths))

        for result in predictor.predict(
            paths, batch_size=batch_size, on_failure=failed, min_score=min_score, min_margin=min_margin
        ):
            done += 1
            progress("embedding", 1, len(paths))
            out.emit(result.json["res"])
            if save_dir is not None:
                save(result, result.json_path(save_dir), json_names, result.save_to_json)
            if save_img is not None:
                save(result, result.img_path(save_img), image_names, result.save_to_img)
            if npy is not None:
                features.append(result["feature"])
                feature_paths.append(result["input_path"])
            if len(rows) < MAX_TABLE_ROWS:
                rows.append((str(result["input_path"]), result["feature"], result.get("hits")))

    if npy is not None:
        import numpy as np

        dim = predictor.recognizer.embedding_size
        matrix = np.stack(features) if features else np.zeros((0, dim), np.float32)
        listing = write_feature_matrix(npy, matrix, feature_paths)
        out.info(f"features: {escape(str(npy))} {list(matrix.shape)}, paths: {escape(str(listing))}")
    _render(out, rows, done)
    if save_dir is not None:
        out.info(f"results: {escape(str(save_dir))}")
    if save_img is not None:
        out.info(f"pictures: {escape(str(save_img))}")
    failed_count = len(failures) + len(problems)
    summary = f"{done} of {len(paths)} images embedded"
    if failed_count:
        out.info(f"[red]{summary}; {failed_count} failed[/]")
        return 1
    out.info(f"[green]{summary}[/]")
    return 0


def _predict_remote(out: Output, server: str, inputs: list[str], *, batch_size: int) -> int:
    """``predict --server``: the inputs are read here and embedded by the server."""
    from shitu.data.inputs import resolve
    from shitu.serve.client import remote_predict

    resolved = resolve(inputs, stdin=sys.stdin, urls=False)
    for problem in resolved.problems:
        out.problem("error", problem)
    done = 0
    for result in remote_predict(server, resolved.paths, batch_size=batch_size):
        out.emit(result)
        done += 1
    out.info(f"{done} of {len(resolved.paths)} images embedded by {server}")
    return 1 if resolved.problems else 0


def _model_line(predictor: Any) -> str:
    from rich.markup import escape

    info = predictor.describe()
    source = f"bundle {info['bundle']}" if info.get("bundle") else "random weights"
    return escape(f"model {info['model']} ({source}), input {info['input_size']} px, {info['embedding_size']}-d")


def _render(out: Output, rows: list[tuple[str, Any, Any]], total: int) -> None:
    """The summary table (first rows only) on stderr, for people."""
    import numpy as np
    from rich.markup import escape
    from rich.table import Table

    if out.json_mode or not rows:
        return
    with_hits = any(hits is not None for _, _, hits in rows)
    table = Table(title_justify="left")
    table.add_column("input", overflow="fold")
    table.add_column("norm", justify="right")
    table.add_column("first values")
    if with_hits:
        table.add_column("best match", overflow="fold")
    for path, feature, hits in rows:
        values = " ".join(f"{v:+.4f}" for v in np.asarray(feature)[: 2 if with_hits else 4])
        cells = [escape(path), f"{float(np.linalg.norm(feature)):.5f}", values + " …"]
        if with_hits:
            best = hits[0] if hits else None
            cells.append(escape(f"label {best.label} {best.score:.3f} {Path(best.path).name}") if best else "-")
        table.add_row(*cells)
    out.render(table)
    if total > len(rows):
        out.info(f"… and {total - len(rows)} more (--json, --save-dir or --npy give them all)")


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
