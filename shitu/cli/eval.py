"""``shitu eval``: Recall@k and mAP of a model on a dataset's query and gallery lists (PaddleX's evaluate)."""

from __future__ import annotations

import math
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
from shitu.cli._options import (
    Backend,
    BackendOption,
    CalibrationOption,
    JsonOption,
    ModelNameOption,
    OverrideOption,
    Precision,
    PrecisionOption,
    RandomWeightsOption,
)
from shitu.cli._output import Output
from shitu.errors import ShituError

MAX_CONFUSED_PAIRS = 10


def eval_command(
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="Model bundle to evaluate (from train or import-weights).")
    ] = None,
    model: ModelNameOption = None,
    random_weights: RandomWeightsOption = False,
    dataset: Annotated[
        Path | None,
        typer.Option("--dataset", help="ShiTuRecDataset root with gallery.txt and query.txt (or Global.dataset_dir)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Folder for evaluate_result.json (default: Global.output).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Images per forward (default: Evaluate.batch_size).")
    ] = None,
    topk: Annotated[str, typer.Option("--topk", metavar="K,K,...", help="Recall@k to report, e.g. 1,5,10.")] = "1,5",
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="exact: global ratios; paddlex: PaddleClas' per-block averaging (Evaluate.sim_block_size).",
        ),
    ] = "exact",
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also show recall@1 per class and the most confused classes.")
    ] = False,
    examples: Annotated[
        int, typer.Option("--examples", min=0, help="Draw N queries with their top-5 matches (OUTPUT/examples.png).")
    ] = 0,
    input_size: Annotated[
        int | None, typer.Option("--input-size", min=8, help="Input resolution (default: the model's).")
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option("--min-score", help="Open-set numbers: answer 'unknown' below this score (cosine)."),
    ] = None,
    min_margin: Annotated[
        float | None,
        typer.Option("--min-margin", help="Open-set numbers: answer 'unknown' below this margin over the next label."),
    ] = None,
    decision_from: Annotated[
        Path | None,
        typer.Option("--decision-from", help="Open-set numbers with the decision rule stored in this index."),
    ] = None,
    override: OverrideOption = None,
    backend: BackendOption = Backend.jax,
    precision: PrecisionOption = Precision.fp32,
    calibration: CalibrationOption = None,
    json: JsonOption = False,
    distributed: DistributedOption = False,
    coordinator: CoordinatorOption = None,
    num_processes: NumProcessesOption = None,
    process_id: ProcessIdOption = None,
) -> int:
    """Evaluate a model: embed gallery.txt and query.txt, then Recall@k and mAP (cosine similarity).

    Writes OUTPUT/evaluate_result.json as PaddleX: {"done_flag": true, "metrics": {"recall1", "recall5",
    "mAP"}} with the rest (all k, counts, per-class) under "details". A bad list line or an unreadable image is
    an error naming the list file and line: no image is skipped.

    With several processes (--distributed, or --coordinator/--num-processes/--process-id) each embeds its
    share of the images; process 0 computes the metrics and writes the files.

    When some query classes have no gallery image (or a rule is given), the open-set numbers follow: how
    many such queries were rejected ("unknown") or accepted wrongly, under --decision-from's rule with
    --min-score/--min-margin replacing its parts (no rule: every query gets a label).
    """
    from shitu.cli._shared import chosen_backend, shown_warnings
    from shitu.evaluation.evaluate import evaluate_model
    from shitu.evaluation.metrics import MODES
    from shitu.runtime import configure_jax

    if (model_dir is None) == (model is None):
        raise ShituError("give either --model-dir BUNDLE or --model NAME")
    if mode not in MODES:
        raise ShituError(f"unknown --mode {mode!r} (choose from {', '.join(MODES)})")
    ks = _parse_topk(topk)
    decision = _decision_rule(decision_from, min_score, min_margin)
    out, primary = join(
        json, distributed=distributed, coordinator=coordinator, num_processes=num_processes, process_id=process_id
    )
    configure_jax()
    with out.progress() as progress, shown_warnings(out), chosen_backend(out, backend, precision, calibration):
        evaluation = evaluate_model(
            model_dir if model_dir is not None else str(model),
            dataset=dataset,
            output=output,
            batch_size=batch_size,
            topk=ks,
            mode=mode,
            per_class=per_class,
            confusion_pairs=MAX_CONFUSED_PAIRS if per_class else 0,
            examples=examples,
            input_size=input_size,
            overrides=list(override or []),
            pretrained=not random_weights,
            primary=primary,
            progress=progress,
            decision=decision,
        )
    if not primary:  # process 0 writes and prints the results
        return 0
    result = evaluation.result
    details = result.to_json()
    for warning in result.warnings:
        out.warning(warning)
    out.emit(
        {
            "done_flag": True,
            "metrics": _paddlex_metrics(result.metrics),
            "details": details,
            "output": evaluation.written,
        }
    )
    _render(out, result, ks, per_class)
    out.info(f"results: {evaluation.written}")
    if result.examples is not None:
        out.info(f"examples: {result.examples}")
    return 0


