"""What the ``shitu index`` and ``shitu search`` commands do, as library functions.

Reading a labelled list, finding the recognizer an index was built with, and measuring an index's
approximate search against exact search on a dataset's queries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from shitu.errors import ShituError
from shitu.index.core import INFO_FILE, RetrievalIndex, vote
from shitu.index.decision import DecisionRule


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
    """The recognizer to embed with: ``model_dir`` when given, else the bundle (or model name) recorded in
    ``index``, through :func:`shitu.embed.resolve.resolve_model`. Checked against the index (model,
    embedding size, input size)."""
    from shitu.embed.resolve import resolve_model

    if model_dir is not None:
        recognizer = resolve_model(Path(model_dir).absolute())
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
            recognizer = resolve_model(bundle)
        elif recorded.get("model"):
            # an index records a name alone only when it was built with random weights: embed the same way
            recognizer = resolve_model(str(recorded["model"]), input_size=recorded.get("input_size"), pretrained=False)
        else:
            raise ShituError("the index records no model", path=where, hint="pass --model-dir")
    if check and index is not None:
        index.check_recognizer(recognizer.describe())
    return recognizer


#: ``report(severity, message)``: one problem line ("error" or "warning"), as ``Output.problem`` shows it.
Report = Callable[[str, str], None]
#: ``progress(stage, advance, total)``, as ``Output.progress`` gives (``total`` None when unknown).
Progress = Callable[[str, int, Any], None]


def _ignore(*_: Any) -> None:
    return None


@dataclass
class GalleryBuild:
    """What :func:`build_gallery_index` did: the index written (None in a process other than process 0,
    which writes nothing), the images left out (one line each) and the seconds it took."""

    index: RetrievalIndex | None
    failures: list[str]
    seconds: float


def build_gallery_index(
    gallery: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model_dir: str | os.PathLike[str] | None = None,
    model: str | None = None,
    pretrained: bool = True,
    dtype: str = "auto",
    rescore: int | None = None,
    batch_size: int = 32,
    overwrite: bool = False,
    primary: bool = True,
    report: Report | None = None,
    progress: Progress | None = None,
) -> GalleryBuild:
    """Embed the images of ``gallery`` (a ``<path> <label>`` list or a dataset folder) with the bundle
    ``model_dir``, or the registered model ``model`` (its installed or published weights; random ones with
    ``pretrained=False``; exactly one of the two), and write the index at ``output`` with the storage
    ``dtype`` / ``rescore`` (see :func:`shitu.index.core.choose_storage`).

    In this order: the list is read (its warnings reported; any error is reported and then a ShituError,
    nothing written); process 0 takes the index's lock (another writer makes this a ShituError at once) and
    holds it to the end; an existing folder that may not be replaced is refused (before the model is
    loaded); the images are embedded, split over the processes of a distributed job; unreadable ones are
    reported (``report("error", line)``) and left out, and none embedded is a ShituError; process 0 writes
    the index.
    """
    from contextlib import ExitStack

    from shitu.index.core import build_index, check_replaceable, index_lock
    from shitu.runtime.distributed import embed_sharded, shard_range

    if (model_dir is None) == (model is None):
        raise ShituError("give either --model-dir BUNDLE or --model NAME")
    report = report or _ignore
    listed = read_labelled_list(gallery, default_split="gallery")
    for warning in listed.warnings:
        report("warning", warning)
    if listed.errors:
        for error in listed.errors:
            report("error", error)
        raise ShituError(f"{len(listed.errors)} problems in the gallery list; nothing was written", path=listed.file)
    target = Path(output)
    with ExitStack() as held:
        if primary:  # the writer holds the index's lock to the end: a second build is refused at once
            held.enter_context(index_lock(target))
        check_replaceable(target.absolute(), overwrite=overwrite)  # before the embedding, which takes a while
        started = time.perf_counter()
        if model_dir is not None:
            recognizer = load_recognizer_for(None, model_dir)
        else:
            from shitu.embed.resolve import resolve_model

            recognizer = resolve_model(str(model), pretrained=pretrained)
        here = len(shard_range(len(listed.paths)))
        embedded = embed_sharded(
            recognizer,
            listed.paths,
            batch_size=batch_size,
            progress=lambda n: (progress or _ignore)("embedding", n, here),
        )
        failures = [f.message for f in embedded.failures]
        for failure in failures:
            report("error", failure)
        if not embedded.indices:
            raise ShituError("no gallery image could be embedded; nothing was written", path=listed.file)
        if not primary:  # process 0 writes the index
            return GalleryBuild(None, failures, time.perf_counter() - started)
        index = build_index(
            embedded.features,
            [listed.labels[i] for i in embedded.indices],
            [listed.paths[i] for i in embedded.indices],
            output=target,
            recognizer_info=recognizer.describe(),
            dtype=dtype,
            rescore=rescore,
            overwrite=overwrite,
        )
        return GalleryBuild(index, failures, time.perf_counter() - started)


@dataclass
class IndexAddition:
    """What :func:`add_to_index` did: the index (saved when something was added), the items added
    (``{"key", "label", "path"}``) and one line per input that could not be added."""

    index: RetrievalIndex
    added: list[dict[str, Any]]
    failures: list[str]


def add_to_index(
    index_dir: str | os.PathLike[str],
    *,
    inputs: Sequence[str] | None = None,
    label: int | None = None,
    list_file: str | os.PathLike[str] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    stdin: IO[str] | None = None,
    report: Report | None = None,
    progress: Progress | None = None,
) -> IndexAddition:
    """Embed more images and add them to the index at ``index_dir`` under new keys (rewritten as a unit).

    The images are ``inputs`` (resolved by :func:`shitu.data.inputs.resolve`; URLs are refused, the index
    stores paths), all with ``label``, or the ``<path> <label>`` lines of ``list_file``. Every input that
    cannot be used is reported (``report("error", line)``; a skipped file ``report("warning", line)``) and
    the others are still added. Embedded with ``model_dir`` or the model the index records.
    """
    from shitu.data.inputs import resolve
    from shitu.index.core import open_index

    report = report or _ignore
    if (list_file is None) == (label is None) or (list_file is not None and inputs):
        raise ShituError("give INPUT... with --label N, or --list FILE.txt alone")
    index = open_index(index_dir)
    problems: list[str] = []
    if list_file is not None:
        listed = read_labelled_list(list_file)
        for warning in listed.warnings:
            report("warning", warning)
        problems += listed.errors
        paths, labels = listed.paths, listed.labels
    else:
        resolved = resolve(inputs or [], stdin=stdin, urls=False)
        for skipped in resolved.skipped:
            report("warning", skipped)
        problems += resolved.problems
        paths = [str(Path(p).absolute()) for p in resolved.paths]
        labels = [int(label)] * len(paths)  # type: ignore[arg-type]
    for problem in problems:
        report("error", problem)
    recognizer = load_recognizer_for(index, model_dir)
    embedded = recognizer.embed(
        paths, batch_size=batch_size, progress=lambda n: (progress or _ignore)("embedding", n, len(paths))
    )
    failures = [f.message for f in embedded.failures]
    for failure in failures:
        report("error", failure)
    known = {item.path for item in index.items}
    for i in embedded.indices:
        if paths[i] in known:
            report("warning", f"{paths[i]} is already in the index; added again under a new key")
    keys = index.add(embedded.features, [labels[i] for i in embedded.indices], [paths[i] for i in embedded.indices])
    if keys:
        index.save()
    added = [{"key": key, "label": labels[i], "path": paths[i]} for key, i in zip(keys, embedded.indices, strict=True)]
    return IndexAddition(index, added, problems + failures)


@dataclass
class SearchResult:
    """The nearest gallery items of one input image, best first, and the decision on them: ``label`` is
    None ("unknown") when the rule rejects the best candidate (``reason`` says why)."""

    input: str
    label: int | None
    score: float
    hits: list[Any]
    candidate: int | None = None
    margin: float | None = None
    accepted: bool = True
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "label": self.label,
            "score": self.score,
            "margin": self.margin,
            "accepted": self.accepted,
            "reason": self.reason,
            "candidate": self.candidate,
            "hits": [h.to_json() for h in self.hits],
        }


def search_images(
    index_dir: str | os.PathLike[str],
    inputs: Sequence[str],
    *,
    k: int = 5,
    exact: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    stdin: IO[str] | None = None,
    report: Report | None = None,
    rule: DecisionRule | None = None,
    min_score: float | None = None,
    min_margin: float | None = None,
    vote: str | None = None,
) -> Iterator[SearchResult]:
    """Search the images of ``inputs`` (resolved by :func:`shitu.data.inputs.resolve`) in the index at
    ``index_dir``, lazily, one result per readable image in input order. Inputs that resolve to nothing or
    cannot be read are reported (``report("error", line)``; skipped files as warnings) and the others still
    run. Embedded with ``model_dir`` or the model the index records.

    The decision rule is ``rule``, else the one stored in the index (none: no thresholds), with
    ``min_score``/``min_margin``/``vote`` replacing its fields where given (see :mod:`shitu.index.decision`)."""
    from shitu.data.inputs import resolve
    from shitu.index.core import open_index
    from shitu.index.decision import resolve_rule

    report = report or _ignore
    index = open_index(index_dir)
    chosen = resolve_rule(index, rule, min_score=min_score, min_margin=min_margin, vote=vote)
    counts = index.label_counts
    resolved = resolve(inputs, stdin=stdin)
    for skipped in resolved.skipped:
        report("warning", skipped)
    for problem in resolved.problems:
        report("error", problem)
    recognizer = load_recognizer_for(index, model_dir)
    paths = resolved.paths
    for indices, features, failures in recognizer.iter_batches(paths, batch_size=batch_size):
        for failure in failures:
            report("error", failure.message)
        for position, hits in zip(indices, index.search(features, k, exact=exact), strict=True):
            decision = chosen.decide(hits, counts)
            yield SearchResult(
                paths[position],
                decision.label,
                decision.score,
                hits,
                candidate=decision.candidate,
                margin=decision.margin,
                accepted=decision.accepted,
                reason=decision.reason,
            )


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
