"""Calibrating the decision rule: the sweep, the choice, the held-out report (synthetic vectors)."""

from __future__ import annotations

import numpy as np
import pytest

from shitu.errors import ShituError
from shitu.index.calibrate import (
    Observations,
    calibrate,
    choose_rule,
    observe,
    operating_point,
    plot_calibration,
    precision_lower_bound,
    split_units,
)


def clusters(num_classes: int = 12, per_gallery: int = 2, per_query: int = 4, spread: float = 0.25, seed: int = 0):
    """Unit vectors around one random centre per class: gallery and queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, 32))

    def draw(count: int) -> tuple[np.ndarray, list[int]]:
        labels = np.repeat(np.arange(num_classes), count)
        points = centres[labels] + spread * rng.normal(size=(len(labels), 32)) * np.linalg.norm(centres[0]) / 5
        return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32), labels.tolist()

    gallery, gallery_labels = draw(per_gallery)
    queries, query_labels = draw(per_query)
    return gallery, gallery_labels, queries, query_labels


def obs(score, right, known, margin=None) -> Observations:
    n = len(score)
    return Observations(
        np.asarray(score, float),
        np.full(n, np.nan) if margin is None else np.asarray(margin, float),
        np.asarray(right, bool),
        np.asarray(known, bool),
        np.arange(n),
    )


def test_observations_count_known_and_unknown_searches() -> None:
    gallery, gallery_labels, queries, query_labels = clusters()
    seen = observe(gallery, gallery_labels, queries, query_labels)
    assert seen.known.sum() == len(query_labels) and (~seen.known).sum() == len(query_labels)
    assert not seen.right[~seen.known].any()  # an unknown is never answered right by a label
    assert seen.right[seen.known].mean() > 0.9  # tight clusters: nearly every known query is right
    # Known searches score higher than unknown ones: the threshold has something to separate.
    assert np.median(seen.score[seen.known]) > np.median(seen.score[~seen.known])


def test_choose_rule_reaches_the_target_with_the_largest_recall() -> None:
    data = obs(score=[0.9, 0.8, 0.7, 0.6, 0.5], right=[1, 1, 0, 1, 0], known=[1, 1, 0, 1, 1])
    assert choose_rule(data, target_precision=1.0)[:2] == (0.8, None)
    assert operating_point(data, 0.8, None).recall == pytest.approx(2 / 4)
    min_score, _, reached = choose_rule(data, target_precision=0.75)
    assert (min_score, reached) == (0.6, True)  # 3 of 4 accepted are right
    assert choose_rule(data, max_f1=True)[0] == 0.6
    unreachable = obs(score=[0.9, 0.8], right=[0, 1], known=[1, 1])
    assert choose_rule(unreachable, target_precision=0.99)[2] is False


def test_the_margin_is_used_when_it_separates_better() -> None:
    # Wrong answers have high scores but small margins: only a margin test removes them.
    data = obs(
        score=[0.9, 0.9, 0.85, 0.8, 0.75], right=[1, 0, 1, 0, 1], known=[1, 1, 1, 0, 1],
        margin=[0.2, 0.001, 0.1, 0.002, 0.15],
    )  # fmt: skip
    min_score, min_margin, reached = choose_rule(data, target_precision=1.0)
    assert reached and min_margin is not None and 0.002 < min_margin <= 0.1
    assert operating_point(data, min_score, min_margin).recall == pytest.approx(3 / 4)  # every right answer


def test_calibrate_reports_held_out_numbers_and_plots(tmp_path) -> None:
    gallery, gallery_labels, queries, query_labels = clusters()
    result = calibrate(
        gallery, gallery_labels, queries, query_labels, by="class", target_precision=0.95, confidence=0.0
    )
    assert result.reached and result.fit.precision >= 0.95
    assert result.rule.min_score is not None and result.rule.vote == "nearest"
    assert result.held_out.known + result.held_out.unknown + result.fit.known + result.fit.unknown == 2 * 48
    assert result.held_out.precision > result.without_rule.precision  # the rule rejects unknowns
    assert result.held_out.unknown_rejected > 0
    assert result.without_rule.precision == pytest.approx(0.5, abs=0.05)  # half the searches were unknowns
    assert result.curve and result.curve[0]["min_score"] >= result.curve[-1]["min_score"]
    by_image = calibrate(gallery, gallery_labels, queries, query_labels, by="image", max_f1=True)
    assert by_image.objective == "max_f1" and by_image.target_precision is None
    png = plot_calibration(result, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_units_keeps_both_sides_and_refuses_too_little() -> None:
    mask = split_units(np.array([0, 0, 1, 1, 2, 2]), 0.5, seed=1)
    assert 0 < mask.sum() < 6 and len(set(np.array([0, 0, 1, 1, 2, 2])[mask])) in (1, 2)
    with pytest.raises(ShituError, match="at least two"):
        split_units(np.array([3, 3]), 0.5, seed=0)
    with pytest.raises(ShituError, match="--by"):
        observe(np.eye(2), [0, 1], np.eye(2), [0, 1], by="product")


def test_precision_bound_is_clopper_pearson_and_makes_the_choice_cautious() -> None:
    # n of n right: the one-sided bound is (1 - confidence) ** (1 / n); 0 of n: 0; nothing accepted: 1
    bound = precision_lower_bound(np.array([24, 0, 0, 9]), np.array([24, 5, 0, 10]), 0.9)
    assert bound[0] == pytest.approx(0.1 ** (1 / 24), rel=1e-9) and bound[1] == 0.0 and bound[2] == 1.0
    assert 0.6 < bound[3] < 0.9  # 9 of 10 observed: the bound sits well below 0.9
    assert precision_lower_bound(np.array([9]), np.array([10]), 0.0)[0] == pytest.approx(0.9)
    # 20 right answers, then 2 wrong, then 20 more right, then wrong ones: observed precision 40/42 = 0.952
    # reaches 0.95 at the lower threshold (more recall); at 0.9 confidence that is only >= 0.878, while the
    # top 20 of 20 show >= 0.891, so a 0.885 target trusts the top 20 alone
    scores = [0.99 - 0.005 * i for i in range(20)] + [0.86, 0.85] + [0.84 - 0.005 * i for i in range(20)] + [0.5] * 5
    right = [True] * 20 + [False, False] + [True] * 20 + [False] * 5
    data = obs(scores, right, [True] * 42 + [False] * 5)
    loose, _, loose_reached = choose_rule(data, target_precision=0.95, confidence=0.0)
    cautious, _, cautious_reached = choose_rule(data, target_precision=0.885, confidence=0.9)
    assert loose_reached and loose == pytest.approx(0.84 - 0.005 * 19)
    assert cautious_reached and cautious == pytest.approx(0.99 - 0.005 * 19)  # 20 of 20: bound 0.891
    _, _, reached = choose_rule(data, target_precision=0.95, confidence=0.9)
    assert not reached  # 20 of 20 cannot show 0.95 with 0.9 confidence
    with pytest.raises(ShituError, match="confidence"):
        choose_rule(data, target_precision=0.9, confidence=1.0)
