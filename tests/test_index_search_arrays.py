"""``RetrievalIndex.search_arrays``: the array results that ``search`` turns into ``Hit`` lists."""

from __future__ import annotations

import numpy as np
import pytest
from test_index import clustered, numpy_topk

import shitu.index.core as core
from shitu.errors import ShituError
from shitu.index import build_index


def _index(n: int, dtype: str, **kwargs):
    x, labels = clustered(n, dim=32, clusters=20)
    paths = [f"img/{i}.jpg" for i in range(n)]
    return build_index(x, labels.tolist(), paths, output=None, recognizer_info=None, dtype=dtype, **kwargs), x


@pytest.mark.parametrize(("dtype", "exact"), [("i8", False), ("i8", True), ("f32", False), ("f32", True)])
def test_search_is_search_arrays_as_hits(dtype, exact):
    index, x = _index(600, dtype)
    queries, _ = clustered(40, dim=32, clusters=20, seed=3)
    keys, scores, counts = index.search_arrays(queries, k=7, exact=exact)
    assert keys.shape == scores.shape == (40, 7) and keys.dtype == np.uint64 and scores.dtype == np.float32
    assert counts.tolist() == [7] * 40
    hits = index.search(queries, k=7, exact=exact)
    assert [[hit.key for hit in row] for row in hits] == keys.astype(np.int64).tolist()
    assert [[hit.score for hit in row] for row in hits] == scores.tolist()
    assert [[hit.path for hit in row] for row in hits] == [[f"img/{key}.jpg" for key in row] for row in keys.tolist()]
    assert np.all(np.diff(scores, axis=1) <= 0)
    if exact:  # brute force: the numpy top 7 (against the float16 copy when re-scored)
        stored = x.astype(np.float16).astype(np.float32) if index.rescore else x
        want, want_scores = numpy_topk(stored, queries, 7)
        assert keys[:, 0].astype(np.int64).tolist() == want[:, 0].tolist()
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_a_single_vector_is_one_row_and_batches_agree_with_single_queries():
    index, _ = _index(400, "i8")
    queries, _ = clustered(5, dim=32, clusters=20, seed=4)
    batch = index.search_arrays(queries, k=4)
    for row, query in enumerate(queries):
        keys, scores, counts = index.search_arrays(query, k=4)
        assert keys.shape == scores.shape == (1, 4) and counts.tolist() == [4]
        assert keys[0].tolist() == batch[0][row].tolist()
        np.testing.assert_allclose(scores[0], batch[1][row], atol=1e-6)


@pytest.mark.parametrize("dtype", ["i8", "f32"])
def test_k_larger_than_the_index_pads_with_no_key(dtype):
    index, x = _index(6, dtype)
    keys, scores, counts = index.search_arrays(x[:2], k=10)
    assert keys.shape == (2, 10) and counts.tolist() == [6, 6]
    assert sorted(keys[0, :6].tolist()) == list(range(6)) and keys[0, 0] == 0 and keys[1, 0] == 1
    assert (keys[:, 6:] == core.NO_KEY).all() and np.isneginf(scores[:, 6:]).all()
    assert np.isfinite(scores[:, :6]).all()
    assert [len(row) for row in index.search(x[:2], k=10)] == [6, 6]


def test_empty_index_and_no_queries():
    index, x = _index(50, "i8")
    index.remove(list(range(50)))
    keys, scores, counts = index.search_arrays(x[:3], k=4)
    assert keys.shape == (3, 4) and (keys == core.NO_KEY).all() and np.isneginf(scores).all()
    assert counts.tolist() == [0, 0, 0] and index.search(x[:3], k=4) == [[], [], []]
    full, _ = _index(50, "i8")
    keys, scores, counts = full.search_arrays(np.zeros((0, 32), np.float32), k=4)
    assert keys.shape == (0, 4) and counts.shape == (0,)


def test_equal_scores_are_ordered_by_key():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((30, 16)).astype(np.float32)
    x = np.concatenate([base, base, base])  # each vector three times: keys i, i + 30, i + 60 tie exactly
    for dtype in ("i8", "f32"):
        index = build_index(x, [0] * 90, ["p"] * 90, output=None, recognizer_info=None, dtype=dtype)
        keys, scores, _ = index.search_arrays(base[:5], k=3, exact=dtype == "i8")
        assert keys.astype(np.int64).tolist() == [[i, i + 30, i + 60] for i in range(5)]
        assert (scores[:, 0] == scores[:, 2]).all()


def test_query_length_does_not_matter_and_bad_values_are_refused():
    index, _ = _index(300, "i8")
    queries, _ = clustered(8, dim=32, clusters=20, seed=9)
    unit = index.search_arrays(queries, k=5)
    for scale in (3.0, 1e-3, 1e30):
        scaled = index.search_arrays(queries * np.float32(scale), k=5)
        assert scaled[0].tolist() == unit[0].tolist()
        np.testing.assert_allclose(scaled[1], unit[1], atol=1e-5)
    with pytest.raises(ShituError, match="NaN or infinite"):
        index.search_arrays(np.where(np.arange(32) == 3, np.nan, queries[0]), k=5)
    with pytest.raises(ShituError, match="dimensions"):
        index.search_arrays(np.ones(31, np.float32), k=5)
    with pytest.raises(ShituError, match="k must be"):
        index.search_arrays(queries, k=0)
