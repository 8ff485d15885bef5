"""What the ``shitu index`` and ``shitu search`` commands do, as library functions.

Reading a labelled list, finding the recognizer an index was built with, and measuring an index's
approximate search against exact search on a dataset's queries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError
from shitu.index.core import INFO_FILE, RetrievalIndex, vote


@dataclass
class LabelledList:
    """The images of a list file (absolute paths) with their labels, and the list's problems (one line each)."""

    file: Path
    root: Path
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_labelled_list(path: str | os.PathLike[str], *, default_split: str = "gallery") -> LabelledList:
    """Read ``<path> <label>`` lines of a list file; paths are relative to the list's folder (the dataset
    root), as in a ShiTuRecDataset. A dataset folder stands for its ``<default_split>.txt``."""
    from shitu.data.lists import locate_root, read_list

    given = Path(path)
    if given.is_dir():
        root = locate_root(given)
        file = root / f"{default_split}.txt"
    else:
        if not given.is_file():
            raise ShituError("list file not found", path=given)
        if given.suffix != ".txt":
            raise ShituError("a list file must be a .txt file of '<path> <label>' lines", path=given)
        file = given
        root = given.parent
    parsed = read_list(root, file.name[: -len(".txt")])
    result = LabelledList(file=file, root=root)
    for issue in parsed.issues:
        (result.errors if issue.severity == "error" else result.warnings).append(str(issue))
    base = root.absolute()
    for entry in parsed.entries:
        image = base / entry.sample.path
        if not image.is_file():
            result.errors.append(f"{entry.file}:{entry.line}: image not found: {entry.sample.path}")
            continue
        result.paths.append(str(image))
        result.labels.append(int(entry.sample.label))
    return result


def load_recognizer_for(
    index: RetrievalIndex | None, model_dir: str | os.PathLike[str] | None, *, check: bool = True
) -> Any:
    """The recognizer to embed with: ``model_dir`` when given, else the bundle (or model name, for random
    weights) recorded in ``index``. Checked against the index (model, embedding size, input size)."""
    from shitu.embed.recognizer import load_recognizer
    from shitu.runtime import configure_jax

    configure_jax()
    if model_dir is not None:
        recognizer = load_recognizer(Path(model_dir).absolute())
    else:
        if index is None:
            raise ShituError("give --model-dir (the model bundle to embed with)")
        recorded = index.recognizer
        where = index.path / INFO_FILE if index.path is not None else None
        if recorded.get("bundle"):
            bundle = Path(recorded["bundle"])
            if not bundle.is_dir():
                raise ShituError(
                    f"the model bundle the index was built with is gone: {bundle}",
                    path=where,
                    hint="pass --model-dir",
                )
            recognizer = load_recognizer(bundle)
        elif recorded.get("model"):
            recognizer = load_recognizer(str(recorded["model"]), input_size=recorded.get("input_size"))
        else:
            raise ShituError("the index records no model", path=where, hint="pass --model-dir")
    if check and index is not None:
        index.check_recognizer(recognizer.describe())
    return recognizer


@dataclass
class IndexEvaluation:
    """ANN search measured against exact search on the same queries, plus label accuracy."""

    num_queries: int
    ks: list[int]
    recall: dict[int, float]  # exact top-1 found in the ANN top-k
    topk_match: dict[int, float]  # ANN top-k set == exact top-k set
    accuracy_top1: float  # ANN top-1 label == query label
    accuracy_top1_exact: float
    accuracy_vote: dict[int, float]  # voted label over the ANN top-k == query label
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_queries": self.num_queries,
            "k": self.ks,
            "ann_recall": {f"recall@{k}": v for k, v in self.recall.items()},
            "ann_topk_match": {f"match@{k}": v for k, v in self.topk_match.items()},
            "accuracy_top1": self.accuracy_top1,
            "accuracy_top1_exact": self.accuracy_top1_exact,
            "accuracy_vote": {f"vote@{k}": v for k, v in self.accuracy_vote.items()},
            "failures": self.failures,
        }


def compare_with_exact(
    index: RetrievalIndex, features: np.ndarray, labels: Sequence[int], ks: Sequence[int]
) -> IndexEvaluation:
    """Search ``features`` approximately and exactly and compare (see :class:`IndexEvaluation`)."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ShituError("k values must be positive integers")
    top = ks[-1]
    ann = index.search(features, top)
    exact = index.search(features, top, exact=True)
    n = len(ann)

    def mean(values: list[bool]) -> float:
        return float(np.mean(values)) if values else 0.0

    pairs = list(zip(ann, exact, strict=True))
    recall = {k: mean([bool(e) and e[0].key in {h.key for h in a[:k]} for a, e in pairs]) for k in ks}
    match = {k: mean([{h.key for h in a[:k]} == {h.key for h in e[:k]} for a, e in pairs]) for k in ks}
    return IndexEvaluation(
        num_queries=n,
        ks=ks,
        recall=recall,
        topk_match=match,
        accuracy_top1=mean([bool(a) and a[0].label == lab for a, lab in zip(ann, labels, strict=True)]),
        accuracy_top1_exact=mean([bool(e) and e[0].label == lab for e, lab in zip(exact, labels, strict=True)]),
        accuracy_vote={k: mean([vote(a[:k])[0] == lab for a, lab in zip(ann, labels, strict=True)]) for k in ks},
    )


def evaluate_index(
    index: RetrievalIndex,
    recognizer: Any,
    dataset: str | os.PathLike[str],
    *,
    ks: Sequence[int] = (1, 5),
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> IndexEvaluation:
    """Embed the dataset's query.txt with ``recognizer`` and :func:`compare_with_exact`. Unreadable query
    images are skipped and listed in ``failures``; list errors raise."""
    queries = read_labelled_list(dataset, default_split="query")
    if queries.errors:
        raise ShituError(
            queries.errors[0] + (f" (and {len(queries.errors) - 1} more)" if len(queries.errors) > 1 else "")
        )
    embedded = recognizer.embed(queries.paths, batch_size=batch_size, progress=progress)
    labels = [queries.labels[i] for i in embedded.indices]
    result = compare_with_exact(index, embedded.features, labels, ks)
    result.failures = [failure.message for failure in embedded.failures]
    return result
