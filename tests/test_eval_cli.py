"""``shitu eval`` and ``evaluate_dataset``: the numbers equal the metrics of the recognizer's own features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shitu.data.transforms import read_image
from shitu.embed.recognizer import Embedded, EmbedFailure
from shitu.errors import ShituError
from shitu.evaluation.evaluate import evaluate_dataset, write_evaluate_result
from shitu.evaluation.metrics import retrieval_metrics

INPUT_SIZE = 32


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A small PP-ShiTuV2_rec bundle (quarter width, random weights) that embeds at 32 px."""
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model("PP-ShiTuV2_rec")
    model = spec.build(20, seed=3, scale=0.25)
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    return save_bundle(
        path, spec=spec, model=model, num_classes=20, arch={"scale": 0.25}, extra={"input_size": INPUT_SIZE}
    )


@pytest.fixture(scope="module")
def embedded_demo(bundle):
    """Features of the demo dataset's gallery and query lists, straight from ``Recognizer.embed``."""
    from shitu.data.demo import demo_dataset_path
    from shitu.embed.recognizer import load_recognizer

    root = demo_dataset_path()
    recognizer = load_recognizer(bundle)
    assert recognizer.input_size == INPUT_SIZE
    out = {}
    for split in ("gallery", "query"):
        lines = [line.rsplit(" ", 1) for line in (root / f"{split}.txt").read_text().splitlines() if line]
        embedded = recognizer.embed([root / path for path, _ in lines], batch_size=64)
        assert not embedded.failures
        out[split] = (embedded.features, np.array([int(label) for _, label in lines]))
    return out


def _expected(embedded_demo, **options):
    (gallery, gallery_labels), (query, query_labels) = embedded_demo["gallery"], embedded_demo["query"]
    return retrieval_metrics(query, query_labels, gallery, gallery_labels, **options)


