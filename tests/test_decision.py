"""The decision rule: votes, thresholds, "unknown", and the rule stored in an index."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shitu.errors import ShituError
from shitu.index import DecisionRule, Hit, build_index, open_index, vote
from shitu.index.decision import label_scores, resolve_rule


def hits_of(*pairs: tuple[int, float]) -> list[Hit]:
    return [Hit(key, label, f"g{key}.jpg", score) for key, (label, score) in enumerate(pairs)]


# Label 1 has one gallery picture (the nearest); label 2 has many slightly farther ones.
ONE_PICTURE = hits_of((1, 0.90), (2, 0.85), (2, 0.84), (2, 0.83), (3, 0.50))


def test_votes_differ_where_a_label_has_few_pictures() -> None:
    counts = {1: 1, 2: 10, 3: 4}
    assert DecisionRule(vote="nearest").decide(ONE_PICTURE, counts).label == 1
    assert DecisionRule(vote="sum").decide(ONE_PICTURE, counts).label == 2
    assert DecisionRule(vote="mean").decide(ONE_PICTURE, counts).label == 1  # 0.90/1 against 2.52/5
    assert DecisionRule(vote="rank").decide(ONE_PICTURE, counts).label == 2  # 1/2+1/3+1/4 > 1
    assert label_scores(ONE_PICTURE, "rank")[1] == pytest.approx(1.0)
    assert label_scores(ONE_PICTURE, "mean", counts)[2] == pytest.approx((0.85 + 0.84 + 0.83) / 5)
    # Without gallery counts, mean is the mean of the label's hits.
    assert label_scores(ONE_PICTURE, "mean")[2] == pytest.approx(0.84)


def test_sum_vote_matches_the_old_vote() -> None:
    decision = DecisionRule(vote="sum").decide(ONE_PICTURE)
    assert (decision.label, decision.score) == vote(ONE_PICTURE)


def test_thresholds_answer_unknown_and_keep_the_scores() -> None:
    decision = DecisionRule(min_score=0.95).decide(ONE_PICTURE)
    assert decision.label is None and not decision.accepted
    assert decision.candidate == 1 and decision.score == pytest.approx(0.90)
    assert decision.margin == pytest.approx(0.05)
    assert "score 0.9000 is below the minimum 0.9500" in decision.reason
    by_margin = DecisionRule(min_score=0.5, min_margin=0.1).decide(ONE_PICTURE)
    assert by_margin.label is None and "margin" in by_margin.reason
    accepted = DecisionRule(min_score=0.5, min_margin=0.04).decide(ONE_PICTURE)
    assert accepted.label == 1 and accepted.accepted and accepted.reason is None
    assert json.loads(json.dumps(accepted.to_json()))["label"] == 1


def test_one_label_only_passes_the_margin_test_and_no_hits_is_unknown() -> None:
    alone = DecisionRule(min_margin=0.5).decide(hits_of((4, 0.7), (4, 0.6)))
    assert alone.label == 4 and alone.margin is None
    empty = DecisionRule().decide([])
    assert empty.label is None and empty.candidate is None and empty.reason == "no gallery item"


def test_ties_go_to_the_higher_ranked_label() -> None:
    tied = hits_of((7, 0.8), (3, 0.8))
    for name in ("nearest", "sum", "mean"):
        assert DecisionRule(vote=name).decide(tied).label == 7


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ShituError, match="unknown vote"):
        DecisionRule(vote="majority")
    with pytest.raises(ShituError, match="finite"):
        DecisionRule(min_score=float("nan"))
    with pytest.raises(ShituError, match=r"decision\.min_score"):
        DecisionRule.from_json({"min_score": "high"}, path="x/index.json")


def test_overrides_replace_only_what_is_given() -> None:
    base = DecisionRule(min_score=0.6, min_margin=0.02, vote="mean")
    assert resolve_rule(None, base, min_score=0.7) == DecisionRule(0.7, 0.02, "mean")
    assert resolve_rule(None, {"min_score": 0.5}) == DecisionRule(0.5, None, "nearest")
    assert resolve_rule(object()) == DecisionRule()


def test_the_index_stores_its_rule(tmp_path) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 8)).astype(np.float32)
    index = build_index(features, [0, 0, 1, 1, 2, 2], [f"{i}.jpg" for i in range(6)], output=None, recognizer_info={})
    assert index.decision_rule == DecisionRule()  # none stored: no thresholds, as before
    index.save(tmp_path / "idx")
    assert "decision" not in json.loads((tmp_path / "idx" / "index.json").read_text())
    index.set_decision_rule(DecisionRule(0.5, 0.01, "mean"), {"target_precision": 0.99})
    index.save()
    reopened = open_index(tmp_path / "idx")
    assert reopened.decision_rule == DecisionRule(0.5, 0.01, "mean")
    assert reopened.info["calibration"] == {"target_precision": 0.99}
    assert reopened.label_counts == {0: 2, 1: 2, 2: 2}
    items, vectors = reopened.vectors()
    assert [item.label for item in items] == [0, 0, 1, 1, 2, 2]
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, unit, atol=1e-6)
    query_hits = reopened.search(features[2], k=3)[0]
    assert reopened.decide(query_hits).label == 1
    assert reopened.decide(query_hits, DecisionRule(min_score=1.5)).label is None


def test_a_damaged_stored_rule_is_named(tmp_path) -> None:
    features = np.eye(3, dtype=np.float32)
    index = build_index(features, [0, 1, 2], ["a", "b", "c"], output=tmp_path / "idx", recognizer_info={})
    index.set_decision_rule(DecisionRule(0.5))
    index.save()
    info_file = tmp_path / "idx" / "index.json"
    doc = json.loads(info_file.read_text())
    doc["decision"]["vote"] = "majority"
    info_file.write_text(json.dumps(doc))
    with pytest.raises(ShituError, match=r"index\.json: decision\.vote must be one of"):
        open_index(tmp_path / "idx")