def _decision_rule(index: Path | None, min_score: float | None, min_margin: float | None) -> Any:
    """The rule of the open-set numbers, or None (the default rule, only when some classes are unknown)."""
    if index is None and min_score is None and min_margin is None:
        return None
    from shitu.index.decision import DecisionRule

    base = DecisionRule()
    if index is not None:
        from shitu.index import open_index

        base = open_index(index).decision_rule
    return base.with_overrides(min_score=min_score, min_margin=min_margin)


def _parse_topk(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(k < 1 for k in values):
        raise ShituError(f"--topk must be positive integers separated by commas, e.g. 1,5,10 (got {text!r})")
    return sorted(set(values))


def _paddlex_metrics(metrics: Any) -> dict[str, Any]:
    from shitu.evaluation.evaluate import evaluate_result_document

    return evaluate_result_document(metrics)["metrics"]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.5f}"


def _render(out: Output, result: Any, ks: list[int], per_class: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    metrics = result.metrics
    title = f"{escape(str(result.recognizer.get('model', 'model')))} on {escape(str(result.dataset_dir))}"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ks:
        table.add_row(f"recall@{k}", _fmt(metrics.recall[k]))
    table.add_row("mAP", _fmt(metrics.mAP))
    out.render(table)
    without = metrics.num_queries_without_positive
    mode = f"mode {metrics.mode}" + (f", blocks of {metrics.sim_block_size}" if metrics.sim_block_size else "")
    out.info(
        f"{metrics.num_queries} queries against {metrics.num_gallery} gallery images ({mode}); "
        f"{without} queries have no image of their class in the gallery"
        + (" and are left out of every metric" if without and metrics.mode == "exact" else "")
    )
    if result.open_set is not None:
        _render_open_set(out, result.open_set)
    if per_class and metrics.per_class is not None:
        classes = Table(title="recall@1 per class (worst first)", title_justify="left")
        for column in ("class", "queries", "hits", "recall@1"):
            classes.add_column(column, justify="right")
        for c in sorted(metrics.per_class, key=lambda c: (c.recall1, c.label)):
            classes.add_row(str(c.label), str(c.queries), str(c.hits), _fmt(c.recall1))
        out.render(classes)
        if metrics.confused_pairs:
            pairs = Table(title="most confused (query class → wrong top-1 class)", title_justify="left")
            for column in ("query class", "top-1 class", "queries"):
                pairs.add_column(column, justify="right")
            for p in metrics.confused_pairs:
                pairs.add_row(str(p.query_label), str(p.predicted_label), str(p.count))
            out.render(pairs)


def _render_open_set(out: Output, numbers: Any) -> None:
    from rich.table import Table

    rule = numbers.rule
    parts = [f"vote {rule['vote']}"]
    for name in ("min_score", "min_margin"):
        if rule[name] is not None:
            parts.append(f"{name.replace('_', ' ')} {rule[name]:.4f}")
    table = Table(title=f"open set ({', '.join(parts)}; top {numbers.k})", title_justify="left")
    for column in ("queries", "count", "answered right", "answered wrong"):
        table.add_column(column, justify="right")
    table.add_row(
        "class not in the gallery",
        str(numbers.unknown_queries),
        f"{numbers.unknown_rejected} rejected",
        f"{numbers.unknown_accepted} accepted",
    )
    table.add_row(
        "class in the gallery",
        str(numbers.known_queries),
        f"{numbers.known_right} right label",
        f"{numbers.known_wrong} wrong label, {numbers.known_rejected} rejected",
    )
    out.render(table)
    if numbers.precision is not None:
        out.info(f"precision of the accepted answers: {numbers.precision:.4f}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
