"""Retrieval metrics: Recall@k and mAP of query features against gallery features.

The ranking rule (both modes): for each query, the gallery is ordered by similarity ``q · g`` (float32 matmul,
larger = closer), **ties broken by gallery index, lower first** (what a stable descending sort gives). Nothing
is excluded: an image present in both lists finds itself (as PaddleClas on a ShiTuRecDataset, which has no
camera column). A gallery item is a *positive* of a query when their labels are equal.

Per query: ``rank`` of a positive = 1 + the number of gallery items ordered before it; a query *hits at k*
when its best positive has rank <= k; its average precision is ``AP = mean over its positives p of
(positives up to p) / rank(p)`` over the **full** ranking.

Modes (they share the per-query values and differ only in how queries are combined):

- ``"exact"``: global ratios over the whole query set. ``recall@k = hits at k / queries with >= 1 positive``,
  ``mAP = mean AP over queries with >= 1 positive``. Queries without a positive in the gallery are excluded from
  both and counted in ``num_queries_without_positive``; when no query has one the metrics are NaN.
- ``"paddlex"``: PaddleClas' ``retrieval_eval`` (``ppcls/engine/evaluation/retrieval.py`` with ``Recallk`` and
  ``mAP`` of ``ppcls/metric/metrics.py``), quirk for quirk: queries are cut into blocks of ``sim_block_size``
  (default 64, PaddleX's ``Global.sim_block_size``) in list order; per block ``recall@k = hits / queries of the
  block with a positive`` and ``mAP = mean AP of those queries``; a block with no such query gives NaN for every
  metric (0/0), which then propagates; the blocks are combined as ``Σ metric_b · n_b / N_query`` (``n_b`` counts
  *all* queries of the block). That is not the global ratio when positive-less queries are spread unevenly.
  Differences from Paddle that remain: the sums run in float64 here (Paddle computes each block's values in
  float32, so results agree to ~1e-6, not bit for bit); Paddle's unstable ``argsort`` orders exactly tied
  similarities in an unspecified way, here ties follow the rule above; ``k`` larger than the gallery is an
  IndexError in Paddle and simply "every positive found" here.

How it is computed (exact, never the full query x gallery matrix, never a sort of a whole gallery row): queries
go in blocks (``block_size``, also capped so one block of similarities stays near 256 MB); per block one float32
matmul gives the similarities. Only gallery items scoring at least a query's *worst* positive can precede one
of its positives. When those candidates are few (a trained model), they and the positives get an exact
order-preserving integer key ``(row, score descending, gallery index)`` and one ``searchsorted`` among the
sorted positive keys counts, for every positive, the items before it; when they are many (an untrained
model), each positive's rank is counted directly over the row (``#greater + #equal with a lower index``).
Either way the cost is the matmul plus work linear in the row; the benchmark (benchmarks/bench_eval.py) measures
the metrics at about 1.1x the bare block matmuls (1.6x for an untrained model).

The results are exact for the float32 similarities the matmul produced. BLAS may round a similarity one ulp
differently for another block shape, which can swap two items whose similarities are within ~1e-7 of each
other (measured at 100k x 100k: mAP moved by 1e-8 between two block sizes, recall did not move).

Written by hand because no maintained library computes exact, streamed retrieval mAP with a defined tie rule
(scikit-learn's ``average_precision_score`` needs a full score row per query and averages ties differently).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shitu.errors import ShituError

MODES = ("exact", "paddlex")
DEFAULT_TOPK = (1, 5)
PADDLEX_SIM_BLOCK_SIZE = 64

# One block of float32 similarities is kept near this many bytes; candidate bookkeeping (about 40 bytes per
# candidate at worst) runs in sub-blocks of at most _CANDIDATE_ELEMENTS similarities.
_SIMILARITY_BLOCK_BYTES = 256 * 2**20
_CANDIDATE_ELEMENTS = 2**22
# Counting per positive costs ~3 ns per similarity and positive, ranking candidates ~180 ns per candidate.
_SLOT_COST_RATIO = 60


@dataclass(frozen=True)
class ClassRecall:
    """Recall@1 of the queries of one class (only queries that have a positive)."""

    label: int
    queries: int
    hits: int

    @property
    def recall1(self) -> float:
        return self.hits / self.queries if self.queries else math.nan


@dataclass(frozen=True)
class ConfusedPair:
    """``count`` queries of class ``query_label`` whose top-1 gallery item has label ``predicted_label``."""

    query_label: int
    predicted_label: int
    count: int


@dataclass
class RetrievalMetrics:
    """What :func:`retrieval_metrics` measured.

    Per query (list order): ``first_positive_rank`` (1-based rank of the best positive, 0 when the query has
    none) and ``average_precision`` (NaN when it has none). ``ranking``/``ranking_scores`` hold the top
    ``keep_ranking`` gallery indices and similarities per query when asked for.
    """

    recall: dict[int, float]
    mAP: float
    mode: str
    num_queries: int
    num_gallery: int
    num_queries_without_positive: int
    first_positive_rank: np.ndarray
    average_precision: np.ndarray
    sim_block_size: int | None = None
    per_class: list[ClassRecall] | None = None
    confused_pairs: list[ConfusedPair] = field(default_factory=list)
    ranking: np.ndarray | None = None
    ranking_scores: np.ndarray | None = None

    @property
    def topk(self) -> list[int]:
        return sorted(self.recall)

    def headline(self) -> dict[str, float | None]:
        """``{"recall1": .., "recall5": .., ..., "mAP": ..}`` (NaN as None)."""
        values: dict[str, float | None] = {f"recall{k}": _finite_or_none(self.recall[k]) for k in self.topk}
        values["mAP"] = _finite_or_none(self.mAP)
        return values

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary: the headline metrics, the counts, and per-class / confused pairs if computed."""
        doc: dict[str, Any] = {
            **self.headline(),
            "num_queries": self.num_queries,
            "num_queries_without_positive": self.num_queries_without_positive,
            "num_gallery": self.num_gallery,
            "mode": self.mode,
            "topk": self.topk,
        }
        if self.sim_block_size is not None:
            doc["sim_block_size"] = self.sim_block_size
        if self.per_class is not None:
            doc["per_class"] = [
                {"label": c.label, "queries": c.queries, "hits": c.hits, "recall1": c.recall1} for c in self.per_class
            ]
        if self.confused_pairs:
            doc["confused_pairs"] = [
                {"query_label": p.query_label, "predicted_label": p.predicted_label, "count": p.count}
                for p in self.confused_pairs
            ]
        return doc


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


