"""A retrieval index: unit feature vectors in a usearch HNSW graph, with a label and a path per vector.

Layout of an index folder::

    INDEX_DIR/
      index.usearch   the usearch HNSW graph (vectors stored as f32, f16, bf16 or i8; compared by inner product,
                      or by cosine in indexes of format version 1), keyed by integer keys
      items.jsonl     one line per vector: {"key": int, "label": int, "path": str}, in key order
      vectors.npy     only with re-scoring: the unit vectors as float16 [count, dim], one row per item in key
                      order (memory-mapped on open)
      index.json      format name and version, dim, dtype, rescore, metric, graph_metric (and graph_scale for
                      i8), count, the recognizer it was built with, HNSW parameters, how the storage was chosen,
                      versions, and the SHA-256 of the files

Storage (``dtype``, see :func:`choose_storage`): the graph's vectors as f32, f16, bf16 or i8. The graph holds unit
rows and compares them by inner product (``graph_metric`` ``ip``), which equals their cosine without computing
two norms per comparison: at 100,000 × 512, an i8 graph built 1.8× and a bf16 graph 1.2× faster than with usearch's
cosine, and single queries walked it faster (benchmarks/RESULTS.md). i8 rows are the unit rows times one common
``graph_scale`` (127 over the largest component of the vectors the index was built with; later rows are clipped
to ±127), so that inner products between stored rows keep their order; a query is scaled by its own largest
component (its scale does not change the order) and its scores divided by both scales. Indexes of format
version 1 compare by cosine (``graph_metric`` ``cos``), with each i8 row scaled so its largest component is ±127;
they open and search as before. With ``rescore`` N > 0 a search takes
max(k, N) candidates from the graph and orders them by their exact cosine with the float16 copy in
vectors.npy, so the scores are the cosine of the stored float16 vectors whatever the graph's dtype. ``auto``
picks f32 without re-scoring for galleries under :data:`AUTO_COMPACT_FROM` vectors (memory is small) and
i8 with re-scoring from there on (less memory than f32, faster search at the same recall).

The folder is written as a unit (:func:`shitu.fileio.atomic_directory`: in a hidden sibling, then swapped into
place in one step), so a reader, or what a crash leaves, is only ever the old or the new index. A writer holds a
lock (the hidden sibling file ``.INDEX_DIR.shitu-lock`` while it writes, see :func:`index_lock`): a second one on
the same index is refused.
:func:`open_index` checks the checksums and that the three files agree, and turns anything wrong into one
:class:`~shitu.errors.ShituError` that names the file.

Scores are cosine similarities: larger is closer, 1 for the same direction.
:meth:`RetrievalIndex.search_arrays` answers with arrays (keys, scores, counts), :meth:`RetrievalIndex.search`
with :class:`Hit` lists built from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shitu.errors import ShituError

if TYPE_CHECKING:
    from shitu.index.decision import Decision, DecisionRule

INDEX_FILE = "index.usearch"
ITEMS_FILE = "items.jsonl"
INFO_FILE = "index.json"
FORMAT = "shitu-retrieval-index"
FORMAT_VERSION = 2
#: Format versions :func:`open_index` reads: 1 (graph compared by cosine, no graph_metric field) and 2.
READABLE_FORMAT_VERSIONS = (1, 2)
VECTORS_FILE = "vectors.npy"
DTYPES = ("f32", "f16", "bf16", "i8")
#: What ``dtype="auto"`` may become; see :func:`choose_storage`.
STORAGES = ("auto", *DTYPES)
#: From this many vectors ``auto`` stores the graph as i8 with re-scoring; below it, f32.
AUTO_COMPACT_FROM = 100_000
#: Candidates re-scored per query when a compact graph is chosen without saying how many.
DEFAULT_RESCORE = 20
#: HNSW shape of a re-scored graph when none is given: M (usearch connectivity) 20, efConstruction 48, ef 96.
#: Chosen at 1M × 512 clustered vectors against faiss HNSW (M 32, efConstruction 40) on the inner-product i8
#: graph (benchmarks/RESULTS.md, 2026-12-06 13:04-13:36): M 20 / efConstruction 48 built in 0.80x faiss's time
#: and reached recall@1 0.99 at ef 72 with 1.56x its batch-1,000 and 1.27x its batch-1 QPS; M 24 /
#: efConstruction 64 searched as fast but built in 1.11x faiss's time; efConstruction 40 never reached 0.99 by
#: ef 128, and M 16 needed ef 128 at efConstruction 48. ef 96 leaves room above the 72 that one build needed
#: (builds on several threads differ). usearch's own defaults are M 16, efConstruction 128, ef 64.
RESCORED_CONNECTIVITY = 20
RESCORED_EXPANSION_ADD = 48
RESCORED_EXPANSION_SEARCH = 96
#: Adds of fewer rows than this insert them on one thread (larger ones on every core). usearch's concurrent
#: inserts into a small graph now and then leave a row's nearest neighbours unlinked (300 clustered 32-d
#: vectors, 40 queries: the share of queries whose top 5 came out exact fell to 0.78-0.83 in a few of 40-60
#: builds on two threads, never below 0.975 on one), and one thread builds the same graph from the same rows
#: every time. Below this size a build is quick either way (2,000 × 512 f32: 0.35 s on one core, 0.18 s on two).
SERIAL_ADD_BELOW = 2_000
METRICS = ("cos",)
#: How the usearch graph compares its rows: new indexes use "ip" (see the module docstring), version 1 ones "cos".
GRAPH_METRICS = ("cos", "ip")
#: The graph metric of the indexes this version builds (usearch's metric and index.json's ``graph_metric``).
NEW_GRAPH_METRIC = "ip"


def _data_files(rescore: int) -> tuple[str, ...]:
    """The files index.json records checksums of: the graph and the items, and the float16 vectors with
    re-scoring."""
    return (INDEX_FILE, ITEMS_FILE, VECTORS_FILE) if rescore else (INDEX_FILE, ITEMS_FILE)


#: Keys the recognizer description must agree on for query features to be comparable with the stored ones.
RECOGNIZER_KEYS = ("model", "embedding_size", "input_size")


@dataclass(frozen=True)
class Hit:
    """One search result: the stored item and its cosine similarity to the query (larger = closer)."""

    key: int
    label: int
    path: str
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "path": self.path, "score": self.score}


@dataclass(frozen=True)
class Item:
    """What the index knows about a stored vector besides the vector itself."""

    key: int
    label: int
    path: str


def vote(hits: Sequence[Hit]) -> tuple[int | None, float]:
    """The label whose hits have the largest sum of scores, and the best score among that label's hits.

    Ties (equal sums) go to the label of the higher-ranked hit, so the result does not depend on label
    values. ``(None, 0.0)`` when there are no hits.
    """
    sums: dict[int, float] = {}
    best: dict[int, float] = {}
    first_rank: dict[int, int] = {}
    for rank, hit in enumerate(hits):
        sums[hit.label] = sums.get(hit.label, 0.0) + hit.score
        best[hit.label] = max(best.get(hit.label, -np.inf), hit.score)
        first_rank.setdefault(hit.label, rank)
    if not sums:
        return None, 0.0
    label = min(sums, key=lambda lab: (-sums[lab], first_rank[lab]))
    return label, float(best[label])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_matrix(features: Any, dim: int | None, *, what: str) -> np.ndarray:
    """``features`` as C-contiguous float32 [N, D] (a single vector becomes one row); checks D and finiteness."""
    matrix = np.asarray(features, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise ShituError(f"{what} must be a [N, D] matrix, got shape {list(matrix.shape)}")
    if dim is not None and matrix.shape[1] != dim:
        raise ShituError(f"{what} have {matrix.shape[1]} dimensions, the index holds {dim}-dimensional vectors")
    if matrix.size and not np.isfinite(matrix).all():
        raise ShituError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(matrix)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero). Cosine does not care, but i8 storage needs [-1, 1]."""
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))[:, None]
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def _as_float32(matrix: np.ndarray) -> np.ndarray:
    """A float16 array as float32, exactly. numkong (usearch's own SIMD kernels) converts several times faster
    than numpy, whose float16 conversion dominated a re-scored single-query search."""
    import numkong

    return np.asarray(numkong.astype(np.ascontiguousarray(matrix), "float32"))


