"""Open-set recognition end to end on the demo photos with the demo's starting weights (64 px): "unknown"
answers in search and predict, calibration stored in the index, open-set eval numbers, the gallery audit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shitu.data.demo import demo_dataset_path, demo_start_weights_path
from shitu.index import DecisionRule, open_index

pytestmark = pytest.mark.filterwarnings("ignore")
PRODUCTS = 8


def _lines(root: Path, split: str) -> list[str]:
    return [line for line in (root / f"{split}.txt").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path | str]:
    """The demo set with a mislabel (a label-0 photo copied under label 1) and an exact duplicate (a label-2
    photo copied under its own label) in the gallery, and its index built with the starting weights."""
    from shitu.index.ops import build_gallery_index

    root = tmp_path_factory.mktemp("openset") / "grocery"
    shutil.copytree(demo_dataset_path(), root)
    for split in ("gallery", "query"):  # the first 8 products: a 16-image gallery, 24 queries
        kept = [line for line in _lines(root, split) if int(line.rsplit(" ", 1)[1]) < PRODUCTS]
        (root / f"{split}.txt").write_text("\n".join(kept) + "\n")
    gallery = _lines(root, "gallery")
    by_label = {int(line.rsplit(" ", 1)[1]): line.rsplit(" ", 1)[0] for line in reversed(gallery)}
    mislabel = "images/planted/mislabel.jpg"
    duplicate = "images/planted/duplicate.jpg"
    (root / "images" / "planted").mkdir()
    shutil.copyfile(root / by_label[0], root / mislabel)
    shutil.copyfile(root / by_label[2], root / duplicate)
    (root / "gallery.txt").write_text("\n".join([*gallery, f"{mislabel} 1", f"{duplicate} 2"]) + "\n")
    index = root.parent / "index"
    build_gallery_index(root, index, model_dir=demo_start_weights_path())
    return {
        "root": root,
        "index": index,
        "mislabel": str(root / mislabel),
        "mislabel_original": str(root / by_label[0]),
        "duplicate": str(root / duplicate),
        "duplicate_original": str(root / by_label[2]),
    }


def test_audit_finds_the_planted_mislabel_and_duplicate(cli, planted, tmp_path) -> None:
    result = cli("index", "audit", "--index", planted["index"], "--output", tmp_path / "audit", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    groups = {frozenset(item["path"] for item in group["items"]): group for group in report["duplicates"]}
    wrong = groups[frozenset({planted["mislabel"], planted["mislabel_original"]})]
    assert wrong["conflicting_labels"] and wrong["labels"] == [0, 1] and wrong["same_bytes"]
    same = groups[frozenset({planted["duplicate"], planted["duplicate_original"]})]
    assert not same["conflicting_labels"] and same["labels"] == [2] and same["same_bytes"]
    pairs = [{pair["a"]["path"], pair["b"]["path"]} for pair in report["mislabels"]]
    assert {planted["mislabel"], planted["mislabel_original"]} in pairs
    assert {planted["duplicate"], planted["duplicate_original"]} not in pairs  # same label: not a mislabel
    assert report["count"] == 2 * PRODUCTS + 2 and report["unreadable"] == []
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 4 and "different labels!" in page
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["found"] == report["found"]


def test_search_answers_unknown_below_the_minimum_score(cli, planted) -> None:
    queries = [str(planted["root"] / line.rsplit(" ", 1)[0]) for line in _lines(planted["root"], "query")[:3]]
    plain = cli("search", *queries, "--index", planted["index"], "--json")
    assert plain.code == 0, plain.stderr
    answers = plain.json_lines()
    assert all(a["label"] is not None and a["accepted"] and a["reason"] is None for a in answers)
    assert all(a["label"] == a["hits"][0]["label"] for a in answers)  # the default vote: nearest
    strict = cli("search", *queries, "--index", planted["index"], "--min-score", "1.01", "--json")
    rejected = strict.json_lines()
    assert [a["label"] for a in rejected] == [None, None, None]
    assert all("below the minimum 1.0100" in a["reason"] for a in rejected)
    assert [a["candidate"] for a in rejected] == [a["label"] for a in answers]
    assert [a["score"] for a in rejected] == [a["score"] for a in answers]


def test_predict_api_takes_a_rule(planted) -> None:
    from shitu.embed.predict import create_model

    image = str(planted["root"] / _lines(planted["root"], "query")[0].rsplit(" ", 1)[0])
    model = create_model(demo_start_weights_path(), index=planted["index"], decision={"min_score": 1.01})
    (result,) = list(model.predict(image))
    assert result["label"] is None and result["decision"]["candidate"] == result["hits"][0].label
    (accepted,) = list(model.predict(image, min_score=-1.0))
    assert accepted["label"] == accepted["hits"][0].label and accepted.json["res"]["decision"]["accepted"]


def test_calibrate_stores_the_rule_and_search_uses_it(cli, planted, tmp_path) -> None:
    index = tmp_path / "index"
    shutil.copytree(planted["index"], index)
    result = cli(
        "index", "calibrate", "--index", index, "--dataset", planted["root"], "--target-precision", "0.9",
        "--output", tmp_path / "cal", "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    doc = result.json()
    rule = DecisionRule.from_json(doc["rule"])
    assert rule.min_score is not None and rule.vote == "nearest"
    assert doc["held_out"]["known"] > 0 and doc["held_out"]["unknown"] > 0  # reported on queries not fit
    assert doc["fit"]["precision"] >= 0.9 or not doc["reached"]
    assert (tmp_path / "cal" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["rule"] == doc["rule"]
    stored = open_index(index)
    assert stored.decision_rule == rule and stored.info["calibration"]["by"] == "class"
    queries = [str(planted["root"] / line.rsplit(" ", 1)[0]) for line in _lines(planted["root"], "query")]
    answers = cli("search", *queries[:12], "--index", index, "--json").json_lines()
    for answer in answers:
        expected = answer["score"] >= rule.min_score and (
            rule.min_margin is None or answer["margin"] is None or answer["margin"] >= rule.min_margin
        )
        assert answer["accepted"] == expected
    overridden = cli("search", *queries[:3], "--index", index, "--min-score", "-1", "--min-margin", "-1", "--json")
    assert all(a["accepted"] for a in overridden.json_lines())


def test_eval_reports_open_set_numbers(cli, planted, tmp_path) -> None:
    root = tmp_path / "grocery"
    shutil.copytree(planted["root"], root)
    gallery = [line for line in _lines(root, "gallery") if int(line.rsplit(" ", 1)[1]) >= 2]
    (root / "gallery.txt").write_text("\n".join(gallery) + "\n")  # labels 0 and 1: 6 queries, no gallery image
    model = demo_start_weights_path()
    strict = cli("eval", "--model-dir", model, "--dataset", root, "--output", tmp_path / "e2", "--min-score", "1.01",
                 "--json")  # fmt: skip
    assert strict.code == 0, strict.stderr
    numbers = strict.json()["details"]["open_set"]
    assert numbers["unknown_queries"] == 6 and numbers["known_queries"] == 3 * PRODUCTS - 6
    assert numbers["unknown_rejected"] == 6 and numbers["known_rejected"] == 3 * PRODUCTS - 6
    assert numbers["precision"] is None
    assert numbers["rule"]["min_score"] == pytest.approx(1.01)
    saved = json.loads((tmp_path / "e2" / "evaluate_result.json").read_text())
    assert saved["details"]["open_set"]["unknown_rejected"] == 6


def test_open_set_counts_without_and_with_a_rule() -> None:
    import numpy as np

    from shitu.evaluation.openset import open_set_metrics

    gallery = np.eye(4, dtype=np.float32)  # labels 0..3, one picture each
    queries = np.array([[1, 0.1, 0, 0], [0, 1, 0.2, 0], [0.6, 0.5, 0, 0], [0, 0, 0.2, 1]], np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    labels = [0, 2, 7, 3]  # query 1 is wrongly nearest to label 1; label 7 is not in the gallery
    plain = open_set_metrics(queries, labels, gallery, [0, 1, 2, 3], DecisionRule())
    assert (plain.unknown_queries, plain.unknown_accepted, plain.unknown_rejected) == (1, 1, 0)
    assert (plain.known_right, plain.known_wrong, plain.known_rejected) == (2, 1, 0)
    assert plain.precision == pytest.approx(2 / 4)
    strict = open_set_metrics(queries, labels, gallery, [0, 1, 2, 3], DecisionRule(min_score=0.9))
    assert (strict.unknown_rejected, strict.known_right, strict.known_wrong, strict.known_rejected) == (1, 2, 1, 0)
    margin = open_set_metrics(queries, labels, gallery, [0, 1, 2, 3], DecisionRule(min_margin=0.5))
    assert (margin.unknown_rejected, margin.known_right, margin.known_wrong) == (1, 2, 1)


def test_audit_reports_a_split_label_only_when_unusually_far_apart_for_the_gallery() -> None:
    import numpy as np

    from shitu.index import build_index
    from shitu.index.audit import audit

    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(64, 64)))[0][:24]  # orthonormal: 12 centres, 12 offsets

    def pair(label: int, apart: float) -> np.ndarray:
        """Two unit vectors either side of ``label``'s centre; their cosine is (1 - apart²) / (1 + apart²)."""
        centre, offset = centres[label], centres[12 + label]
        rows = np.stack([centre + apart * offset, centre - apart * offset]) + 0.01 * rng.normal(size=(2, 64))
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def labels_split(vectors: np.ndarray) -> list[int]:
        labels = np.repeat(np.arange(12), 2).tolist()
        index = build_index(vectors, labels, [f"{i}.jpg" for i in range(24)], output=None, recognizer_info={})
        return [split["label"] for split in audit(index, hash_files=False).split_labels]

    # every label's two pictures about equally far apart (catalogue picture and shelf photo): nothing unusual
    even = np.concatenate([pair(i, rng.uniform(0.9, 1.1)) for i in range(12)])  # cosines about -0.1 to 0.1
    assert labels_split(even) == []
    # one label whose two pictures point in nearly opposite directions: that label alone
    planted = np.concatenate([pair(i, rng.uniform(0.9, 1.1) if i != 5 else 5.0) for i in range(12)])  # 5: -0.92
    assert labels_split(planted) == [5]
