"""Retrieval metrics against plain full-matrix references, hand-computed cases, and PaddleClas' own code."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paddle_support import PADDLE_PYTHON, require_paddleclas

from shitu.errors import ShituError
from shitu.evaluation import metrics as metrics_module
from shitu.evaluation.metrics import retrieval_metrics

# ------------------------------------------------------------------------------------------------ references


def reference_per_query(q, ql, g, gl):
    """First-positive rank (0 = none) and AP (NaN = none) per query: full matrix, stable descending sort."""
    sims = q @ g.T
    first, aps = [], []
    for i in range(len(q)):
        order = np.argsort(-sims[i], kind="stable")
        hit = gl[order] == ql[i]
        if not hit.any():
            first.append(0)
            aps.append(math.nan)
            continue
        positions = np.flatnonzero(hit) + 1
        first.append(int(positions[0]))
        aps.append(float(np.mean(np.arange(1, len(positions) + 1) / positions)))
    return np.array(first), np.array(aps)


def reference_exact(q, ql, g, gl, ks):
    first, aps = reference_per_query(q, ql, g, gl)
    relevant = first > 0
    n = int(relevant.sum())
    recall = {k: (int(((first > 0) & (first <= k)).sum()) / n if n else math.nan) for k in ks}
    return recall, (float(aps[relevant].mean()) if n else math.nan), len(q) - n


def paddleclas_reference(query_feat, query_label, gallery_feat, gallery_label, topk, block_size):
    """PaddleClas' retrieval_eval (no camera, no re-ranking) with Recallk and mAP, transcribed step by step in
    numpy (float64 sums; a stable descending argsort stands in for paddle.argsort)."""
    num_query = len(query_feat)
    sections = [block_size] * (num_query // block_size)
    if num_query % block_size > 0:
        sections.append(num_query % block_size)
    gallery_labels_t = gallery_label.reshape(-1, 1).T
    metric_dict = defaultdict(float)
    start = 0
    for size in sections:
        block_feat = query_feat[start : start + size]
        block_label = query_label[start : start + size].reshape(-1, 1)
        start += size
        distmat = block_feat @ gallery_feat.T
        # Recallk.forward
        choosen_indices = np.argsort(-distmat, axis=1, kind="stable")
        choosen_label = np.take_along_axis(np.broadcast_to(gallery_labels_t, choosen_indices.shape), choosen_indices, 1)
        equal_flag = (choosen_label == block_label).astype(np.float64)
        real_query_num = float((equal_flag.sum(axis=1) > 0).sum())
        acc_sum = np.cumsum(equal_flag, axis=1)
        mask = (acc_sum > 0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            all_cmc = mask.sum(axis=0) / real_query_num
        block_metrics = {f"recall{k}": all_cmc[k - 1] for k in topk}
        # mAP.forward
        num_rel = equal_flag.sum(axis=1) > 0
        if not num_rel.any():
            block_metrics["mAP"] = math.nan
        else:
            flags = equal_flag[num_rel]
            precision = np.cumsum(flags, axis=1) / (np.arange(flags.shape[1]) + 1)
            block_metrics["mAP"] = float(np.mean((flags * precision).sum(axis=1) / flags.sum(axis=1)))
        for key, value in block_metrics.items():
            metric_dict[key] += value * block_feat.shape[0] / num_query
    return dict(metric_dict)


def quantized(rng, shape, levels=2, scale=4):
    """Features whose dot products are exact in float32 (small integers / scale): ties are exact ties."""
    return (rng.integers(-levels, levels + 1, shape) / scale).astype(np.float32)


def random_case(seed, nq=40, ng=30, d=4, q_classes=8, g_classes=6):
    rng = np.random.default_rng(seed)
    return (
        quantized(rng, (nq, d)),
        rng.integers(0, q_classes, nq),  # classes >= g_classes have no positive
        quantized(rng, (ng, d)),
        rng.integers(0, g_classes, ng),
    )


def assert_close(a, b, tol=1e-9):
    if b is None or (isinstance(b, float) and math.isnan(b)):
        assert a is None or math.isnan(a)
    else:
        assert a == pytest.approx(b, abs=tol, rel=0)


# ------------------------------------------------------------------------------------------------ exact mode


@pytest.mark.parametrize("block_size", [1, 7, 10**9])
@pytest.mark.parametrize("method", ["keys", "counting"])
def test_exact_matches_full_matrix_reference(monkeypatch, block_size, method):
    monkeypatch.setattr(metrics_module, "_SLOT_COST_RATIO", 0 if method == "keys" else 1e30)
    for seed in range(12):
        q, ql, g, gl = random_case(seed)
        first, aps = reference_per_query(q, ql, g, gl)
        recall, mean_ap, without = reference_exact(q, ql, g, gl, (1, 3, 5, 100))
        result = retrieval_metrics(q, ql, g, gl, topk=(1, 3, 5, 100), block_size=block_size)
        np.testing.assert_array_equal(result.first_positive_rank, first)
        np.testing.assert_allclose(result.average_precision, aps, rtol=0, atol=1e-12)
        assert result.num_queries_without_positive == without > 0
        for k in (1, 3, 5, 100):
            assert_close(result.recall[k], recall[k])
        assert_close(result.mAP, mean_ap)


def test_sub_blocks_and_similarity_blocks_do_not_change_results(monkeypatch):
    q, ql, g, gl = random_case(3, nq=50, ng=37)
    expected = retrieval_metrics(q, ql, g, gl, topk=(1, 2, 5))
    monkeypatch.setattr(metrics_module, "_SIMILARITY_BLOCK_BYTES", 4 * 37 * 9)  # 9 rows per matmul block
    monkeypatch.setattr(metrics_module, "_CANDIDATE_ELEMENTS", 37 * 4)  # 4 rows per ranking sub-block
    for ratio in (0, 1e30):
        monkeypatch.setattr(metrics_module, "_SLOT_COST_RATIO", ratio)
        got = retrieval_metrics(q, ql, g, gl, topk=(1, 2, 5))
        np.testing.assert_array_equal(got.first_positive_rank, expected.first_positive_rank)
        np.testing.assert_array_equal(got.average_precision, expected.average_precision)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nq=st.integers(1, 12),
    ng=st.integers(1, 15),
    d=st.integers(1, 4),
    classes=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    block_size=st.sampled_from([1, 2, 5, 1024]),
    counting=st.booleans(),
)
def test_exact_property(nq, ng, d, classes, seed, block_size, counting):
    original = metrics_module._SLOT_COST_RATIO
    metrics_module._SLOT_COST_RATIO = 1e30 if counting else 0
    try:
        rng = np.random.default_rng(seed)
        q, g = quantized(rng, (nq, d), levels=1, scale=2), quantized(rng, (ng, d), levels=1, scale=2)
        ql, gl = rng.integers(0, classes + 1, nq), rng.integers(0, classes, ng)
        first, aps = reference_per_query(q, ql, g, gl)
        result = retrieval_metrics(q, ql, g, gl, topk=(1, 2, 3), block_size=block_size, keep_ranking=3)
    finally:
        metrics_module._SLOT_COST_RATIO = original
    np.testing.assert_array_equal(result.first_positive_rank, first)
    np.testing.assert_allclose(result.average_precision, aps, rtol=0, atol=1e-12)
    sims = q @ g.T
    expected_top = np.argsort(-sims, axis=1, kind="stable")[:, : min(3, ng)]
    np.testing.assert_array_equal(result.ranking, expected_top)
    np.testing.assert_array_equal(result.ranking_scores, np.take_along_axis(sims, expected_top, 1))
    relevant = first > 0
    assert 0.0 <= (result.mAP if relevant.any() else 0.0) <= 1.0
    if relevant.any():
        assert result.recall[1] <= result.recall[2] <= result.recall[3]


def test_hand_computed_ranking_and_average_precision():
    # One query along x; the gallery at similarities 0.9 (wrong), 0.8 (right), 0.7 (wrong), 0.6 (right).
    query = np.array([[1.0, 0.0]], np.float32)
    sims = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    gallery = np.stack([sims, np.sqrt(1 - sims**2)], axis=1).astype(np.float32)
    result = retrieval_metrics(query, [7], gallery, [3, 7, 3, 7], topk=(1, 2, 5))
    assert result.first_positive_rank.tolist() == [2]
    assert result.recall == {1: 0.0, 2: 1.0, 5: 1.0}
    assert result.mAP == pytest.approx((1 / 2 + 2 / 4) / 2, abs=1e-12)


def test_ties_are_broken_by_gallery_index_including_signed_zero():
    query = np.array([[1.0, 0.0]], np.float32)
    # Items 0 and 1 are identical (a tie): the positive is item 1, so it ranks second.
    gallery = np.array([[0.5, 0.5], [0.5, 0.5], [0.1, 0.0]], np.float32)
    result = retrieval_metrics(query, [1], gallery, [0, 1, 1], topk=(1,))
    assert result.first_positive_rank.tolist() == [2]
    assert result.mAP == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-12)
    # -0.0 and +0.0 similarities are equal: index order decides, whatever the sign bit.
    zero_sims = np.array([[-0.0, 1.0], [0.0, 1.0]], np.float32)  # q·g = -0.0 and +0.0
    result = retrieval_metrics(query, [5], zero_sims, [4, 5], topk=(1,), keep_ranking=2)
    assert result.first_positive_rank.tolist() == [2]
    assert result.ranking.tolist() == [[0, 1]]
    swapped = retrieval_metrics(query, [5], zero_sims[::-1].copy(), [4, 5], topk=(1,))
    assert swapped.first_positive_rank.tolist() == [2]


def test_queries_without_positive_are_counted_not_dropped():
    query = np.eye(3, dtype=np.float32)
    gallery = np.eye(3, dtype=np.float32)
    result = retrieval_metrics(query, [0, 1, 9], gallery, [0, 1, 2], topk=(1,))
    assert result.num_queries == 3
    assert result.num_queries_without_positive == 1
    assert result.recall[1] == 1.0  # 2 hits / 2 queries that can hit
    assert result.first_positive_rank.tolist() == [1, 1, 0]
    assert math.isnan(result.average_precision[2])
    none = retrieval_metrics(query, [7, 8, 9], gallery, [0, 1, 2], topk=(1,))
    assert math.isnan(none.recall[1]) and math.isnan(none.mAP)
    assert none.to_json()["recall1"] is None and none.to_json()["mAP"] is None


def test_per_class_recall_and_confused_pairs():
    query = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], np.float32)
    gallery = np.array([[1, 0], [0, 1], [0.9, 0.1]], np.float32)
    # Class 10 queries find a class-10 item first; class 20 queries find the class-30 item first (index 1).
    result = retrieval_metrics(
        query, [10, 10, 20, 20, 99], gallery, [10, 30, 20], topk=(1,), per_class=True, confusion_pairs=5
    )
    assert [(c.label, c.queries, c.hits) for c in result.per_class] == [(10, 2, 2), (20, 2, 0)]
    assert result.per_class[1].recall1 == 0.0
    assert [(p.query_label, p.predicted_label, p.count) for p in result.confused_pairs] == [(20, 30, 2)]
    doc = result.to_json()
    assert doc["per_class"][0] == {"label": 10, "queries": 2, "hits": 2, "recall1": 1.0}
    assert doc["confused_pairs"] == [{"query_label": 20, "predicted_label": 30, "count": 2}]


def test_to_json_has_interface_keys():
    q, ql, g, gl = random_case(1)
    doc = retrieval_metrics(q, ql, g, gl, topk=(1, 5, 10)).to_json()
    assert list(doc)[:4] == ["recall1", "recall5", "recall10", "mAP"]
    assert doc["num_queries"] == 40 and doc["num_gallery"] == 30 and doc["mode"] == "exact"
    assert doc["num_queries_without_positive"] == int((ql >= 6).sum())
    json.dumps(doc, allow_nan=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query_features": np.zeros((2, 3), np.float32)}, "dimensions"),
        ({"query_features": np.zeros((0, 4), np.float32), "query_labels": []}, "empty"),
        ({"gallery_features": np.full((3, 4), np.nan, np.float32)}, "NaN"),
        ({"gallery_features": np.full((3, 4), 1e30, np.float32)}, "too large"),
        ({"gallery_labels": [0, 1]}, "labels"),
        ({"gallery_labels": [0.5, 1.0, 2.0]}, "integers"),
        ({"mode": "fast"}, "mode"),
        ({"topk": (0, 1)}, "topk"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_invalid_inputs_raise_clear_errors(kwargs, message):
    args = {
        "query_features": np.ones((2, 4), np.float32),
        "query_labels": [0, 1],
        "gallery_features": np.ones((3, 4), np.float32),
        "gallery_labels": [0, 1, 2],
    }
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises(ShituError, match=message):
        retrieval_metrics(
            args["query_features"], args["query_labels"], args["gallery_features"], args["gallery_labels"], **options
        )


def test_labels_as_column_vectors_like_paddleclas():
    q, ql, g, gl = random_case(2)
    flat = retrieval_metrics(q, ql, g, gl)
    column = retrieval_metrics(q, ql.reshape(-1, 1), g, gl.reshape(-1, 1))
    assert flat.headline() == column.headline()


# ------------------------------------------------------------------------------------------------ paddlex mode


@pytest.mark.parametrize("sim_block_size", [1, 7, 64, 1000])
def test_paddlex_mode_matches_transcription_of_paddleclas(sim_block_size):
    for seed in range(8):
        q, ql, g, gl = random_case(seed, nq=90, ng=25)
        expected = paddleclas_reference(q, ql, g, gl, (1, 5), sim_block_size)
        result = retrieval_metrics(q, ql, g, gl, topk=(1, 5), mode="paddlex", sim_block_size=sim_block_size)
        for k in (1, 5):
            assert_close(result.recall[k], expected[f"recall{k}"])
        assert_close(result.mAP, expected["mAP"])
        assert result.to_json()["sim_block_size"] == sim_block_size


def test_paddlex_mode_averages_blocks_not_queries():
    query = np.array([[1, 0]] * 8, np.float32)
    gallery = np.array([[1, 0], [0, 1]], np.float32)  # every query's top-1 is the class-1 item
    # Blocks of 4. Block 1: two class-1 queries (hits) and two without positives; block 2: one class-2 query
    # (a miss) and three without positives. Exact: 2 hits / 3 queries; PaddleClas: (2/2)·4/8 + (0/1)·4/8.
    labels = [1, 1, 8, 8, 2, 8, 8, 8]
    exact = retrieval_metrics(query, labels, gallery, [1, 2], topk=(1,))
    paddlex = retrieval_metrics(query, labels, gallery, [1, 2], topk=(1,), mode="paddlex", sim_block_size=4)
    assert exact.recall[1] == pytest.approx(2 / 3, abs=1e-15)
    assert paddlex.recall[1] == pytest.approx(0.5, abs=1e-15)
    assert exact.mAP == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-15)
    assert paddlex.mAP == pytest.approx(1.0 * 4 / 8 + 0.5 * 4 / 8, abs=1e-15)
    # A block with no query that has a positive makes every PaddleClas metric NaN (0/0); exact still measures.
    labels = [1, 1, 1, 1, 8, 8, 8, 8]
    exact = retrieval_metrics(query, labels, gallery, [1, 2], topk=(1,))
    paddlex = retrieval_metrics(query, labels, gallery, [1, 2], topk=(1,), mode="paddlex", sim_block_size=4)
    assert exact.recall[1] == 1.0 and exact.num_queries_without_positive == 4
    assert math.isnan(paddlex.recall[1]) and math.isnan(paddlex.mAP)
    assert paddlex.to_json()["recall1"] is None


# ------------------------------------------------------------------------------------------------ PaddleClas itself

PADDLECLAS_FILES = ("ppcls/engine/evaluation/retrieval.py", "ppcls/metric/metrics.py", "ppcls/metric/avg_metrics.py")

# Runs inside the Paddle environment: PaddleClas' own retrieval_eval with its Recallk and mAP classes, on features
# saved by the test, through a stand-in engine whose "model" returns the saved features unchanged.
_PADDLECLAS_RUNNER = r"""
import contextlib, json, math, os, sys, types
import numpy as np
src, data, out, blocks = sys.argv[1:5]
import paddleclas
sys.path[:0] = [src, os.path.dirname(paddleclas.__file__)]  # two portions of the namespace package `ppcls`
from ppcls.engine.evaluation.retrieval import retrieval_eval
from ppcls.metric.metrics import Recallk, mAP
from ppcls.utils import logger
logger.init_logger(log_level=40)
arrays = np.load(data)

