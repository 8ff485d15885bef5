"""Choose an index's decision rule from data: how sure must a match be before it is answered?

Every query of the dataset is searched twice against the index's stored vectors (exact cosine, numpy):

- as a *known* item: the whole gallery; the right answer is its label;
- as an *unknown* item: its label's gallery items held out; the right answer is "unknown".

(A query whose label has no gallery item at all is only an unknown.) Accepting the right label counts as a
true positive; accepting anything else (a wrong label, or any label for an unknown) as a false positive.
``precision = TP / accepted`` and ``recall = TP / known queries``. The thresholds swept are every observed
score for ``min_score`` and a few margins for ``min_margin``; the rule kept reaches ``target_precision``
with the largest recall (or has the largest F1 with ``max_f1``). "Reaches" is judged by the precision's
lower confidence bound (``confidence``, default 0.9), not its observed value: the best of many rules fit
on a few dozen queries looks better than it is.

The queries are first split in two by ``by``: ``class`` puts whole classes in one part (the held-out part's
products were never seen while fitting), ``image`` splits query images. The rule is fit on one part and its
precision and recall are reported on the other, so the numbers describe how it does on new queries; the
rule stored is the one fit, unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError
from shitu.index.decision import DEFAULT_VOTE, DecisionRule

BY = ("class", "image")
#: Margins tried besides "no margin test" (cosine similarity units).
MARGINS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12)
#: Confidence with which the fit queries must show the target precision (see precision_lower_bound).
DEFAULT_CONFIDENCE = 0.9
CALIBRATION_JSON = "calibration.json"
CALIBRATION_PNG = "calibration.png"


@dataclass(frozen=True)
class _Hit:
    label: int
    score: float


@dataclass
class Observations:
    """One row per (query, known|unknown) search: the candidate's score and margin (NaN: no other label in
    the hits), whether the candidate is the right answer, whether the query was known, and its unit (class
    or query number) for the fit/held-out split."""

    score: np.ndarray
    margin: np.ndarray
    right: np.ndarray
    known: np.ndarray
    unit: np.ndarray


@dataclass(frozen=True)
class OperatingPoint:
    """Precision, recall and counts of one rule on a set of observations."""

    min_score: float | None
    min_margin: float | None
    precision: float
    recall: float
    f1: float
    known: int
    unknown: int
    right_accepted: int
    wrong_accepted: int
    unknown_rejected: int

    def to_json(self) -> dict[str, Any]:
        return {key: _rounded(value) for key, value in self.__dict__.items()}


def _rounded(value: Any) -> Any:
    return round(float(value), 6) if isinstance(value, (float, np.floating)) else value


@dataclass
class Calibration:
    """What :func:`calibrate` chose and measured. ``reached``: the target precision was met on the fit part
    (else the rule of highest precision is kept)."""

    rule: DecisionRule
    by: str
    objective: str
    target_precision: float | None
    confidence: float | None  # the target is judged by the precision's lower bound at this confidence
    reached: bool
    fit: OperatingPoint
    held_out: OperatingPoint
    without_rule: OperatingPoint  # the held-out part answered as before (no thresholds)
    curve: list[dict[str, float]]
    held_out_curve: list[dict[str, float]]
    num_queries: int
    num_classes: int
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What the index keeps in its description (no curves)."""
        return {
            "by": self.by,
            "objective": self.objective,
            "target_precision": self.target_precision,
            "confidence": self.confidence,
            "reached": self.reached,
            "fit": self.fit.to_json(),
            "held_out": self.held_out.to_json(),
            "num_queries": self.num_queries,
            "num_classes": self.num_classes,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule.to_json(),
            **self.summary(),
            "without_rule": self.without_rule.to_json(),
            "curve": self.curve,
            "held_out_curve": self.held_out_curve,
            "files": self.files,
        }


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest values per row, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def observe(
    gallery: np.ndarray,
    gallery_labels: Sequence[int],
    queries: np.ndarray,
    query_labels: Sequence[int],
    *,
    vote: str = DEFAULT_VOTE,
    k: int = 5,
    by: str = "class",
) -> Observations:
    """Search every query as a known and as an unknown item (see the module docstring)."""
    if by not in BY:
        raise ShituError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    g_labels = np.asarray(gallery_labels, np.int64)
    q_labels = np.asarray(query_labels, np.int64)
    sims = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
    counts = {int(label): int(n) for label, n in zip(*np.unique(g_labels, return_counts=True), strict=True)}
    rule = DecisionRule(vote=vote)
    rows: list[tuple[float, float, bool, bool, int]] = []
    for known in (True, False):
        masked = sims.copy()
        if not known:
            masked[q_labels[:, None] == g_labels[None, :]] = -np.inf
        top = _topk(masked, k)
        for q in range(len(q_labels)):
            label = int(q_labels[q])
            if known and label not in counts:
                continue  # no gallery item: this query can only be an unknown
            here = dict(counts)
            if not known:
                here.pop(label, None)
            hits = [_Hit(int(g_labels[g]), float(masked[q, g])) for g in top[q] if np.isfinite(masked[q, g])]
            if not hits:
                continue
            decision = rule.decide(hits, here)
            margin = np.nan if decision.margin is None else decision.margin
            unit = label if by == "class" else q
            rows.append((decision.score, margin, known and decision.candidate == label, known, unit))
    if not rows:
        raise ShituError("no query could be searched: the gallery and the queries share nothing")
    score, margin, right, known_flags, unit = (np.asarray(column) for column in zip(*rows, strict=True))
    return Observations(score.astype(np.float64), margin.astype(np.float64), right.astype(bool),
                        known_flags.astype(bool), unit.astype(np.int64))  # fmt: skip


