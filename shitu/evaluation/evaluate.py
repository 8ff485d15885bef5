"""Evaluate a recognizer on a ShiTuRecDataset: embed ``gallery.txt`` and ``query.txt``, then Recall@k and mAP.

This is PaddleX's ``Global.mode=evaluate`` for the image recognition module. Nothing is skipped silently: a
bad list line or an image that cannot be read stops the evaluation with an error naming the list file and
line. :func:`write_evaluate_result` writes PaddleX's ``evaluate_result.json``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.data.lists import ListEntry, locate_root, read_list
from shitu.errors import ShituError
from shitu.evaluation.metrics import (
    DEFAULT_TOPK,
    PADDLEX_SIM_BLOCK_SIZE,
    RetrievalMetrics,
    retrieval_metrics,
)
from shitu.evaluation.openset import OpenSetMetrics, open_set_metrics
from shitu.fileio import atomic_open, atomic_write_json

EVALUATE_RESULT = "evaluate_result.json"
PADDLEX_KEYS = ("recall1", "recall5", "mAP")
EXAMPLE_MATCHES = 5

#: ``progress(stage, advance, total)``, as :meth:`shitu.cli._output.Output.progress` gives.
Progress = Callable[[str, int, int], None]


@dataclass
class EvalResult:
    """The metrics of one evaluation and what they were computed from."""

    metrics: RetrievalMetrics
    dataset_dir: Path
    gallery: list[ListEntry]
    query: list[ListEntry]
    recognizer: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    examples: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    open_set: OpenSetMetrics | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.dataset_dir),
            "recognizer": self.recognizer,
            "num_gallery": len(self.gallery),
            "num_query": len(self.query),
            "metrics": self.metrics.to_json(),
            "warnings": self.warnings,
            "examples": str(self.examples) if self.examples is not None else None,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "open_set": self.open_set.to_json() if self.open_set is not None else None,
        }


def read_eval_lists(dataset_dir: str | os.PathLike[str]) -> tuple[Path, list[ListEntry], list[ListEntry], list[str]]:
    """The dataset root, the gallery and query entries, and warnings; a ShituError at the first bad line.

    As :func:`shitu.data.lists.read_list`: blank lines are ignored and an exact duplicate line is used once
    (both are warned about).
    """
    root = locate_root(dataset_dir)
    entries: dict[str, list[ListEntry]] = {}
    warnings: list[str] = []
    for split in ("gallery", "query"):
        parsed = read_list(root, split)
        errors = [issue for issue in parsed.issues if issue.severity == "error"]
        if errors:
            first = errors[0]
            more = f"; {len(errors) - 1} more problems, see 'shitu check'" if len(errors) > 1 else None
            raise ShituError(first.message, path=first.file, line=first.line, hint=more)
        warnings.extend(str(issue) for issue in parsed.issues)
        entries[split] = parsed.entries
    return root, entries["gallery"], entries["query"], warnings


def embed_entries(
    recognizer: Any,
    root: Path,
    entries: Sequence[ListEntry],
    *,
    stage: str,
    batch_size: int,
    progress: Progress | None = None,
) -> np.ndarray:
    """Features [N, D] of the listed images, in list order; a ShituError naming the list line of the first
    image that cannot be read (evaluation must not skip images). In a multi-process run each process embeds
    its share and every process gets all the features (:func:`shitu.runtime.distributed.embed_sharded`)."""
    from shitu.runtime.distributed import embed_sharded, shard_range

    sources = [root / entry.sample.path for entry in entries]
    total = len(sources)
    here = len(shard_range(total))  # what this process embeds (and its progress counts)

    def advance(count: int) -> None:
        if progress is not None:
            progress(stage, count, here)

    embedded = embed_sharded(recognizer, sources, batch_size=batch_size, progress=advance)
    if embedded.failures:
        failure = embedded.failures[0]
        entry = entries[failure.index]
        others = len(embedded.failures) - 1
        raise ShituError(
            f"cannot read image {entry.sample.path}: {failure.message}",
            path=entry.file,
            line=entry.line,
            hint=f"{others} more images failed" if others else None,
        )
    features = np.asarray(embedded.features, np.float32)
    if features.shape[0] != total or list(embedded.indices) != list(range(total)):
        raise ShituError(f"the recognizer returned {features.shape[0]} features for {total} {stage} images")
    return features


def evaluate_dataset(
    recognizer: Any,
    dataset_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    topk: int | Iterable[int] = DEFAULT_TOPK,
    mode: str = "exact",
    progress: Progress | None = None,
    examples: tuple[str | os.PathLike[str], int] | None = None,
    sim_block_size: int = PADDLEX_SIM_BLOCK_SIZE,
    per_class: bool = False,
    confusion_pairs: int = 0,
    decision: Any | None = None,
) -> EvalResult:
    """Embed the gallery and query lists of ``dataset_dir`` with ``recognizer.embed`` and compute the metrics.

    Recall@1 and @5 are always computed (PaddleX's ``evaluate_result.json`` needs them), plus every k of
    ``topk``. ``mode``/``sim_block_size``/``per_class``/``confusion_pairs``: see
    :func:`shitu.evaluation.metrics.retrieval_metrics`. ``examples=(png_path, n)`` also draws n queries with
    their top-5 gallery matches (green frame: right label, red: wrong). ``progress(stage, advance, total)`` is
    called as images are embedded. Raises ShituError at the first bad list line or unreadable image.

    Open-set numbers (:mod:`shitu.evaluation.openset`) are added when some query classes have no gallery
    image or a ``decision`` rule (a :class:`shitu.index.DecisionRule`) is given; without one, the default
    rule (no thresholds: every such query is accepted wrongly).
    """
    started = time.perf_counter()
    root, gallery, query, warnings = read_eval_lists(dataset_dir)
    gallery_features = embed_entries(
        recognizer, root, gallery, stage="gallery", batch_size=batch_size, progress=progress
    )
    query_features = embed_entries(recognizer, root, query, stage="query", batch_size=batch_size, progress=progress)
    embedded = time.perf_counter()
    ks = sorted({*DEFAULT_TOPK, *([topk] if isinstance(topk, int) else topk)})
    metrics = retrieval_metrics(
        query_features,
        np.array([e.sample.label for e in query], np.int64),
        gallery_features,
        np.array([e.sample.label for e in gallery], np.int64),
        topk=ks,
        mode=mode,
        sim_block_size=sim_block_size,
        per_class=per_class,
        confusion_pairs=confusion_pairs,
        keep_ranking=EXAMPLE_MATCHES if examples is not None else 0,
    )
    gallery_labels = [e.sample.label for e in gallery]
    open_set = None
    if decision is not None or {e.sample.label for e in query} - set(gallery_labels):
        from shitu.index.decision import DecisionRule

        rule = decision if decision is not None else DecisionRule()
        labels = [e.sample.label for e in query]
        open_set = open_set_metrics(query_features, labels, gallery_features, gallery_labels, rule)
    measured = time.perf_counter()
    describe = getattr(recognizer, "describe", None)
    result = EvalResult(
        metrics=metrics,
        dataset_dir=root,
        gallery=list(gallery),
        query=list(query),
        recognizer=describe() if callable(describe) else {},
        warnings=warnings,
        seconds={"embed": embedded - started, "metrics": measured - embedded},
        open_set=open_set,
    )
    if examples is not None:
        path, count = examples
        result.examples = draw_examples(Path(path), root, query, gallery, metrics, count)
    return result


@dataclass
class ModelEvaluation:
    """What :func:`evaluate_model` did: the result, the output folder, and the ``evaluate_result.json``
    written there (None in a process other than process 0, which writes nothing)."""

    result: EvalResult
    output_dir: Path
    written: Path | None


def evaluate_model(
    reference: str | os.PathLike[str],
    *,
    dataset: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    topk: int | Iterable[int] = DEFAULT_TOPK,
    mode: str = "exact",
    per_class: bool = False,
    confusion_pairs: int = 0,
    examples: int = 0,
    input_size: int | None = None,
    overrides: Sequence[str] = (),
    pretrained: bool = True,
    primary: bool = True,
    progress: Progress | None = None,
    decision: Any | None = None,
) -> ModelEvaluation:
    """Evaluate the model ``reference`` (a bundle folder or a registered name, see
    :func:`shitu.embed.resolve.resolve_model`) on a dataset and write ``evaluate_result.json``.

    The model's config with ``overrides`` (``-o KEY=VALUE``) supplies what is not given: the dataset
    (``Global.dataset_dir``), the output folder (``Global.output``), the batch size
    (``Evaluate.batch_size``), PaddleX's block size (``Evaluate.sim_block_size``) and, when an override sets
    it, the input size (``Train.input_size``). The dataset's lists are read before the model is loaded (a
    bad line fails at once). ``examples``: draw that many queries with their matches to
    ``OUTPUT/examples.png``. Only process 0 (``primary``) draws and writes. ``pretrained=False``: a model
    name gets random weights instead of its installed or published ones. ``decision``: the rule the
    open-set numbers use (see :func:`evaluate_dataset`).
    """
    from shitu.embed.resolve import model_config, resolve_model

    config = model_config(reference, overrides, pretrained=pretrained)
    dataset_dir = dataset if dataset is not None else config.get("Global.dataset_dir", None)
    if dataset_dir is None:
        raise ShituError("no dataset: give --dataset DIR (or -o Global.dataset_dir=DIR)")
    read_eval_lists(Path(dataset_dir))  # a bad list line fails here, before the model is loaded
    output_dir = Path(output if output is not None else config.get("Global.output", "output"))
    size = input_size
    if size is None and any(item.split("=", 1)[0].strip() == "Train.input_size" for item in overrides):
        size = config.get("Train.input_size")  # set explicitly; else the model's (or bundle's) own
    recognizer = resolve_model(reference, input_size=size, pretrained=pretrained)
    result = evaluate_dataset(
        recognizer,
        Path(dataset_dir),
        batch_size=batch_size or int(config.get("Evaluate.batch_size", 64)),
        topk=topk,
        mode=mode,
        progress=progress,
        examples=(output_dir / "examples.png", examples) if examples and primary else None,
        sim_block_size=int(config.get("Evaluate.sim_block_size", 64)),
        per_class=per_class,
        confusion_pairs=confusion_pairs,
        decision=decision,
    )
    written = write_evaluate_result(output_dir, result.metrics, result.to_json()) if primary else None
    return ModelEvaluation(result, output_dir, written)


def evaluate_result_document(metrics: RetrievalMetrics, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """PaddleX's ``evaluate_result.json`` content: ``{"done_flag": true, "metrics": {recall1, recall5, mAP}}``;
    ``details`` (anything else) goes beside ``metrics``, never inside. A NaN metric is written as null."""
    headline = metrics.headline()
    missing = [key for key in PADDLEX_KEYS if key not in headline]
    if missing:
        raise ShituError(f"evaluate_result.json needs {', '.join(missing)}: compute recall at k=1 and k=5")
    doc: dict[str, Any] = {"done_flag": True, "metrics": {key: headline[key] for key in PADDLEX_KEYS}}
    if details:
        doc["details"] = details
    return doc


def write_evaluate_result(
    output_dir: str | os.PathLike[str], metrics: RetrievalMetrics, details: dict[str, Any] | None = None
) -> Path:
    """Write ``<output_dir>/evaluate_result.json`` atomically (see :func:`evaluate_result_document`)."""
    target = Path(output_dir) / EVALUATE_RESULT
    atomic_write_json(target, evaluate_result_document(metrics, details))
    return target


# ------------------------------------------------------------------------------------------------ examples

_THUMB = 128
_CAPTION = 18
_BORDER = 4
_GAP = 6
_RIGHT, _WRONG, _QUERY = (0, 170, 0), (215, 0, 0), (60, 90, 200)


def example_queries(num_queries: int, count: int) -> list[int]:
    """``count`` query indices spread evenly over the list (first and last included), in order."""
    if count <= 0 or num_queries == 0:
        return []
    return sorted({round(float(i)) for i in np.linspace(0, num_queries - 1, min(count, num_queries))})


def draw_examples(
    target: Path,
    root: Path,
    query: Sequence[ListEntry],
    gallery: Sequence[ListEntry],
    metrics: RetrievalMetrics,
    count: int,
) -> Path:
    """A PNG grid, one row per example query: the query (blue frame), then its top matches framed green (same
    label) or red (another), each captioned with its label (and similarity). Written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    if metrics.ranking is None or metrics.ranking_scores is None:
        raise ShituError("the metrics were computed without a ranking (keep_ranking=0): cannot draw examples")
    chosen = example_queries(len(query), count)
    columns = 1 + metrics.ranking.shape[1]
    cell_w, cell_h = _THUMB + 2 * _BORDER, _THUMB + 2 * _BORDER + _CAPTION
    width = columns * cell_w + (columns + 1) * _GAP
    height = max(1, len(chosen)) * (cell_h + _GAP) + _GAP
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for row, q in enumerate(chosen):
        y = _GAP + row * (cell_h + _GAP)
        cells = [(query[q], f"query: label {query[q].sample.label}", _QUERY)]
        for rank, (g, score) in enumerate(zip(metrics.ranking[q], metrics.ranking_scores[q], strict=True), start=1):
            entry = gallery[int(g)]
            colour = _RIGHT if entry.sample.label == query[q].sample.label else _WRONG
            cells.append((entry, f"#{rank} label {entry.sample.label} {_score(score)}", colour))
        for column, (entry, caption, colour) in enumerate(cells):
            x = _GAP + column * (cell_w + _GAP)
            draw.rectangle((x, y, x + cell_w - 1, y + _THUMB + 2 * _BORDER - 1), fill=colour)
            sheet.paste(_thumbnail(root / entry.sample.path), (x + _BORDER, y + _BORDER))
            draw.text((x + 1, y + _THUMB + 2 * _BORDER + 2), caption, fill=colour, font=font)
    with atomic_open(target, "wb") as handle:
        sheet.save(handle, format="PNG")
    return target


def _score(value: float) -> str:
    return "nan" if math.isnan(float(value)) else f"{float(value):.3f}"


def _thumbnail(path: Path) -> Any:
    """The image fitted into a square thumbnail on grey (the images were just read once, so they open)."""
    from PIL import Image, ImageOps

    tile = Image.new("RGB", (_THUMB, _THUMB), (230, 230, 230))
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    image.thumbnail((_THUMB, _THUMB))
    tile.paste(image, ((_THUMB - image.width) // 2, (_THUMB - image.height) // 2))
    return tile