class Loader:
    def __init__(self, features, labels, batch=16):
        self.features, self.labels, self.batch, self.dataset = features, labels, batch, features
    def __len__(self):
        return math.ceil(len(self.features) / self.batch)
    def __iter__(self):
        for i in range(0, len(self.features), self.batch):
            yield [self.features[i:i + self.batch], self.labels[i:i + self.batch]]

class Identity:
    def eval(self):
        pass
    def __call__(self, images, labels=None):
        return {"features": images}

results = {}
for block in [int(b) for b in blocks.split(",")]:
    for name, metric in (("recall1", Recallk(topk=[1])), ("recall5", Recallk(topk=[5])), ("mAP", mAP())):
        engine = types.SimpleNamespace(
            model=Identity(), gallery_query_dataloader=None,
            gallery_dataloader=Loader(arrays["gallery"], arrays["gallery_labels"]),
            query_dataloader=Loader(arrays["query"], arrays["query_labels"]),
            config={"Global": {"sim_block_size": block, "print_batch_step": 10**9, "feature_normalize": False}},
            eval_loss_func=object(), eval_metric_func=metric, auto_cast=lambda is_eval: contextlib.nullcontext(),
            is_rec=True, use_dali=False)
        value = float(retrieval_eval(engine))
        results[f"{block}/{name}"] = None if math.isnan(value) else value