def split_units(units: np.ndarray, held_out: float, seed: int) -> np.ndarray:
    """A boolean mask of the observations whose unit falls in the held-out share (at least one unit on
    each side when there are two or more)."""
    distinct = np.unique(units)
    if len(distinct) < 2:
        raise ShituError("calibration needs at least two classes (or query images) to hold some out")
    if not 0.0 < held_out < 1.0:
        raise ShituError(f"the held-out share must be between 0 and 1, got {held_out}")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(distinct)
    count = min(len(distinct) - 1, max(1, round(held_out * len(distinct))))
    return np.isin(units, shuffled[:count])


def operating_point(obs: Observations, min_score: float | None, min_margin: float | None) -> OperatingPoint:
    """How the rule ``(min_score, min_margin)`` does on ``obs``."""
    accepted = np.ones(len(obs.score), bool)
    if min_score is not None:
        accepted &= obs.score >= min_score
    if min_margin is not None:
        accepted &= np.isnan(obs.margin) | (obs.margin >= min_margin)
    tp = int((accepted & obs.right).sum())
    fp = int((accepted & ~obs.right).sum())
    known = int(obs.known.sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / known if known else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return OperatingPoint(
        min_score=min_score,
        min_margin=min_margin,
        precision=precision,
        recall=recall,
        f1=f1,
        known=known,
        unknown=int((~obs.known).sum()),
        right_accepted=tp,
        wrong_accepted=fp,
        unknown_rejected=int((~accepted & ~obs.known).sum()),
    )


def _counts(obs: Observations, min_margin: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(thresholds, right accepted, wrong accepted, known queries) for every distinct score as ``min_score``,
    highest threshold first."""
    passes = np.ones(len(obs.score), bool) if min_margin is None else np.isnan(obs.margin) | (obs.margin >= min_margin)
    order = np.argsort(-obs.score, kind="stable")
    scores = obs.score[order]
    tp = np.cumsum((obs.right & passes)[order])
    fp = np.cumsum((~obs.right & passes)[order])
    last = np.r_[scores[1:] != scores[:-1], True]  # the last row of each group of equal scores
    return scores[last], tp[last], fp[last], int(obs.known.sum())


def _curve(obs: Observations, min_margin: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, precision, recall) for every distinct score as ``min_score``, highest threshold first."""
    thresholds, tp, fp, known = _counts(obs, min_margin)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    return thresholds, precision, tp / max(1, known)


def precision_lower_bound(right: np.ndarray, accepted: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of the precision ``right / accepted`` at ``confidence`` (0: the
    observed precision itself; nothing accepted counts as precision 1, as in the curve).

    Why a bound: the rule is the best of thousands of (score, margin) pairs fit on a few dozen queries, so its
    observed precision is optimistic; requiring the bound to reach the target keeps that optimism out of the
    choice (exact binomial bound, from scipy's beta distribution)."""
    right = np.asarray(right, np.float64)
    accepted = np.asarray(accepted, np.float64)
    observed = np.where(accepted > 0, right / np.maximum(accepted, 1), 1.0)
    if confidence <= 0.0:
        return observed
    from scipy.stats import beta

    bound = beta.ppf(1.0 - confidence, np.maximum(right, 1e-12), accepted - right + 1.0)
    return np.where(accepted == 0, 1.0, np.where(right == 0, 0.0, bound))


def choose_rule(
    obs: Observations, *, target_precision: float | None = 0.99, max_f1: bool = False, confidence: float = 0.0
) -> tuple[float, float | None, bool]:
    """``(min_score, min_margin, reached)`` fit on ``obs``: the largest recall at precision >= target (ties:
    the higher precision, then the lower thresholds), or the largest F1 with ``max_f1``. When no rule
    reaches the target, the one of highest observed precision (then recall) with ``reached`` False.

    ``confidence`` > 0 judges precision by its lower confidence bound (:func:`precision_lower_bound`)
    instead of the observed value: a rule is only taken to reach the target when the fit queries show it
    with that confidence."""
    if not max_f1 and (target_precision is None or not 0.0 < target_precision <= 1.0):
        raise ShituError(f"the target precision must be in (0, 1], got {target_precision}")
    if not 0.0 <= confidence < 1.0:
        raise ShituError(f"the confidence must be in [0, 1), got {confidence}")
    best: tuple[Any, ...] | None = None
    reached_any = False
    for margin in (None, *MARGINS):
        thresholds, tp, fp, known = _counts(obs, margin)
        recall = tp / max(1, known)
        observed = precision_lower_bound(tp, tp + fp, 0.0)
        judged = observed if max_f1 or confidence == 0.0 else precision_lower_bound(tp, tp + fp, confidence)
        margin_cost = 1.0 if margin is None else -margin  # no margin test is preferred, then smaller ones
        rows = zip(thresholds.tolist(), observed.tolist(), judged.tolist(), recall.tolist(), strict=True)
        for t, p, bound, r in rows:
            if max_f1:
                f1 = 2 * p * r / (p + r) if p + r else 0.0
                key: tuple[Any, ...] = (True, f1, p, margin_cost, -t)
            else:
                ok = bound >= target_precision  # type: ignore[operator]
                # not reached: the highest observed precision, as without a bound (the highest bound would
                # favour accepting many answers at a lower precision)
                key = (ok, r, p, margin_cost, -t) if ok else (ok, p, r, margin_cost, -t)
            reached_any |= bool(key[0])
            if best is None or key > best[0]:
                best = (key, t, margin)
    assert best is not None  # observations are never empty
    return float(best[1]), best[2], bool(max_f1 or reached_any)


def _curve_points(obs: Observations, min_margin: float | None, limit: int = 200) -> list[dict[str, float]]:
    thresholds, precision, recall = _curve(obs, min_margin)
    picks = np.unique(np.linspace(0, len(thresholds) - 1, min(limit, len(thresholds))).round().astype(int))
    return [
        {"min_score": round(float(thresholds[i]), 6), "precision": round(float(precision[i]), 6),
         "recall": round(float(recall[i]), 6)}
        for i in picks
    ]  # fmt: skip


def calibrate(
    gallery: np.ndarray,
    gallery_labels: Sequence[int],
    queries: np.ndarray,
    query_labels: Sequence[int],
    *,
    by: str = "class",
    target_precision: float | None = 0.99,
    max_f1: bool = False,
    vote: str = DEFAULT_VOTE,
    k: int = 5,
    held_out: float = 0.5,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Calibration:
    """Fit a decision rule on part of the queries and measure it on the rest (see the module docstring).

    ``gallery``/``queries``: features [N, D] (unit rows); ``held_out``: the share of units (classes or
    query images, by ``by``) kept out of the fit."""
    obs = observe(gallery, gallery_labels, queries, query_labels, vote=vote, k=k, by=by)
    test_mask = split_units(obs.unit, held_out, seed)

    def part(mask: np.ndarray) -> Observations:
        return Observations(obs.score[mask], obs.margin[mask], obs.right[mask], obs.known[mask], obs.unit[mask])

    fit, test = part(~test_mask), part(test_mask)
    min_score, min_margin, reached = choose_rule(
        fit, target_precision=target_precision, max_f1=max_f1, confidence=confidence
    )
    rule = DecisionRule(min_score=min_score, min_margin=min_margin, vote=vote)
    return Calibration(
        rule=rule,
        by=by,
        objective="max_f1" if max_f1 else "target_precision",
        target_precision=None if max_f1 else target_precision,
        confidence=None if max_f1 else confidence,
        reached=reached,
        fit=operating_point(fit, min_score, min_margin),
        held_out=operating_point(test, min_score, min_margin),
        without_rule=operating_point(test, None, None),
        curve=_curve_points(fit, min_margin),
        held_out_curve=_curve_points(test, min_margin),
        num_queries=len(query_labels),
        num_classes=len(set(int(label) for label in query_labels)),
    )


def plot_calibration(result: Calibration, target: Path) -> Path:
    """Precision against recall (fit and held-out parts) with the chosen rule marked, and both against the
    minimum score; a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shitu.fileio import atomic_open

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points, style in (("fit", result.curve, "-"), ("held out", result.held_out_curve, "--")):
        left.plot([p["recall"] for p in points], [p["precision"] for p in points], style, label=name)
        thresholds = [p["min_score"] for p in points]
        right.plot(thresholds, [p["precision"] for p in points], style, label=f"precision ({name})")
        right.plot(thresholds, [p["recall"] for p in points], style, label=f"recall ({name})")
    left.plot([result.held_out.recall], [result.held_out.precision], "o", color="black", label="chosen (held out)")
    if result.target_precision is not None:
        left.axhline(result.target_precision, color="grey", linewidth=0.8)
    if result.rule.min_score is not None:
        right.axvline(result.rule.min_score, color="black", linewidth=0.8)
    left.set(xlabel="recall (known queries answered right)", ylabel="precision", title="precision / recall")
    margin = "none" if result.rule.min_margin is None else f"{result.rule.min_margin:g}"
    right.set(xlabel="minimum score", title=f"vote {result.rule.vote}, minimum margin {margin}")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.tight_layout()
    with atomic_open(target, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
    return target


def default_output(index_dir: str | os.PathLike[str]) -> Path:
    """Where the curve goes by default: ``INDEX_DIR-calibration`` beside the index (the index folder itself
    holds only its own files)."""
    folder = Path(index_dir).absolute()
    return folder.with_name(folder.name + "-calibration")


def calibrate_index(
    index_dir: str | os.PathLike[str],
    dataset: str | os.PathLike[str],
    *,
    by: str = "class",
    target_precision: float | None = 0.99,
    max_f1: bool = False,
    vote: str | None = None,
    k: int = 5,
    held_out: float = 0.5,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    model_dir: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    store: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Calibration:
    """Embed the dataset's query.txt with the index's recognizer (or ``model_dir``), :func:`calibrate` against
    the stored vectors, keep the rule in the index (saved as a unit; not with ``store=False``) and write
    ``calibration.json`` and ``calibration.png`` to ``output`` (default :func:`default_output`).
    ``vote``: default the index's current vote. An unreadable query image is a ShituError."""
    from shitu.fileio import atomic_write_json
    from shitu.index.core import open_index
    from shitu.index.ops import load_recognizer_for, read_labelled_list

    index = open_index(index_dir)
    queries = read_labelled_list(dataset, default_split="query")
    if queries.errors:
        more = f" (and {len(queries.errors) - 1} more)" if len(queries.errors) > 1 else ""
        raise ShituError(queries.errors[0] + more)
    if not queries.paths:
        raise ShituError("no query images", path=queries.file)
    recognizer = load_recognizer_for(index, model_dir)
    embedded = recognizer.embed(queries.paths, batch_size=batch_size, progress=progress)
    if embedded.failures:
        raise ShituError(embedded.failures[0].message, path=queries.file)
    items, vectors = index.vectors()
    result = calibrate(
        vectors,
        [item.label for item in items],
        embedded.features,
        [queries.labels[i] for i in embedded.indices],
        by=by,
        target_precision=target_precision,
        max_f1=max_f1,
        vote=vote or index.decision_rule.vote,
        k=k,
        held_out=held_out,
        seed=seed,
        confidence=confidence,
    )
    folder = Path(output) if output is not None else default_output(index_dir)
    result.files = {"json": str(folder / CALIBRATION_JSON), "png": str(folder / CALIBRATION_PNG)}
    plot_calibration(result, folder / CALIBRATION_PNG)
    atomic_write_json(folder / CALIBRATION_JSON, result.to_json())
    if store:
        index.set_decision_rule(result.rule, {**result.summary(), "dataset": str(Path(dataset).absolute())})
        index.save()
    return result


def summarise(points: Sequence[Mapping[str, float]], count: int = 6) -> list[Mapping[str, float]]:
    """``count`` points spread over a curve (for a short table)."""
    if len(points) <= count:
        return list(points)
    return [points[round(i * (len(points) - 1) / (count - 1))] for i in range(count)]