# ------------------------------------------------------------------------------------------------ validation


def _features(array: Any, what: str) -> np.ndarray:
    features = np.asarray(array)
    if features.ndim != 2:
        raise ShituError(f"{what} features must be a 2-D array [N, D], got shape {list(features.shape)}")
    if features.shape[0] == 0:
        raise ShituError(f"no {what} features: the {what} set is empty")
    if not np.issubdtype(features.dtype, np.floating):
        raise ShituError(f"{what} features must be floating point, got {features.dtype}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        raise ShituError(f"{what} features contain NaN or infinite values")
    return features


def _check_magnitude(queries: np.ndarray, gallery: np.ndarray) -> None:
    """|q·g| <= |q|·|g| bounds every similarity and partial sum: refuse features that could overflow float32."""

    def largest_squared_norm(features: np.ndarray) -> float:
        with np.errstate(over="ignore"):  # an overflow gives inf, which is refused below
            return float(np.einsum("ij,ij->i", features, features).max())

    if not largest_squared_norm(queries) * largest_squared_norm(gallery) < 1e74:
        raise ShituError("features are too large for float32 similarities: L2-normalise them first")


def _labels(array: Any, count: int, what: str) -> np.ndarray:
    labels = np.asarray(array)
    if labels.ndim == 2 and labels.shape[1] == 1:  # PaddleClas keeps labels as [N, 1]
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != count:
        raise ShituError(f"{what} labels must be a 1-D array of {count} labels, got shape {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ShituError(f"{what} labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _topk(topk: int | Iterable[int]) -> tuple[int, ...]:
    values = [topk] if isinstance(topk, (int, np.integer)) else list(topk)
    if not values or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in values):
        raise ShituError(f"topk must be positive integers, got {values}")
    return tuple(sorted({int(k) for k in values}))


# ------------------------------------------------------------------------------------------------ the engine


class _GalleryGroups:
    """Gallery indices grouped by label, so a query's positives are one slice (no query x gallery label mask)."""

    def __init__(self, gallery_labels: np.ndarray) -> None:
        self.labels, inverse, self.sizes = np.unique(gallery_labels, return_inverse=True, return_counts=True)
        self.order = np.argsort(inverse, kind="stable")  # gallery indices, grouped by label, index order inside
        self.starts = np.cumsum(self.sizes) - self.sizes

    def positive_counts_and_starts(self, query_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query: how many gallery items share its label, and where they start in ``order``."""
        where = np.searchsorted(self.labels, query_labels)
        where = np.minimum(where, len(self.labels) - 1)
        found = self.labels[where] == query_labels
        counts = np.where(found, self.sizes[where], 0).astype(np.int64)
        starts = np.where(found, self.starts[where], 0).astype(np.int64)
        return counts, starts

    def positive_columns(self, counts: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Gallery indices of the positives of each query, concatenated in query order."""
        total = int(counts.sum())
        first = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
        return self.order[np.repeat(starts, counts) + within]


def _order_keys(rows: np.ndarray, scores: np.ndarray, cols: np.ndarray, col_bits: int) -> np.ndarray:
    """uint64 keys whose integer order is (row ascending, score descending, column ascending), exactly.

    ``scores`` are float32 with -0.0 already turned into +0.0 (equal floats must give equal keys). The float's
    bits are mapped to an unsigned integer with the float's order (the usual sign-flip trick), then inverted
    for descending order.
    """
    bits = scores.view(np.uint32)
    ascending = np.where((bits & np.uint32(0x80000000)) != 0, ~bits, bits | np.uint32(0x80000000))
    descending = (~ascending).astype(np.uint64)
    keys = rows.astype(np.uint64) << np.uint64(32 + col_bits)
    keys |= descending << np.uint64(col_bits)
    keys |= cols.astype(np.uint64)
    return keys


def _rank_block(
    sims: np.ndarray, counts: np.ndarray, pos_cols: np.ndarray, col_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``sims`` [r, N]: (rank of the best positive or 0, AP or NaN), exactly, under the tie rule.

    ``counts[i]`` positives of row i are at gallery columns ``pos_cols`` (concatenated in row order). Two exact
    methods, picked by estimated cost: ranking the candidates (items scoring at least the row's worst positive)
    through sorted keys, about 180 ns per candidate here, or counting per positive over the whole row, about
    3 ns per similarity and positive (better when most of a row outranks some positive, e.g. an untrained model).
    """
    rows, n = sims.shape
    first_rank = np.zeros(rows, np.int64)
    average_precision = np.full(rows, np.nan)
    total = int(counts.sum())
    if total == 0:
        return first_rank, average_precision
    pos_rows = np.repeat(np.arange(rows, dtype=np.int64), counts)
    pos_scores = sims[pos_rows, pos_cols] + np.float32(0.0)  # + 0.0 turns -0.0 into +0.0
    has = counts > 0
    row_start = np.cumsum(counts) - counts  # where each row's positives start (they are grouped by row)
    threshold = np.full(rows, np.inf, np.float32)
    threshold[has] = np.minimum.reduceat(pos_scores, row_start[has])
    # Only items scoring >= the row's worst positive can precede a positive; the positives are among them.
    candidates = sims >= threshold[:, None]
    num_candidates = int(np.count_nonzero(candidates))
    if int(counts.max()) * rows * n < _SLOT_COST_RATIO * num_candidates:
        del candidates
        rank = _ranks_by_counting(sims, counts, pos_rows, pos_scores, pos_cols, row_start)
    else:
        rank = _ranks_by_keys(sims, candidates, counts, pos_rows, pos_scores, pos_cols, col_bits)
    found_so_far = np.arange(1, total + 1, dtype=np.int64) - np.repeat(row_start, counts)
    precision = found_so_far / rank
    first_rank[has] = rank[row_start[has]]
    average_precision[has] = np.add.reduceat(precision, row_start[has]) / counts[has]
    return first_rank, average_precision


def _ranks_by_keys(
    sims: np.ndarray,
    candidates: np.ndarray,
    counts: np.ndarray,
    pos_rows: np.ndarray,
    pos_scores: np.ndarray,
    pos_cols: np.ndarray,
    col_bits: int,
) -> np.ndarray:
    """Ranks of the positives, grouped by row and in rank order inside a row, from the candidate mask."""
    rows, n = sims.shape
    total = len(pos_rows)
    pos_keys = np.sort(_order_keys(pos_rows, pos_scores, pos_cols, col_bits))
    flat = np.flatnonzero(candidates)
    del candidates
    cand_rows = flat // n
    cand_keys = _order_keys(cand_rows, sims.reshape(-1)[flat] + np.float32(0.0), flat - cand_rows * n, col_bits)
    del flat
    # A candidate precedes the positive at sorted position p (same row) iff its key < pos_keys[p], i.e. iff
    # searchsorted(..., "right") <= p (a positive is not counted before itself).
    starts = np.searchsorted(pos_keys, cand_keys, side="right")
    preceding = np.cumsum(np.bincount(starts, minlength=total + 1)[:total])
    per_row = np.bincount(cand_rows, minlength=rows)
    earlier_rows = np.cumsum(per_row) - per_row  # candidates of earlier rows: all counted in ``preceding``
    return 1 + preceding - np.repeat(earlier_rows, counts)


def _ranks_by_counting(
    sims: np.ndarray,
    counts: np.ndarray,
    pos_rows: np.ndarray,
    pos_scores: np.ndarray,
    pos_cols: np.ndarray,
    row_start: np.ndarray,
) -> np.ndarray:
    """Ranks of the positives, grouped by row and in rank order inside a row, by counting per positive slot:
    rank = 1 + #(score > s) + #(score == s and index < its index)."""
    rows, n = sims.shape
    total = len(pos_rows)
    slot = np.arange(total, dtype=np.int64) - np.repeat(row_start, counts)
    slots = int(counts.max())
    padded = np.full((rows, slots), np.inf, np.float32)  # a missing slot compares greater than everything
    padded[pos_rows, slot] = pos_scores
    rank = np.empty(total, np.int64)
    scratch = np.empty((rows, n), bool)
    for j in range(slots):
        present = counts > j
        where = row_start[present] + j
        column = padded[:, j : j + 1]
        np.greater(sims, column, out=scratch)
        greater = np.count_nonzero(scratch, axis=1)
        np.equal(sims, column, out=scratch)
        tied = np.count_nonzero(scratch, axis=1)
        rank[where] = 1 + greater[present]
        for row in np.flatnonzero(present & (tied > 1)):  # exact ties: the lower gallery index goes first
            index = row_start[row] + j
            rank[index] += int(np.count_nonzero(sims[row, : pos_cols[index]] == padded[row, j]))
    order = np.lexsort((rank, pos_rows))
    return rank[order]


def _top_ranked(sims: np.ndarray, k: int, col_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` gallery indices of each row under the ranking rule, and their similarities."""
    rows, n = sims.shape
    kth = np.partition(sims, n - k, axis=1)[:, n - k]
    flat = np.flatnonzero(sims >= kth[:, None])
    cand_rows = flat // n
    keys = np.sort(_order_keys(cand_rows, sims.reshape(-1)[flat] + np.float32(0.0), flat - cand_rows * n, col_bits))
    per_row = np.bincount(cand_rows, minlength=rows)
    take = (np.cumsum(per_row) - per_row)[:, None] + np.arange(k)
    cols = (keys[take] & np.uint64((1 << col_bits) - 1)).astype(np.int64)
    return cols, np.take_along_axis(sims, cols, axis=1)


def similarity_block_rows(num_gallery: int, block_size: int = 1024) -> int:
    """Queries per similarity block: at most ``block_size``, and few enough that one float32 block of
    ``rows x num_gallery`` similarities stays near 256 MB (at least one row)."""
    return max(1, min(int(block_size), _SIMILARITY_BLOCK_BYTES // (4 * num_gallery)))


def retrieval_metrics(
    query_features: Any,
    query_labels: Any,
    gallery_features: Any,
    gallery_labels: Any,
    *,
    topk: int | Iterable[int] = DEFAULT_TOPK,
    block_size: int = 1024,
    mode: str = "exact",
    sim_block_size: int = PADDLEX_SIM_BLOCK_SIZE,
    per_class: bool = False,
    confusion_pairs: int = 0,
    keep_ranking: int = 0,
) -> RetrievalMetrics:
    """Recall@k (every k of ``topk``) and mAP of the queries against the gallery; see the module docstring.

    Features are float [N, D] (L2-normalised for cosine similarity; converted to float32), labels int [N].
    ``block_size`` bounds the queries per similarity block (memory; see the module docstring on float32 rounding).
    ``mode`` is ``"exact"`` or ``"paddlex"`` (``sim_block_size`` is PaddleClas' block, used in that mode only).
    ``per_class`` adds recall@1 per query class; ``confusion_pairs=n`` the n most frequent (query class, wrong
    top-1 class) pairs (queries with a positive only); ``keep_ranking=k`` keeps each query's top-k gallery
    indices and similarities. Raises ShituError for bad shapes, empty sets, NaN/inf features or bad options.
    """
    if mode not in MODES:
        raise ShituError(f"unknown evaluation mode {mode!r} (choose from {', '.join(MODES)})")
    for name, value in (("block_size", block_size), ("sim_block_size", sim_block_size)):
        if int(value) < 1:
            raise ShituError(f"{name} must be at least 1, got {value}")
    if confusion_pairs < 0 or keep_ranking < 0:
        raise ShituError("confusion_pairs and keep_ranking must not be negative")
    ks = _topk(topk)
    queries = _features(query_features, "query")
    gallery = _features(gallery_features, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise ShituError(f"query features have {queries.shape[1]} dimensions but gallery features {gallery.shape[1]}")
    _check_magnitude(queries, gallery)
    q_labels = _labels(query_labels, queries.shape[0], "query")
    g_labels = _labels(gallery_labels, gallery.shape[0], "gallery")
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]

    groups = _GalleryGroups(g_labels)
    counts, starts = groups.positive_counts_and_starts(q_labels)
    col_bits = max(1, (num_gallery - 1).bit_length())
    max_rows_for_keys = 1 << max(0, 32 - col_bits)  # row, 32 score bits and column must fit in 64 bits
    rows_per_block = similarity_block_rows(num_gallery, block_size)
    rows_per_sub = max(1, min(rows_per_block, max_rows_for_keys, _CANDIDATE_ELEMENTS // num_gallery))
    top_k = min(keep_ranking, num_gallery)
    need_top1 = confusion_pairs > 0

    first_rank = np.zeros(num_queries, np.int64)
    average_precision = np.full(num_queries, np.nan)
    top1 = np.zeros(num_queries, np.int64) if need_top1 else None
    ranking = np.zeros((num_queries, top_k), np.int64) if top_k else None
    ranking_scores = np.zeros((num_queries, top_k), np.float32) if top_k else None
    # One block at a time, ranked right after its matmul. Computing the next block's matmul in a thread while
    # this one is ranked measured slower on 2 cores (BLAS already keeps every core busy; benchmarks/RESULTS.md).
    buffer = np.empty((min(rows_per_block, num_queries), num_gallery), np.float32)
    for block_start in range(0, num_queries, rows_per_block):
        block_stop = min(block_start + rows_per_block, num_queries)
        sims = buffer[: block_stop - block_start]
        np.matmul(queries[block_start:block_stop], gallery.T, out=sims)
        for sub_start in range(0, block_stop - block_start, rows_per_sub):
            lo = block_start + sub_start
            hi = min(lo + rows_per_sub, block_stop)
            part = sims[sub_start : sub_start + (hi - lo)]
            sub_counts = counts[lo:hi]
            pos_cols = groups.positive_columns(sub_counts, starts[lo:hi])
            first_rank[lo:hi], average_precision[lo:hi] = _rank_block(part, sub_counts, pos_cols, col_bits)
            if ranking is not None and ranking_scores is not None:
                ranking[lo:hi], ranking_scores[lo:hi] = _top_ranked(part, top_k, col_bits)
            if top1 is not None:
                top1[lo:hi] = np.argmax(part, axis=1)  # the first maximum: lowest index among ties, as the rule

    has_positive = counts > 0
    with_positive = int(has_positive.sum())
    if mode == "exact":
        recall = {k: _ratio(int(((first_rank >= 1) & (first_rank <= k)).sum()), with_positive) for k in ks}
        mean_ap = float(average_precision[has_positive].mean()) if with_positive else math.nan
        block = None
    else:
        recall, mean_ap = _paddlex_combine(first_rank, average_precision, has_positive, ks, int(sim_block_size))
        block = int(sim_block_size)

    return RetrievalMetrics(
        recall=recall,
        mAP=mean_ap,
        mode=mode,
        num_queries=num_queries,
        num_gallery=num_gallery,
        num_queries_without_positive=num_queries - with_positive,
        first_positive_rank=first_rank,
        average_precision=average_precision,
        sim_block_size=block,
        per_class=_per_class(q_labels, first_rank, has_positive) if per_class else None,
        confused_pairs=(
            _confused_pairs(q_labels, g_labels, first_rank, has_positive, top1, confusion_pairs)
            if top1 is not None
            else []
        ),
        ranking=ranking,
        ranking_scores=ranking_scores,
    )


def _ratio(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def _paddlex_combine(
    first_rank: np.ndarray, average_precision: np.ndarray, has_positive: np.ndarray, ks: tuple[int, ...], block: int
) -> tuple[dict[int, float], float]:
    """PaddleClas' per-block metrics combined as ``metric += metric_b * n_b / N`` (in this order, float64)."""
    num_queries = len(first_rank)
    recall = dict.fromkeys(ks, 0.0)
    mean_ap = 0.0
    for start in range(0, num_queries, block):
        stop = min(start + block, num_queries)
        size = stop - start
        relevant = has_positive[start:stop]
        with_positive = int(relevant.sum())
        ranks = first_rank[start:stop]
        for k in ks:
            block_recall = _ratio(int(((ranks >= 1) & (ranks <= k)).sum()), with_positive)
            recall[k] += block_recall * size / num_queries
        block_ap = float(average_precision[start:stop][relevant].mean()) if with_positive else math.nan
        mean_ap += block_ap * size / num_queries
    return recall, mean_ap


def _per_class(labels: np.ndarray, first_rank: np.ndarray, has_positive: np.ndarray) -> list[ClassRecall]:
    classes, inverse = np.unique(labels[has_positive], return_inverse=True)
    queries = np.bincount(inverse, minlength=len(classes))
    hits = np.bincount(inverse, weights=(first_rank[has_positive] == 1), minlength=len(classes))
    return [ClassRecall(int(c), int(q), int(h)) for c, q, h in zip(classes, queries, hits, strict=True)]


def _confused_pairs(
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    first_rank: np.ndarray,
    has_positive: np.ndarray,
    top1: np.ndarray,
    limit: int,
) -> list[ConfusedPair]:
    """The ``limit`` most frequent (query class → wrong top-1 class) pairs; ties by the labels, ascending."""
    wrong = has_positive & (first_rank != 1)
    if not wrong.any():
        return []
    pairs = np.stack([query_labels[wrong], gallery_labels[top1[wrong]]], axis=1)
    unique, pair_counts = np.unique(pairs, axis=0, return_counts=True)  # sorted by (query, predicted)
    order = np.argsort(-pair_counts, kind="stable")[:limit]
    return [ConfusedPair(int(unique[i, 0]), int(unique[i, 1]), int(pair_counts[i])) for i in order]