def test_eval_json_and_file_equal_metrics_of_embedded_features(cli, bundle, demo_copy, tmp_path, embedded_demo):
    output = tmp_path / "out"
    result = cli(
        "eval", "--model-dir", bundle, "--dataset", demo_copy, "--output", output,
        "--topk", "1,5,10", "--per-class", "--examples", "3", "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    doc = result.json()
    expected = _expected(embedded_demo, topk=(1, 5, 10), per_class=True, confusion_pairs=10)
    headline = expected.headline()
    assert doc["metrics"] == {"recall1": headline["recall1"], "recall5": headline["recall5"], "mAP": headline["mAP"]}
    assert doc["details"]["metrics"] == json.loads(json.dumps(expected.to_json()))
    assert doc["details"]["metrics"]["recall10"] == headline["recall10"]
    assert doc["details"]["num_gallery"] == 40 and doc["details"]["num_query"] == 60
    assert doc["details"]["recognizer"]["input_size"] == INPUT_SIZE
    written = json.loads((output / "evaluate_result.json").read_text())
    assert written == {"done_flag": True, "metrics": doc["metrics"], "details": doc["details"]}
    assert list(written["metrics"]) == ["recall1", "recall5", "mAP"]
    assert doc["output"] == str(output / "evaluate_result.json")
    from PIL import Image

    with Image.open(output / "examples.png") as sheet:
        assert sheet.format == "PNG"
        assert sheet.height > 3 * 128 and sheet.width > 6 * 128  # 3 rows of query + 5 matches


def test_eval_paddlex_mode_human_output(cli, bundle, demo_copy, tmp_path, embedded_demo):
    output = tmp_path / "out"
    result = cli(
        "eval", "--model-dir", bundle, "--dataset", demo_copy, "--output", output,
        "--mode", "paddlex", "-o", "Evaluate.sim_block_size=7",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert result.stdout == ""
    expected = _expected(embedded_demo, mode="paddlex", sim_block_size=7).headline()
    written = json.loads((output / "evaluate_result.json").read_text())
    assert written["metrics"] == {key: expected[key] for key in ("recall1", "recall5", "mAP")}
    assert written["details"]["metrics"]["mode"] == "paddlex"
    assert written["details"]["metrics"]["sim_block_size"] == 7
    assert f"{expected['mAP']:.5f}" in result.stderr
    assert "blocks of 7" in result.stderr


def test_bad_list_line_is_one_located_error(cli, bundle, demo_copy, tmp_path):
    lines = (demo_copy / "query.txt").read_text().splitlines()
    lines[2] = lines[2].replace(" ", "\t")
    (demo_copy / "query.txt").write_text("\n".join(lines) + "\n")
    result = cli("eval", "--model-dir", bundle, "--dataset", demo_copy, "--output", tmp_path / "out")
    assert result.code == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert f"{demo_copy}/query.txt:3: malformed line" in error_lines[0]
    assert not (tmp_path / "out" / "evaluate_result.json").exists()


def test_model_and_model_dir_are_exclusive(cli, demo_copy):
    result = cli("eval", "--dataset", demo_copy)
    assert result.code == 1
    assert "give either --model-dir BUNDLE or --model NAME" in result.stderr


def test_bad_topk_and_mode(cli, bundle, demo_copy):
    assert "--topk" in cli("eval", "--model-dir", bundle, "--dataset", demo_copy, "--topk", "1,x").stderr
    assert "unknown --mode" in cli("eval", "--model-dir", bundle, "--dataset", demo_copy, "--mode", "fast").stderr


# ------------------------------------------------------------------------------------------------ library level


class ColourRecognizer:
    """Stands in for a Recognizer (no model): the feature is the image's mean colour, L2-normalised."""

    def __init__(self) -> None:
        self.calls = 0

    def describe(self) -> dict:
        return {"model": "colour"}

    def embed(self, sources, *, batch_size=32, progress=None):
        self.calls += 1
        rows, indices, failures = [], [], []
        for i, source in enumerate(sources):
            try:
                image = read_image(source)
            except ShituError as exc:
                failures.append(EmbedFailure(i, str(source), str(exc)))
                continue
            mean = image.reshape(-1, 3).mean(axis=0) + 1.0
            rows.append(mean / np.linalg.norm(mean))
            indices.append(i)
        if progress is not None:
            progress(len(sources))
        return Embedded(np.array(rows, np.float32).reshape(-1, 3), indices, failures)


def test_evaluate_dataset_with_a_stand_in_recognizer(tiny_dataset, tmp_path):
    root = tiny_dataset(classes=3, per_class=5)
    calls = []
    result = evaluate_dataset(
        ColourRecognizer(), root, topk=(1, 2), progress=lambda *a: calls.append(a), examples=(tmp_path / "e.png", 2)
    )
    # Each class has one colour per image index; the mean colours are computed here the same way.
    recognizer = ColourRecognizer()
    lines = {
        s: [ln.rsplit(" ", 1) for ln in (root / f"{s}.txt").read_text().splitlines()] for s in ("gallery", "query")
    }
    features = {s: recognizer.embed([root / p for p, _ in lines[s]]).features for s in lines}
    labels = {s: np.array([int(label) for _, label in lines[s]]) for s in lines}
    expected = retrieval_metrics(
        features["query"], labels["query"], features["gallery"], labels["gallery"], topk=(1, 2, 5)
    )
    assert result.metrics.headline() == expected.headline()
    assert sorted(result.metrics.recall) == [1, 2, 5]  # 1 and 5 are always computed (PaddleX's file needs them)
    assert [c[0] for c in calls] == ["gallery", "query"]
    assert calls[0][1:] == (3, 3) and calls[1][1:] == (6, 6)
    assert result.examples == tmp_path / "e.png" and result.examples.stat().st_size > 0
    path = write_evaluate_result(tmp_path / "out", result.metrics)
    assert json.loads(path.read_text()) == {
        "done_flag": True,
        "metrics": {key: expected.headline()[key] for key in ("recall1", "recall5", "mAP")},
    }


def test_unreadable_image_is_an_error_naming_list_and_line(tiny_dataset):
    root = tiny_dataset(classes=2, per_class=4)
    broken = (root / "gallery.txt").read_text().splitlines()[1].rsplit(" ", 1)[0]
    (root / broken).write_bytes(b"not an image")
    with pytest.raises(ShituError) as caught:
        evaluate_dataset(ColourRecognizer(), root)
    message = str(caught.value)
    assert message.startswith(f"{root}/gallery.txt:2: cannot read image {broken}")


def test_write_evaluate_result_keeps_extra_keys_outside_metrics(tmp_path):
    metrics = retrieval_metrics(np.eye(2, dtype=np.float32), [0, 1], np.eye(2, dtype=np.float32), [0, 1])
    path = write_evaluate_result(tmp_path, metrics, {"note": 1})
    assert json.loads(path.read_text()) == {
        "done_flag": True,
        "metrics": {"recall1": 1.0, "recall5": 1.0, "mAP": 1.0},
        "details": {"note": 1},
    }
    only_recall1 = retrieval_metrics(np.eye(2, dtype=np.float32), [0, 1], np.eye(2, dtype=np.float32), [0, 1], topk=1)
    with pytest.raises(ShituError, match="recall5"):
        write_evaluate_result(tmp_path, only_recall1)


def test_model_name_means_random_weights_and_warns(cli, demo_copy, tmp_path, monkeypatch):
    import shitu.embed.recognizer

    asked = []

    def fake_load(model, *, input_size=None, **kwargs):
        asked.append((model, input_size))
        return ColourRecognizer()

    monkeypatch.setattr(shitu.embed.recognizer, "load_recognizer", fake_load)
    result = cli(
        "eval", "--model", "PP-ShiTuV2_rec", "--random-weights", "--dataset", demo_copy, "--output", tmp_path / "out",
        "-o", "Train.input_size=48", "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert asked == [("PP-ShiTuV2_rec", 48)]
    assert "warning: PP-ShiTuV2_rec has RANDOM weights" in result.stderr
    assert result.json()["details"]["recognizer"] == {"model": "colour"}
    assert json.loads((tmp_path / "out" / "evaluate_result.json").read_text())["done_flag"] is True