#: The key of an empty result slot in :meth:`RetrievalIndex.search_arrays` (stored keys are below 2**63).
NO_KEY = np.uint64(2**64 - 1)
#: Query rows whose squared length is this close to 1 are taken as unit vectors (float32 rounding of a unit
#: 512-dim vector stays within about 1e-5).
_UNIT_TOLERANCE = 1e-4
#: Queries re-scored together: 32 × 20 candidates × 512 dims is 0.6 MB of float16 and 1.3 MB of float32.
_RESCORE_BLOCK = 32


def _unit_queries(features: Any, dim: int) -> np.ndarray:
    """Query ``features`` as C-contiguous float32 [B, D] unit rows (a 1-D vector is one row; zero rows stay
    zero). Already-unit float32 input is neither copied nor rescaled: one pass computes the squared lengths,
    which also shows whether every value is finite (a NaN or an infinity makes its row's sum non-finite)."""
    matrix = np.asarray(features, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        _as_matrix(matrix, dim, what="query features")  # raises the error that says what is wrong
    if not matrix.flags.c_contiguous:
        matrix = np.ascontiguousarray(matrix)
    squared = np.einsum("ij,ij->i", matrix, matrix)
    if not len(squared):
        return matrix
    low, high = squared.min(), squared.max()  # NaN if any value is NaN, inf if any is infinite (or huge)
    if low >= 1.0 - _UNIT_TOLERANCE and high <= 1.0 + _UNIT_TOLERANCE:
        return matrix
    if not np.isfinite(high) or np.isnan(low):
        _as_matrix(matrix, dim, what="query features")  # NaN or infinite values (else huge finite ones)
        return _unit_rows(matrix.astype(np.float64)).astype(np.float32)
    norms = np.sqrt(squared)[:, None]
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def _best_first(
    keys: np.ndarray, scores: np.ndarray, counts: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates ``keys`` / ``scores`` [B, C] (the first ``counts`` of each row valid) as the best ``k`` of each
    row, best first, equal scores by key, padded to [B, k] with :data:`NO_KEY` and -inf."""
    width = keys.shape[1]
    if len(keys) == 1 and counts[0] == width >= k:  # the common single query, in fewer numpy calls
        order = np.lexsort((keys[0], -scores[0]))[:k]
        return keys[:, order], scores[:, order].astype(np.float32, copy=False), np.minimum(counts, k)
    if (counts < width).any():
        valid = np.arange(width)[None, :] < counts[:, None]
        keys, scores = np.where(valid, keys, NO_KEY), np.where(valid, scores, -np.inf)
    order = np.lexsort((keys, -scores), axis=1)[:, :k]
    keys, scores = np.take_along_axis(keys, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32)
    counts = np.minimum(counts, k)
    if width < k:
        keys = np.pad(keys, ((0, 0), (0, k - width)), constant_values=NO_KEY)
        scores = np.pad(scores, ((0, 0), (0, k - width)), constant_values=-np.inf)
    return keys, scores, counts


def _recognizer_mismatch(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """Why features of ``given`` cannot be searched in an index built with ``recorded``, or None."""
    for key in RECOGNIZER_KEYS:
        if recorded.get(key) is not None and given.get(key) is not None and recorded[key] != given[key]:
            return f"the index was built with {key} {recorded[key]!r}, the recognizer has {given[key]!r}"
    return None


def choose_storage(dtype: str, rescore: int | None, count: int) -> tuple[str, int, str]:
    """The graph dtype and the re-scored candidate count for ``dtype`` (one of :data:`STORAGES`) and
    ``rescore`` (None: the default for the dtype) at ``count`` vectors, and a line saying why.

    The rule of ``auto``: under :data:`AUTO_COMPACT_FROM` vectors f32 without re-scoring (a 512-dim f32
    graph of 100,000 vectors takes about 0.2 GiB); from there i8 with :data:`DEFAULT_RESCORE` candidates
    re-scored against float16 vectors (at 1M × 512: about 1.7 GiB of files instead of 2.1 GiB, 2× faster to build and
    1.2-1.4× faster to search than f32 at the same recall; benchmarks/RESULTS.md). An explicit dtype keeps its
    choice: re-scoring defaults to on for i8 and bf16, off otherwise.
    """
    if dtype not in STORAGES:
        raise ShituError(f"unknown index dtype {dtype!r} (choose one of {', '.join(STORAGES)})")
    if rescore is not None and rescore < 0:
        raise ShituError(f"rescore must be 0 (off) or a number of candidates, got {rescore}")
    if dtype == "auto":
        compact = count >= AUTO_COMPACT_FROM
        dtype = "i8" if compact else "f32"
        why = f"auto: {count:,} vectors {'≥' if compact else '<'} {AUTO_COMPACT_FROM:,}"
    else:
        why = f"dtype {dtype} as asked"
    if rescore is None:
        rescore = DEFAULT_RESCORE if dtype in ("i8", "bf16") else 0
    why += f" → {dtype} graph" + (f", {rescore} candidates re-scored with float16 vectors" if rescore else "")
    return dtype, int(rescore), why


def _graph_rows(matrix: np.ndarray, dtype: str, scale: float | None = None) -> np.ndarray:
    """Unit rows as handed to the usearch graph: float32 unless ``dtype`` is i8. i8 rows are the rows times
    ``scale``, rounded and clipped to ±127 (a graph compared by inner product, whose stored rows share one
    scale), or with ``scale`` None each row scaled so its largest component is ±127 (queries, whose scale does
    not change their order, and rows of a cosine graph). usearch's own cast maps [-1, 1] to [-127, 127], which
    leaves a 512-dim unit vector's components only a few levels."""
    if dtype != "i8":
        return matrix
    import numkong

    if scale is not None:
        scaled = np.clip(matrix * np.float32(scale), -127.0, 127.0)
    else:
        peak = np.abs(matrix).max(axis=1, keepdims=True)
        if len(matrix) == 1:  # one query, in fewer numpy calls
            scaled = matrix * (np.float32(127.0) / peak) if peak[0, 0] > 0 else matrix
        else:
            scaled = np.divide(matrix * np.float32(127.0), peak, out=np.zeros_like(matrix), where=peak > 0)
    return np.asarray(numkong.astype(scaled, "int8"))  # rounds half to even, like np.rint


def _i8_scale(unit: np.ndarray) -> float:
    """The common scale of an inner-product i8 graph built from ``unit`` rows: 127 over their largest component
    (127 when there are none), so no built row is clipped."""
    peak = float(np.abs(unit).max()) if unit.size else 0.0
    return 127.0 / peak if peak > 0 else 127.0


class RetrievalIndex:
    """Vectors with labels and paths, searchable by cosine similarity; see the module docstring for the files.

    Build one with :func:`build_index` or read one with :func:`open_index`. :meth:`add` and :meth:`remove`
    change the index in memory; :meth:`save` writes it (as a unit).
    """

    def __init__(
        self,
        usearch_index: Any,
        items: Mapping[int, Item],
        info: Mapping[str, Any],
        path: Path | None,
        rescore_vectors: np.ndarray | None = None,
        graph_buffer: np.ndarray | None = None,
    ):
        self._index = usearch_index
        # The bytes of index.usearch that ``usearch_index`` is a read-only view of (see open_index), or None when
        # usearch owns its memory. A change first makes usearch copy the graph into its own memory (_mutable).
        self._graph_buffer = graph_buffer
        self._items: dict[int, Item] = dict(items)
        self._info: dict[str, Any] = dict(info)
        self.path = path
        self._on_disk: str | None = None  # SHA-256 of index.json as read, to detect a change by someone else
        self._label_counts: dict[int, int] | None = None
        # With re-scoring: float16 unit vectors, one row per item in key order, and the keys of the rows.
        self._vectors: np.ndarray | None = None
        self._row_keys = np.zeros(0, np.uint64)
        if self.rescore:
            # A memory map as a plain array view (same pages; indexing a np.memmap costs microseconds per call).
            self._vectors = (
                np.zeros((0, self.dim), np.float16) if rescore_vectors is None else np.asarray(rescore_vectors)
            )
            self._row_keys = np.fromiter(sorted(self._items), dtype=np.uint64, count=len(self._items))
            if len(self._vectors) != len(self._row_keys):
                raise ShituError(f"{len(self._vectors)} re-scoring vectors for {len(self._row_keys)} items")

    # -- description --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self._info["dim"])

    @property
    def dtype(self) -> str:
        return str(self._info["dtype"])

    @property
    def metric(self) -> str:
        return str(self._info["metric"])

    @property
    def graph_metric(self) -> str:
        """How the graph compares its rows: "ip" (inner product of unit rows) or "cos" (format version 1)."""
        return str(self._info.get("graph_metric") or "cos")

    @property
    def _shares_i8_scale(self) -> bool:
        """Whether the graph's rows are i8 with one common scale (an inner-product i8 graph)."""
        return self.dtype == "i8" and self.graph_metric == "ip"

    @property
    def _graph_scale(self) -> float | None:
        """The common scale of an inner-product i8 graph's rows (None: per-row scales, not i8, or not set yet)."""
        if not self._shares_i8_scale or self._info.get("graph_scale") is None:
            return None
        return float(self._info["graph_scale"])

    @property
    def expansion_search(self) -> int:
        """The HNSW search breadth (ef): candidates the graph walk keeps; larger is slower and finds more."""
        return int(self._index.expansion_search)

    @expansion_search.setter
    def expansion_search(self, value: int) -> None:
        if not 0 < int(value) < 2**31:
            raise ShituError(f"expansion_search must be a positive integer below 2**31, got {value}")
        self._index.expansion_search = int(value)
        self._info["expansion_search"] = int(value)

    @property
    def rescore(self) -> int:
        """Candidates taken from the graph and re-scored exactly per query (at least k); 0: no re-scoring."""
        return int(self._info.get("rescore") or 0)

    @property
    def recognizer(self) -> dict[str, Any]:
        """The description of the recognizer the stored features came from (model, embedding_size, ...)."""
        return dict(self._info.get("recognizer") or {})

    @property
    def items(self) -> list[Item]:
        """Every stored item, in key order."""
        return [self._items[key] for key in sorted(self._items)]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def info(self) -> dict[str, Any]:
        """index.json's content for the current state (without the file checksums), plus path and labels."""
        doc = {k: v for k, v in self._info.items() if k != "files"}
        doc["count"] = len(self)
        doc["num_labels"] = len({item.label for item in self._items.values()})
        doc["path"] = str(self.path) if self.path is not None else None
        return doc

    def check_recognizer(self, description: Mapping[str, Any]) -> None:
        """Raise a ShituError (naming index.json) when features of ``description``'s recognizer cannot be
        compared with the stored ones (another model, embedding size or input size)."""
        problem = _recognizer_mismatch(self.recognizer, description)
        if problem is not None:
            where = self.path / INFO_FILE if self.path is not None else None
            raise ShituError(problem, path=where, hint="search with the model the index was built with, or rebuild")

    # -- search -------------------------------------------------------------------------------------
    def search(self, features: Any, k: int = 5, exact: bool = False) -> list[list[Hit]]:
        """The ``k`` nearest stored items of each query row, best first: one list per row (also for a
        single 1-D vector, which counts as one row). :meth:`search_arrays`'s results as :class:`Hit` lists (the
        same keys, scores and order); lists are shorter than ``k`` when the index holds fewer items."""
        keys, scores, counts = self.search_arrays(features, k, exact=exact)
        items = self._items
        results: list[list[Hit]] = []
        for row_keys, row_scores, count in zip(keys.tolist(), scores.tolist(), counts.tolist(), strict=True):
            hits = []
            for key, score in zip(row_keys[:count], row_scores[:count], strict=True):
                item = items.get(key)
                if item is not None:  # never happens for a consistent index; skip rather than invent
                    hits.append(Hit(item.key, item.label, item.path, score))
            results.append(hits)
        return results

    def search_arrays(
        self, features: Any, k: int = 5, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` nearest stored items of each query row as arrays: keys uint64 [B, k], cosine scores float32
        [B, k] and counts int64 [B] (a single 1-D vector counts as one row). Row ``b``'s first ``counts[b]``
        entries are its results, best first, equal scores ordered by key; the rest (when the index holds fewer
        than ``k`` items) are :data:`NO_KEY` with score -inf.

        With re-scoring the graph's best max(k, rescore) candidates are ordered by their cosine with the float16
        vectors. ``exact`` compares with every stored vector instead of walking the HNSW graph (numpy over the
        float16 vectors with re-scoring, else usearch's brute force in the graph's dtype). Query rows need not
        be unit length; rows already within 1e-4 of it (squared) are used as they are."""
        if k < 1:
            raise ShituError(f"k must be at least 1, got {k}")
        queries = _unit_queries(features, self.dim)
        batch = len(queries)
        if not batch or not len(self):
            return (
                np.full((batch, k), NO_KEY, np.uint64),
                np.full((batch, k), -np.inf, np.float32),
                np.zeros(batch, np.int64),
            )
        if self._vectors is not None and exact:
            keys, scores, counts = self._exact_search(queries, min(k, len(self)))
        else:
            wanted = min(max(k, self.rescore) if self._vectors is not None else k, len(self))
            # usearch's compiled search directly (its Python wrapper adds objects per call); one query runs on
            # this thread (usearch's thread pool costs more than it gains for a single walk).
            keys, distances, counts, *_ = self._index._compiled.search_many(
                _graph_rows(queries, self.dtype), count=wanted, exact=exact, threads=1 if batch == 1 else 0
            )
            if self._vectors is not None:
                scores = self._rescore_scores(queries, keys)
            else:
                scores = self._graph_scores(queries, distances)
        return _best_first(keys, scores, np.asarray(counts, np.int64), k)

    def _graph_scores(self, queries: np.ndarray, distances: np.ndarray) -> np.ndarray:
        """The cosine scores [B, C] of the graph's ``distances`` to the unit ``queries``: 1 - distance (cosine or
        inner product of unit rows), divided by the query's and the rows' scales for an inner-product i8 graph."""
        similarity = np.float32(1.0) - distances
        scale = self._graph_scale
        if scale is None:
            return similarity
        peak = np.abs(queries).max(axis=1, keepdims=True)  # the query's scale is 127 / peak (_graph_rows)
        return similarity * (peak / np.float32(127.0 * scale))

    def _rescore_scores(self, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The cosine of each query [B, D] with the float16 vectors of its candidates ``keys`` [B, C] (entries
        past a row's count may hold any key of usearch's padding: their scores are masked later), float32 [B, C].

        Per block of :data:`_RESCORE_BLOCK` queries: one gather, one float16 → float32 cast, one batched product.
        Blocks keep the temporary arrays small enough for the allocator to reuse and the caches to hold: a whole
        1,000-query batch at once (60 MB of fresh temporaries per call) re-scored in 32 ms at 200,000 vectors,
        blocks in 7-10 ms."""
        assert self._vectors is not None
        rows = self._rows_of(keys.ravel()).reshape(keys.shape)
        if len(queries) == 1:
            return (_as_float32(self._vectors.take(rows[0], axis=0)) @ queries[0])[None, :]
        scores = np.empty(keys.shape, np.float32)
        for start in range(0, len(queries), _RESCORE_BLOCK):
            block = rows[start : start + _RESCORE_BLOCK]
            candidates = _as_float32(self._vectors[block.ravel()]).reshape(*block.shape, self.dim)  # [b, C, D]
            np.einsum(
                "bcd,bd->bc", candidates, queries[start : start + _RESCORE_BLOCK], out=scores[start:][: len(block)]
            )
        return scores

    def _rows_of(self, keys: np.ndarray) -> np.ndarray:
        """The rows of the float16 vectors holding ``keys``; a key that is not stored (usearch's padding) gets
        some valid row. Keys 0..N-1 without holes (an index nothing was removed from) are their own rows;
        otherwise a binary search, whose random reads over a large key array cost tens of microseconds per
        query at 1M."""
        count = len(self._row_keys)
        if count and int(self._row_keys[-1]) == count - 1:
            return np.minimum(keys, np.uint64(count - 1)).astype(np.intp)
        return np.minimum(np.searchsorted(self._row_keys, keys), count - 1)

    def _exact_search(self, queries: np.ndarray, k: int, block: int = 65_536) -> tuple[np.ndarray, ...]:
        """Brute force against the float16 vectors (numpy matrix products in blocks of rows): the top ``k``
        keys and cosine scores of each query."""
        assert self._vectors is not None
        best_scores = np.full((len(queries), 0), -np.inf, np.float32)
        best_rows = np.zeros((len(queries), 0), np.int64)
        for start in range(0, len(self._vectors), block):
            scores = queries @ _as_float32(self._vectors[start : start + block]).T
            take = min(k, scores.shape[1])
            part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
            best_rows = np.concatenate([best_rows, part + start], axis=1)
            order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
            best_scores, best_rows = np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)
        counts = np.full(len(queries), best_rows.shape[1])
        return self._row_keys[best_rows], best_scores, counts

    vote = staticmethod(vote)

    # -- the decision rule and what it needs ------------------------------------------------------
    @property
    def decision_rule(self) -> DecisionRule:
        """The rule stored in index.json (by ``shitu index calibrate``), or the default one (no thresholds)
        for an index without one."""
        from shitu.index.decision import INFO_KEY, DecisionRule

        stored = self._info.get(INFO_KEY)
        return DecisionRule() if stored is None else DecisionRule.from_json(stored)

    def set_decision_rule(self, rule: DecisionRule | None, calibration: Mapping[str, Any] | None = None) -> None:
        """Keep ``rule`` (None: remove the stored rule) and a summary of how it was chosen in the index's
        description; :meth:`save` writes them."""
        from shitu.index.decision import INFO_KEY

        self._info.pop(INFO_KEY, None)
        self._info.pop("calibration", None)
        if rule is not None:
            self._info[INFO_KEY] = rule.to_json()
            if calibration is not None:
                self._info["calibration"] = dict(calibration)

    @property
    def label_counts(self) -> dict[int, int]:
        """How many stored items each label has (a fresh dict; counted once per change of the index)."""
        if self._label_counts is None:
            counts: dict[int, int] = {}
            for item in self._items.values():
                counts[item.label] = counts.get(item.label, 0) + 1
            self._label_counts = counts
        return dict(self._label_counts)

    def vectors(self) -> tuple[list[Item], np.ndarray]:
        """Every stored item (key order) and its stored vector as float32 [N, D] (unit length up to the
        storage dtype's rounding)."""
        items = self.items
        if not items:
            return items, np.zeros((0, self.dim), np.float32)
        if self._vectors is not None:  # the float16 copy is closer to what was added than the graph's
            return items, _as_float32(self._vectors)
        keys = np.asarray([item.key for item in items], dtype=np.uint64)
        rows = self._index.get(keys, dtype=np.float32)
        matrix = np.ascontiguousarray(np.vstack(rows).reshape(len(items), self.dim), dtype=np.float32)
        return items, _unit_rows(matrix) if self.dtype == "i8" else matrix

    def decide(self, hits: Sequence[Hit], rule: DecisionRule | None = None) -> Decision:
        """``rule`` (default: :attr:`decision_rule`) applied to one query's hits, with this index's label counts."""
        return (rule or self.decision_rule).decide(hits, self.label_counts)

    # -- changes ------------------------------------------------------------------------------------
    def add(self, features: Any, labels: Sequence[int], paths: Sequence[str]) -> list[int]:
        """Add one vector per row with its label and path under new keys (never reused); returns the keys."""
        matrix = _as_matrix(features, self.dim, what="features")
        if not len(matrix) == len(labels) == len(paths):
            raise ShituError(f"{len(matrix)} feature rows but {len(labels)} labels and {len(paths)} paths")
        if not len(matrix):
            return []
        start = int(self._info.get("next_key", 0))
        keys = np.arange(start, start + len(matrix), dtype=np.uint64)
        unit = _unit_rows(matrix)
        if self._shares_i8_scale and self._info.get("graph_scale") is None:
            self._info["graph_scale"] = _i8_scale(unit)  # the first rows set the scale of every later one
        self._mutable()
        threads = 1 if len(matrix) < SERIAL_ADD_BELOW else 0  # 0: on every core
        self._index.add(keys, _graph_rows(unit, self.dtype, self._graph_scale), threads=threads)
        if self._vectors is not None:  # new keys are above all stored ones, so rows stay in key order
            self._vectors = np.concatenate([self._vectors, unit.astype(np.float16)])
            self._row_keys = np.concatenate([self._row_keys, keys])
        for key, label, path in zip(keys.tolist(), labels, paths, strict=True):
            self._items[key] = Item(int(key), int(label), str(path))
        self._info["next_key"] = start + len(matrix)
        self._info["count"] = len(self)
        self._label_counts = None
        return keys.astype(np.int64).tolist()

    def keys_for(self, keys_or_paths: Iterable[int | str | os.PathLike[str]]) -> list[int]:
        """The keys named by ``keys_or_paths``: an int (or a string of digits that is a stored key) is a key,
        anything else a path (all items stored under that path, compared as given and as an absolute path).
        Raises a ShituError listing what matches nothing."""
        by_path: dict[str, list[int]] = {}
        for item in self._items.values():
            by_path.setdefault(item.path, []).append(item.key)
        found: list[int] = []
        unknown: list[str] = []
        for entry in keys_or_paths:
            if isinstance(entry, (int, np.integer)):
                (found.append(int(entry)) if int(entry) in self._items else unknown.append(str(entry)))
                continue
            text = os.fspath(entry)
            if text.isdigit() and int(text) in self._items:
                found.append(int(text))
                continue
            keys = (
                by_path.get(text) or by_path.get(str(Path(text).absolute())) or by_path.get(str(Path(text).resolve()))
            )
            if keys:
                found.extend(keys)
            else:
                unknown.append(text)
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5]) + (
                f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            )
            where = self.path if self.path is not None else None
            raise ShituError(f"not in the index (no such key or path): {shown}", path=where)
        return sorted(set(found))

    def remove(self, keys_or_paths: Iterable[int | str | os.PathLike[str]]) -> list[Item]:
        """Remove the items named by keys or paths (see :meth:`keys_for`); all or nothing. Returns them."""
        keys = self.keys_for(keys_or_paths)
        if keys:
            self._mutable()
            self._index.remove(np.asarray(keys, dtype=np.uint64))
            if self._vectors is not None:
                kept = ~np.isin(self._row_keys, np.asarray(keys, dtype=np.uint64))
                self._vectors, self._row_keys = self._vectors[kept], self._row_keys[kept]
        removed = [self._items.pop(key) for key in keys]
        self._info["count"] = len(self)
        self._label_counts = None
        return removed

    def _mutable(self) -> None:
        """Make the graph changeable: an opened index searches a read-only view of index.usearch's bytes, which
        usearch copies into memory of its own here (once, before the first change)."""
        if self._graph_buffer is None:
            return
        from usearch.index import Index

        copy = Index.restore(memoryview(self._graph_buffer), view=False)
        copy.expansion_add = self._index.expansion_add
        copy.expansion_search = self._index.expansion_search
        self._index, self._graph_buffer = copy, None

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str] | None = None, *, overwrite: bool = False) -> Path:
        """Write the index folder at ``path`` (default: where it was read from) as a unit.

        Replacing another existing index needs ``overwrite``; a folder that is not an index (and not
        empty) is never replaced. Saving back to where it was read from refuses when the index on disk
        was changed meanwhile by someone else (its index.json differs from what was read).
        """
        if path is None and self.path is None:
            raise ShituError("this index was never saved: give a folder to save it to")
        target = Path(path if path is not None else self.path).absolute()
        with index_lock(target):
            self._save_locked(target, overwrite=overwrite)
        return target

    def _save_locked(self, target: Path, *, overwrite: bool) -> None:
        from shitu import __version__
        from shitu.fileio import (
            atomic_directory,
            atomic_open,
            atomic_write_json,
            atomic_write_text,
            recover_directory,
        )

        recover_directory(target)  # before judging what is there: a killed two-rename save's previous index
        own = self.path is not None and target == Path(self.path).absolute()
        check_replaceable(target, overwrite=overwrite or own)
        info_file = target / INFO_FILE
        if own and self._on_disk is not None and info_file.is_file() and _sha256(info_file) != self._on_disk:
            raise ShituError(
                "the index was changed on disk since it was opened; not overwriting that change",
                path=target / INFO_FILE,
                hint="open it again and repeat the change",
            )
        import usearch

        with atomic_directory(target) as staging:
            self._index.save(os.fspath(staging / INDEX_FILE))
            atomic_write_text(staging / ITEMS_FILE, "".join(_item_line(item) for item in self.items))
            if self._vectors is not None:
                with atomic_open(staging / VECTORS_FILE, "wb") as handle:
                    np.save(handle, np.ascontiguousarray(self._vectors, dtype="<f2"), allow_pickle=False)
            info = {k: v for k, v in self._info.items() if k not in ("files", "path", "num_labels")}
            info.update(
                count=len(self),
                shitu_version=__version__,
                usearch_version=usearch.__version__,
                files={
                    name: {"sha256": _sha256(staging / name), "bytes": (staging / name).stat().st_size}
                    for name in _data_files(self.rescore)
                },
            )
            atomic_write_json(staging / INFO_FILE, info)
        self._info = info
        self.path = target
        self._on_disk = _sha256(target / INFO_FILE)


# -- writing an index folder as a unit ----------------------------------------------------------------------


def index_lock(target: str | os.PathLike[str]) -> contextlib.AbstractContextManager[None]:
    """Hold the write lock of the index folder ``target`` (:func:`shitu.fileio.folder_lock`: the hidden
    sibling ``.NAME.shitu-lock``); another process writing the same index makes this a ShituError at once.
    Re-entrant within a process."""
    from shitu.fileio import folder_lock

    return folder_lock(target, busy="another shitu command is writing this index")


def _item_line(item: Item) -> str:
    """One line of items.jsonl. Non-ASCII characters are kept as they are, except in a path that is not
    UTF-8 (a file name's undecodable bytes, which os.fsdecode turns into lone surrogates): that line is
    written escaped, so it can be saved at all and reads back as the same string."""
    doc = {"key": item.key, "label": item.label, "path": item.path}
    line = json.dumps(doc, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(doc)
    return line + "\n"


def check_replaceable(target: Path, *, overwrite: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ShituError("exists and is not a folder; refusing to replace it", path=target)
    if not any(target.iterdir()):
        return
    if not (target / INFO_FILE).is_file():
        raise ShituError("exists, is not empty and is not a shitu index; refusing to replace it", path=target)
    if not overwrite:
        raise ShituError("an index already exists here", path=target, hint="pass --overwrite to replace it")


def _new_usearch(dim: int, dtype: str, connectivity: int | None, expansion_add: int | None) -> Any:
    from usearch.index import Index

    return Index(ndim=dim, metric=NEW_GRAPH_METRIC, dtype=dtype, connectivity=connectivity, expansion_add=expansion_add)


def build_index(
    features: Any,
    labels: Sequence[int],
    paths: Sequence[str],
    *,
    output: str | os.PathLike[str] | None,
    recognizer_info: Mapping[str, Any] | None,
    dtype: str = "auto",
    rescore: int | None = None,
    metric: str = "cos",
    overwrite: bool = False,
    connectivity: int | None = None,
    expansion_add: int | None = None,
    expansion_search: int | None = None,
) -> RetrievalIndex:
    """An index of ``features`` (float32 [N, D]; rows are scaled to unit length) with a label and a path per
    row, keyed 0..N-1, saved at ``output`` (None: kept in memory only).

    ``recognizer_info`` is the ``Recognizer.describe()`` of the model that made the features; searches with
    another model are refused. ``dtype`` is the graph's storage type (auto, f32, f16, bf16 or i8) and
    ``rescore`` the candidates re-scored exactly per query (None: the dtype's default; see
    :func:`choose_storage`, whose reason is kept in index.json as ``storage``); ``metric`` must be ``cos``.
    ``connectivity`` (HNSW M), ``expansion_add`` (efConstruction) and ``expansion_search`` (ef) default to
    usearch's (16, 128, 64), except :data:`RESCORED_CONNECTIVITY`, :data:`RESCORED_EXPANSION_ADD` and
    :data:`RESCORED_EXPANSION_SEARCH` with re-scoring (an index keeps its own in index.json). An
    existing index at ``output`` is replaced only with ``overwrite``.
    """
    if metric not in METRICS:
        raise ShituError(f"unknown metric {metric!r}: shitu indexes compare features by cosine ('cos')")
    matrix = _as_matrix(features, None, what="features")
    if matrix.shape[1] < 1:
        raise ShituError("features have no dimensions")
    recognizer = dict(recognizer_info or {})
    size = recognizer.get("embedding_size")
    if size is not None and int(size) != matrix.shape[1]:
        raise ShituError(f"features have {matrix.shape[1]} dimensions but the recognizer's embedding size is {size}")
    dtype, rescore, storage = choose_storage(dtype, rescore, len(matrix))
    if expansion_add is None and rescore:
        expansion_add = RESCORED_EXPANSION_ADD
    if connectivity is None and rescore:
        connectivity = RESCORED_CONNECTIVITY
    if expansion_search is None and rescore:
        expansion_search = RESCORED_EXPANSION_SEARCH
    if output is not None:
        check_replaceable(Path(output).absolute(), overwrite=overwrite)  # fail before the (long) build
    usearch_index = _new_usearch(matrix.shape[1], dtype, connectivity, expansion_add)
    if expansion_search is not None:
        usearch_index.expansion_search = expansion_search
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dim": int(matrix.shape[1]),
        "dtype": dtype,
        "rescore": rescore,
        "storage": storage,
        "metric": metric,
        "graph_metric": NEW_GRAPH_METRIC,
        "count": 0,
        "next_key": 0,
        "connectivity": int(usearch_index.connectivity),
        "expansion_add": int(usearch_index.expansion_add),
        "expansion_search": int(usearch_index.expansion_search),
        "recognizer": recognizer,
    }
    index = RetrievalIndex(usearch_index, {}, info, None)
    index.add(matrix, labels, paths)
    if output is not None:
        index.save(output, overwrite=overwrite)
    return index


#: Keys are uint64 in usearch but int64 in shitu's results (and labels are int64, as in PaddleClas).
_INT64_MAX = 2**63 - 1
#: HNSW settings are C ints in usearch; a larger value would crash it rather than be refused.
_HNSW_FIELDS = ("connectivity", "expansion_add", "expansion_search")
_RECOGNIZER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "embedding_size": int,
    "input_size": int,
    "bundle": str,
}


def _parse_json(text: str) -> Any:
    """``json.loads`` whose every failure is a ValueError: nesting too deep for the parser (RecursionError)
    and integers of more digits than Python converts are what hand-edited or damaged files bring."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _read_info(folder: Path) -> dict[str, Any]:
    file = folder / INFO_FILE
    try:
        doc = _parse_json(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ShituError(f"unreadable index description: {exc}", path=file) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ShituError(f"not a shitu index description (format is not {FORMAT!r})", path=file)
    version = doc.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
        raise ShituError(f"index format version {version!r} is not supported (this shitu reads {readable})", path=file)
    expected = {
        "dim": int,
        "dtype": str,
        "metric": str,
        "count": int,
        "next_key": int,
        "files": dict,
        "recognizer": dict,
    }
    for key, kind in expected.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise ShituError(f"field {key!r} is missing or not a {kind.__name__}", path=file)
    if doc["dtype"] not in DTYPES or doc["metric"] not in METRICS or doc["dim"] < 1 or doc["count"] < 0:
        raise ShituError(
            f"invalid dim/dtype/metric/count ({doc['dim']}, {doc['dtype']!r}, {doc['metric']!r}, {doc['count']})",
            path=file,
        )
    if version == 1:
        doc.pop("graph_metric", None)
        doc.pop("graph_scale", None)
    elif doc.get("graph_metric") not in GRAPH_METRICS:
        raise ShituError(f"field 'graph_metric' must be one of {', '.join(GRAPH_METRICS)}", path=file)
    scale = doc.get("graph_scale")
    # 127 over the largest component of unit rows, which lies between 1/sqrt(dim) and 1 (no bound for a dim too
    # large for a float: such an index fails later, where the usearch file's dim is compared).
    high = 127.0 * math.sqrt(doc["dim"]) * (1 + 1e-6) if doc["dim"] < 2**53 else float("inf")
    if scale is not None and (
        not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 127.0 * (1 - 1e-6) <= scale <= high
    ):
        raise ShituError(
            f"field 'graph_scale' must be a number from 127 to 127 × sqrt(dim) = {high:.6g}, got {scale!r}", path=file
        )
    if doc["dtype"] == "i8" and doc.get("graph_metric") == "ip" and doc["count"] and scale is None:
        raise ShituError("an i8 graph compared by inner product needs its 'graph_scale'", path=file)
    if not 0 <= doc["next_key"] <= _INT64_MAX + 1:
        raise ShituError(f"next_key {doc['next_key']} is outside 0..2**63", path=file)
    rescore = doc.get("rescore", 0)  # optional (older indexes have none: no re-scoring)
    if not isinstance(rescore, int) or isinstance(rescore, bool) or not 0 <= rescore < 2**31:
        raise ShituError(f"field 'rescore' must be a non-negative integer below 2**31, got {rescore!r}", path=file)
    for key in _HNSW_FIELDS:  # optional (older indexes may lack them), but when present a usable C int
        value = doc.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31):
            raise ShituError(f"field {key!r} must be a positive integer below 2**31, got {value!r}", path=file)
    for key, kind in _RECOGNIZER_FIELDS.items():
        value = doc["recognizer"].get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ShituError(f"recognizer field {key!r} must be a {kind.__name__} or null, got {value!r}", path=file)
    for name in _data_files(rescore):
        entry = doc["files"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ShituError(f"no checksum recorded for {name}", path=file)
    return doc


def _read_items(file: Path) -> dict[int, Item]:
    items: dict[int, Item] = {}
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShituError(f"unreadable: {exc}", path=file) from None
    # Lines end at "\n" only: str.splitlines() would also cut at U+2028, U+0085... which a path may hold
    # (the writer keeps non-ASCII characters as they are).
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            doc = _parse_json(line)
            key, label, path = doc["key"], doc["label"], doc["path"]
            if not (isinstance(key, int) and isinstance(label, int) and isinstance(path, str)):
                raise TypeError
            if isinstance(key, bool) or isinstance(label, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError) as exc:
            detail = f" ({exc})" if isinstance(exc, ValueError) else ""
            raise ShituError(
                'expected {"key": int, "label": int, "path": str}' + detail, path=file, line=number
            ) from None
        if not 0 <= key <= _INT64_MAX or not -_INT64_MAX - 1 <= label <= _INT64_MAX:
            raise ShituError(f"key {key} or label {label} is outside the 64-bit range", path=file, line=number)
        if key in items:
            raise ShituError(f"key {key} appears twice", path=file, line=number)
        items[key] = Item(key, label, path)
    return items


def _read_vectors(file: Path, count: int, dim: int) -> np.ndarray:
    """vectors.npy memory-mapped (read-only: a change makes a copy in memory), checked to be float16 [count, dim]."""
    try:
        vectors = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShituError(f"unreadable re-scoring vectors: {exc}", path=file) from None
    if vectors.dtype != np.float16 or vectors.shape != (count, dim):
        raise ShituError(f"holds {vectors.dtype} {list(vectors.shape)}, expected float16 [{count}, {dim}]", path=file)
    return vectors


def _read_graph(file: Path) -> np.ndarray:
    """index.usearch's bytes in a numpy array (large numpy arrays get transparent huge pages where the kernel
    offers them on request)."""
    try:
        return np.fromfile(file, dtype=np.uint8)
    except OSError as exc:
        raise ShituError(f"unreadable: {exc}", path=file) from None


def _missing_index_hint(folder: Path) -> str | None:
    """Where an interrupted save left the previous index, if it did."""
    leftovers = sorted(folder.parent.glob(f".{folder.name}.*.old/{folder.name}")) if folder.parent.is_dir() else []
    return f"an interrupted save left the previous index at {leftovers[-1]}" if leftovers else None


def open_index(path: str | os.PathLike[str], *, recognizer_info: Mapping[str, Any] | None = None) -> RetrievalIndex:
    """Read the index folder at ``path``, checking the files' checksums and that they agree with each other.

    With ``recognizer_info`` (a ``Recognizer.describe()``), also check that its features are comparable
    with the stored ones. Every problem is a ShituError naming the file concerned. The graph is read into memory
    once (checksummed there) and searched as a read-only usearch view of those bytes; the first add or remove
    makes usearch copy it into memory of its own.
    """
    from shitu.fileio import recover_directory

    folder = Path(path)
    if not folder.exists():
        recover_directory(folder)  # an interrupted two-rename save left the previous index aside: put it back
    if not folder.is_dir():
        if folder.exists():
            raise ShituError("not a folder (give the index folder)", path=folder)
        raise ShituError("index folder does not exist", path=folder, hint=_missing_index_hint(folder.absolute()))
    if not (folder / INFO_FILE).is_file():
        raise ShituError(f"not a shitu index (no {INFO_FILE})", path=folder)
    info_file = folder / INFO_FILE
    info_digest = _sha256(info_file)
    info = _read_info(folder)
    if info.get("decision") is not None:  # a stored decision rule must be usable (older indexes have none)
        from shitu.index.decision import DecisionRule

        DecisionRule.from_json(info["decision"], path=info_file)
    graph = np.zeros(0, np.uint8)
    for name in _data_files(info.get("rescore", 0)):
        file = folder / name
        if not file.is_file():
            why = "not a regular file" if file.exists() or file.is_symlink() else "missing from the index folder"
            raise ShituError(why, path=file)
        if name == INDEX_FILE:
            graph = _read_graph(file)
            digest = hashlib.sha256(graph).hexdigest()
        else:
            digest = _sha256(file)
        if digest != info["files"][name]["sha256"]:
            raise ShituError(
                "checksum mismatch: the file is damaged or was changed outside shitu",
                path=file,
                hint="rebuild the index",
            )
    items = _read_items(folder / ITEMS_FILE)
    from usearch.index import Index

    try:
        # A view of the bytes read (usearch checks that they hold a whole index), not usearch's own load: numpy
        # asks the kernel for transparent huge pages for large arrays (madvise), usearch's allocations do not,
        # and the graph walk's random reads then miss the TLB far less. Measured on a 200,000 × 512 i8 graph:
        # 186 instead of 236 µs per single-query search, 100 instead of 132 µs per query in a 1,000-query batch.
        usearch_index = Index.restore(memoryview(graph), view=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ShituError(f"cannot read the usearch index: {exc}", path=folder / INDEX_FILE) from None
    if usearch_index is None:
        raise ShituError("not a usearch index", path=folder / INDEX_FILE)
    stored_dtype = str(usearch_index.dtype).rsplit(".", 1)[-1].lower()
    stored_metric = str(usearch_index.metric).rsplit(".", 1)[-1].lower()
    graph_metric = info.get("graph_metric") or "cos"
    if usearch_index.ndim != info["dim"] or stored_dtype != info["dtype"] or stored_metric != graph_metric:
        raise ShituError(
            f"says dim {info['dim']}, dtype {info['dtype']}, metric {graph_metric}, but {INDEX_FILE} holds "
            f"dim {usearch_index.ndim}, dtype {stored_dtype}, metric {stored_metric}",
            path=info_file,
        )
    if not len(usearch_index) == len(items) == info["count"]:
        raise ShituError(
            f"counts disagree: {INFO_FILE} says {info['count']}, {INDEX_FILE} holds {len(usearch_index)}, "
            f"{ITEMS_FILE} lists {len(items)}",
            path=folder / ITEMS_FILE,
        )
    if items:
        keys = np.fromiter(items, dtype=np.uint64, count=len(items))
        present = np.asarray(usearch_index.contains(keys))
        if not present.all():
            raise ShituError(f"key {int(keys[~present][0])} is not in {INDEX_FILE}", path=folder / ITEMS_FILE)
        if int(keys.max()) >= info["next_key"]:
            raise ShituError(
                f"next_key {info['next_key']} is not above the largest key {int(keys.max())}", path=info_file
            )
    if isinstance(info.get("expansion_search"), int) and info["expansion_search"] > 0:
        usearch_index.expansion_search = info["expansion_search"]
    if isinstance(info.get("expansion_add"), int) and info["expansion_add"] > 0:
        usearch_index.expansion_add = info["expansion_add"]
    vectors = _read_vectors(folder / VECTORS_FILE, len(items), info["dim"]) if info.get("rescore") else None
    index = RetrievalIndex(usearch_index, items, info, folder.absolute(), rescore_vectors=vectors, graph_buffer=graph)
    index._on_disk = info_digest
    if recognizer_info is not None:
        index.check_recognizer(recognizer_info)
    return index
