"""shitu-resnet end to end, as a user meets it: the package is pip-installed into a folder of its own (the
test environment is left as it is), and the ``shitu`` command of this environment, run in subprocesses with
that folder on ``PYTHONPATH``, finds it through its entry point, then trains, evaluates, predicts, indexes
and searches with ResNet18_rec at 32 px, width 8, three training steps."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shitu.data.demo import demo_dataset_path

PLUGIN_DIR = Path(__file__).resolve().parents[1]
SHITU = Path(sys.executable).with_name("shitu")
CLASSES = (0, 1, 2, 3)
TRAIN_PER_CLASS = 6  # 24 images: three batches of 8
TINY = {
    "Train.model_scale": 0.125,  # 64 × 0.125: 8 stem channels
    "Train.input_size": 32,
    "Train.batch_size": 8,
    "Train.epochs_iters": 1,
    "Train.warmup_steps": 0,
    "Train.learning_rate": 0.01,
    "Evaluate.batch_size": 32,
    "Global.device": "cpu",
}
TINY_CLI = [arg for key, value in TINY.items() for arg in ("-o", f"{key}={value}")]


def _can_build_wheels_here() -> bool:
    """Whether this environment's setuptools builds a wheel by itself (≥ 70.1, or the ``wheel`` package)."""
    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The plugin installed (no dependencies) into a fresh folder, and the environment that puts it on the path
    with its own shitu cache (no installed bundle, no leftovers)."""
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    if _can_build_wheels_here():
        command.append("--no-build-isolation")  # otherwise pip builds in an isolated environment of its own
    done = subprocess.run([*command, str(PLUGIN_DIR)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "shitu_resnet" / "configs" / "ResNet18_rec.yaml").is_file()  # the config is package data
    paths = [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "SHITU_CACHE_DIR": str(cache)}


def shitu(env: dict[str, str], *args: object, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SHITU), *(str(a) for a in args)], capture_output=True, text=True, env=env, timeout=timeout
    )


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The demo dataset cut to 4 classes: 6 training images each; their gallery and query images."""
    root = tmp_path_factory.mktemp("data") / "grocery"
    shutil.copytree(demo_dataset_path(), root)
    for split in ("train", "gallery", "query"):
        kept, seen = [], {}
        for line in (root / f"{split}.txt").read_text().splitlines():
            label = int(line.rsplit(" ", 1)[1])
            seen[label] = seen.get(label, 0) + 1
            if label in CLASSES and (split != "train" or seen[label] <= TRAIN_PER_CLASS):
                kept.append(line)
        (root / f"{split}.txt").write_text("".join(f"{line}\n" for line in kept))
    return root


def list_entries(root: Path, split: str) -> list[tuple[Path, int]]:
    pairs = [line.rsplit(" ", 1) for line in (root / f"{split}.txt").read_text().splitlines()]
    return [(root / path, int(label)) for path, label in pairs]


def assert_unit_features(lines: list[dict], count: int) -> np.ndarray:
    assert len(lines) == count
    features = np.asarray([line["feature"] for line in lines], np.float64)
    assert features.shape == (count, 512) and np.isfinite(features).all()
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-4)
    return features


def test_plugins_lists_the_installed_package(env):
    done = shitu(env, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    (resnet,) = [p for p in json.loads(done.stdout)["plugins"] if p["name"] == "resnet"]
    assert resnet["ok"] and not resnet["errors"] and not resnet["builtin"]
    assert resnet["models"] == ["ResNet18_rec"] and resnet["hooks"] == ["register_models"]
    assert resnet["distribution"] == "shitu-resnet" and resnet["version"] == "0.1.0"
    assert resnet["module"] == "shitu_resnet"


def test_predict_builds_the_model_with_random_weights(env, dataset):
    images = [path for path, _ in list_entries(dataset, "gallery")[:2]]
    done = shitu(env, "predict", "--model", "ResNet18_rec", "--input-size", 32, "--json", *images)
    assert done.returncode == 0, done.stderr
    assert "RANDOM weights" in done.stderr
    lines = json_lines(done.stdout)
    assert [line["input_path"] for line in lines] == [str(p) for p in images]
    features = assert_unit_features(lines, 2)
    assert not np.allclose(features[0], features[1])


def test_train_eval_predict_index_search(env, dataset, tmp_path):
    output = tmp_path / "run"
    trained = shitu(env, "train", "--model", "ResNet18_rec", "--dataset", dataset, "--output", output, "--json",
                    *TINY_CLI)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    *epochs, done = json_lines(trained.stdout)
    assert done["event"] == "done" and done["model"] == "ResNet18_rec" and done["iterations"] == 3
    (epoch,) = [line for line in epochs if line.get("event") == "epoch"]
    # the plugin's own loss ran: cross-entropy alone (PP-ShiTuV2_rec's recipe would add a triplet term)
    assert epoch["epoch"] == 1 and np.isfinite(epoch["loss"]) and epoch["loss"] > 0
    assert epoch["CELoss"] == pytest.approx(epoch["loss"]) and "TripletAngularMarginLoss" not in epoch
    log = (output / "train.log").read_text()
    assert "CELoss" in log and "Triplet" not in log
    best = Path(done["best_model"])
    assert best == output / "best_model"
    info = json.loads((best / "shitu_model.json").read_text())
    assert info["model"] == "ResNet18_rec" and info["num_classes"] == len(CLASSES)
    assert info["arch"] == {"scale": 0.125} and info["embedding_size"] == 512
    result = json.loads((output / "train_result.json").read_text())
    assert result["done_flag"] is True

    evaluated = shitu(env, "eval", "--model-dir", best, "--dataset", dataset, "--output", tmp_path / "eval", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout)
    assert set(report["metrics"]) == {"recall1", "recall5", "mAP"}
    assert all(0.0 <= value <= 1.0 for value in report["metrics"].values())
    gallery, query = list_entries(dataset, "gallery"), list_entries(dataset, "query")
    assert report["details"]["num_gallery"] == len(gallery) and report["details"]["num_query"] == len(query)
    assert report["metrics"]["recall1"] == pytest.approx(epoch["recall1"], abs=1e-6)  # the run's own evaluation

    predicted = shitu(env, "predict", "--model-dir", best, "--json", *(path for path, _ in query[:3]))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "RANDOM" not in predicted.stderr
    assert_unit_features(json_lines(predicted.stdout), 3)

    index = tmp_path / "index"
    built = shitu(env, "index", "build", "--model-dir", best, "--gallery", dataset / "gallery.txt",
                  "--output", index, "--json")  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    summary = json.loads(built.stdout)
    assert summary["count"] == len(gallery) and summary["dim"] == 512
    assert summary["recognizer"]["model"] == "ResNet18_rec" and summary["recognizer"]["input_size"] == 32

    first_gallery = gallery[0][0]
    searched = shitu(env, "search", "--index", index, "-k", 3, "--json", first_gallery, *(p for p, _ in query[:4]))
    assert searched.returncode == 0, searched.stderr[-3000:]
    lines = json_lines(searched.stdout)
    assert [line["input"] for line in lines] == [str(first_gallery), *(str(p) for p, _ in query[:4])]
    gallery_labels = {label for _, label in gallery}
    for line in lines:
        scores = [hit["score"] for hit in line["hits"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and scores[-1] >= -1.0 - 1e-5
        assert {hit["label"] for hit in line["hits"]} <= gallery_labels and line["label"] in gallery_labels
    itself = lines[0]["hits"][0]
    assert itself["path"] == str(first_gallery) and itself["score"] == pytest.approx(1.0, abs=1e-4)
    assert itself["label"] == gallery[0][1]