with open(out, "w") as handle:
    json.dump(results, handle)
"""


@pytest.mark.slow
def test_paddlex_mode_matches_paddleclas_itself(tmp_path):
    source = require_paddleclas(PADDLECLAS_FILES, tmp_path)
    rng = np.random.default_rng(7)
    # Continuous random features (no exact ties: Paddle's argsort does not order ties by index).
    query = rng.standard_normal((150, 16)).astype(np.float32)
    gallery = rng.standard_normal((60, 16)).astype(np.float32)
    query_labels = rng.integers(0, 14, 150)  # 10..13: no positive in the gallery
    query_labels[128:136] = 13  # a whole block of 8 without positives: NaN in Paddle for block 8
    gallery_labels = rng.integers(0, 10, 60)
    data = tmp_path / "features.npz"
    np.savez(data, query=query, gallery=gallery, query_labels=query_labels, gallery_labels=gallery_labels)
    runner = tmp_path / "run_paddleclas.py"
    runner.write_text(_PADDLECLAS_RUNNER)
    out = tmp_path / "paddleclas.json"
    blocks = (64, 7, 8, 1000)
    done = subprocess.run(
        [str(PADDLE_PYTHON), str(runner), str(source), str(data), str(out), ",".join(map(str, blocks))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    paddle = json.loads(out.read_text())
    for block in blocks:
        ours = retrieval_metrics(
            query, query_labels, gallery, gallery_labels, mode="paddlex", sim_block_size=block
        ).headline()
        transcribed = paddleclas_reference(query, query_labels, gallery, gallery_labels, (1, 5), block)
        for key in ("recall1", "recall5", "mAP"):
            value = paddle[f"{block}/{key}"]
            if block == 8:
                assert value is None and ours[key] is None  # NaN on both sides
                continue
            # Paddle sums in float32: agreement to float32 precision; the transcription agrees to 1e-12.
            assert ours[key] == pytest.approx(value, abs=2e-6, rel=0), (block, key)
            assert ours[key] == pytest.approx(transcribed[key], abs=1e-12, rel=0)
    exact = retrieval_metrics(query, query_labels, gallery, gallery_labels)
    assert exact.num_queries_without_positive == int((query_labels >= 10).sum())
