"""shitu-imagefolder, tested as what it is: a third-party package that is pip-installed and found through its
entry point. The command line runs in subprocesses; the format's own logic is tested in-process."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shitu
from shitu.data.convert import convert_dataset
from shitu.data.demo import demo_dataset_path
from shitu.data.formats import SplitOptions
from shitu.plugins import PluginHost, reset_host

PLUGIN_DIR = Path(__file__).resolve().parents[1]
CLASSES = ("apple", "banana", "cherry", "date")
PER_CLASS = 4


# -- helpers (self-contained: this package's tests do not use shitu's own conftest) ----------------------
@pytest.fixture(autouse=True)
def _fresh_plugin_host():
    reset_host()
    yield
    reset_host()


@pytest.fixture(scope="module")
def installed() -> None:
    """pip-install the plugin (editable, no dependencies), exactly as a user installs a third-party plugin."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(PLUGIN_DIR)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def imagefolder(monkeypatch):
    """The plugin module, imported from this source tree."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    return importlib.import_module("shitu_imagefolder")


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "JPEG") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format=fmt)
    return path


def make_tree(root: Path) -> Path:
    """4 classes × 4 images (JPEG and PNG), one file that is no image, one hidden file, a README."""
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            write_image(root / name / f"img{i}.{ext}", color=(60 * c, 40 * i, 90), fmt=fmt)
    (root / "apple" / "notes.txt").write_text("not an image\n")
    write_image(root / "banana" / ".hidden.jpg")
    (root / "README.md").write_text("four fruits\n")
    return root


def expected_images(root: Path) -> list[str]:
    return sorted(f"{name}/img{i}.{'png' if i % 2 else 'jpg'}" for name in CLASSES for i in range(PER_CLASS))


def read_lists(root: Path) -> dict[str, list[tuple[str, int]]]:
    lists = {}
    for split in ("train", "gallery", "query"):
        lines = (root / f"{split}.txt").read_text().splitlines()
        lists[split] = [(path, int(label)) for path, label in (line.rsplit(" ", 1) for line in lines)]
    return lists


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def shitu_cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SHITU_TRACE_PLUGINS", "SHITU_DEBUG")}
    return subprocess.run(
        [sys.executable, "-m", "shitu", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def host_with(module) -> PluginHost:
    host = PluginHost(load_entry_points=False)
    host.load_builtins()
    info = host.register(module, name="imagefolder")
    assert info.ok, info.errors
    return host


# -- the installed package, through the command line ------------------------------------------------------
def test_installed_plugin_is_listed(installed):
    result = shitu_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    info = listed["imagefolder"]
    assert info["distribution"] == "shitu-imagefolder"
    assert info["version"] == "0.1.0"
    assert info["dataset_formats"] == ["ImageFolder"]
    assert info["builtin"] is False and info["ok"] is True and info["errors"] == []
    assert info["module"] == "shitu_imagefolder"
    assert info["hooks"] == ["detect_dataset_format", "register_dataset_formats"]


def test_convert_then_check(installed, tmp_path):
    root = make_tree(tmp_path / "fruit")
    result = shitu_cli("convert", root, "--from", "imagefolder", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source_format"] == "ImageFolder"
    assert doc["counts"] == {"train": 11, "gallery": 3, "query": 2}  # 70/20/10 of 16, by image
    assert doc["notes"] == [f"{root / 'apple'}: 1 file(s) that are not images inside the dataset skipped"]
    assert f"warning: {root / 'apple'}: 1 file(s) that are not images" in result.stderr

    assert (root / "label.txt").read_text() == "apple\nbanana\ncherry\ndate\n"
    lists = read_lists(root)
    listed = sorted(path for entries in lists.values() for path, _ in entries)
    assert listed == expected_images(root)  # every image exactly once; no hidden file, no notes.txt
    for entries in lists.values():
        for path, label in entries:
            assert CLASSES[label] == path.split("/")[0]

    check = shitu_cli("check", root, "--output", tmp_path / "out", "--json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["check_pass"] is True


def test_format_is_detected_without_from(installed, tmp_path):
    root = make_tree(tmp_path / "fruit")
    result = shitu_cli("convert", root, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source_format"] == "ImageFolder"


def test_split_by_class_is_open_set_deterministic_and_idempotent(installed, tmp_path):
    first, second = make_tree(tmp_path / "one"), make_tree(tmp_path / "two")
    options = ("--by", "class", "--train", "50", "--gallery", "25", "--query", "25", "--seed", "1")
    for root in (first, second):
        result = shitu_cli("convert", root, "--from", "imagefolder", *options)
        assert result.returncode == 0, result.stderr

    lists = read_lists(first)
    classes = {split: {label for _, label in entries} for split, entries in lists.items()}
    assert len(classes["train"]) == 2
    assert classes["train"].isdisjoint(classes["gallery"] | classes["query"])
    assert classes["gallery"] == classes["query"] and len(classes["gallery"]) == 2
    assert sorted(p for entries in lists.values() for p, _ in entries) == expected_images(first)
    for name in ("train", "gallery", "query", "label"):
        assert (first / f"{name}.txt").read_text() == (second / f"{name}.txt").read_text()

    before = tree_digest(first)
    again = shitu_cli("convert", first, *options)  # detected again: a converted ImageFolder is still one
    assert again.returncode == 0, again.stderr
    assert tree_digest(first) == before  # nothing changed, no backup written
    assert not list(first.glob("*.bak*"))


# -- in-process: the format itself ------------------------------------------------------------------------
def test_convert_plan(imagefolder, tmp_path):
    root = make_tree(tmp_path / "fruit")
    plan = imagefolder.ImageFolder().convert(root, None)
    assert plan.class_names == list(CLASSES)
    assert {split: len(samples) for split, samples in plan.lists.items()} == {"train": 11, "gallery": 3, "query": 2}
    assert sorted(s.path for samples in plan.lists.values() for s in samples) == expected_images(root)
    assert plan.notes == [f"{root / 'apple'}: 1 file(s) that are not images inside the dataset skipped"]
    same = imagefolder.ImageFolder().convert(root, SplitOptions(seed=0))
    assert same.lists == plan.lists  # the default split is 70/20/10 by image, seed 0
    splits = {
        tuple(s.path for s in imagefolder.ImageFolder().convert(root, SplitOptions(seed=seed)).lists["query"])
        for seed in range(5)
    }
    assert len(splits) > 1  # the seed matters


def test_convert_notes_and_skips(imagefolder, tmp_path):
    root = make_tree(tmp_path / "fruit")
    (root / "empty").mkdir()
    (root / "stray.csv").write_text("a,b\n")
    (root / "cherry" / "deeper").mkdir()
    write_image(root / "cherry" / "deeper" / "x.jpg")
    outside = write_image(tmp_path / "outside.jpg")
    (root / "date" / "link.jpg").symlink_to(outside)
    plan = imagefolder.ImageFolder().convert(root, None)
    paths = sorted(s.path for samples in plan.lists.values() for s in samples)
    assert paths == sorted([*expected_images(root), "cherry/deeper/x.jpg"])  # any depth, never outside
    assert plan.class_names == list(CLASSES)  # 'empty' has no image: no class
    assert f"{root}: 1 file(s) beside the class folders skipped (stray.csv)" in plan.notes
    assert f"{root / 'empty'}: no image, class skipped" in plan.notes
    assert f"{root / 'date'}: 1 file(s) that are not images inside the dataset skipped" in plan.notes


def test_validate(imagefolder, tmp_path):
    fmt = imagefolder.ImageFolder()
    root = make_tree(tmp_path / "fruit")
    assert fmt.validate(root) == []

    write_image(root / "green apple" / "a.jpg")
    write_image(root / "pear " / "a.jpg")
    (root / "nothing").mkdir()
    issues = {(i.severity, Path(i.file).name): i.message for i in fmt.validate(root)}
    assert issues == {
        ("warning", "green apple"): "class folder name contains whitespace (PaddleX cannot read it)",
        ("error", "pear "): "class folder name has a line break or leading/trailing whitespace "
        "(a list line cannot hold it)",
        ("warning", "nothing"): "class folder holds no image; skipped",
    }
    with pytest.raises(shitu.ShituError, match="leading/trailing whitespace"):
        fmt.convert(root, None)

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "readme.txt").write_text("x")
    assert [(i.severity, i.message) for i in fmt.validate(empty)] == [
        ("warning", "class folder holds no image; skipped"),
        ("error", "no class folder with images (expected root/<class>/<image>)"),
    ]
    with pytest.raises(shitu.ShituError, match="no class folder with images"):
        fmt.convert(empty, None)


def test_detect(imagefolder, tmp_path):
    detect = imagefolder.detect_dataset_format
    root = make_tree(tmp_path / "fruit")
    (root / ".DS_Store").write_text("")
    (root / "LICENSE").write_text("")
    assert detect(path=root) == "ImageFolder"
    assert detect(path=demo_dataset_path()) is None  # a ShiTuRecDataset: images/<class>/..., lists
    assert detect(path=tmp_path / "missing") is None

    (root / "stray.csv").write_text("a,b\n")
    assert detect(path=root) is None  # other files on top: not (only) an ImageFolder
    (root / "stray.csv").unlink()
    (root / "annotations").mkdir()
    assert detect(path=root) is None  # LabelMe's layout
    (root / "annotations").rmdir()

    flat = tmp_path / "flat"  # a ShiTuRecDataset with a flat images/ folder is no one-class ImageFolder
    write_image(flat / "images" / "a.jpg")
    (flat / "train.txt").write_text("images/a.jpg 0\n")
    (flat / "label.txt").write_text("apple\n")
    assert detect(path=flat) is None
    (flat / "label.txt").unlink()
    assert detect(path=flat) is None


def test_detect_and_convert_through_the_host(imagefolder, tmp_path):
    host = host_with(imagefolder)
    root = make_tree(tmp_path / "fruit")
    assert host.detect_format(root) == "ImageFolder"  # the plugin is newer than the built-ins: asked first
    name, written, notes = convert_dataset(root, host=host)
    assert name == "ImageFolder" and written.counts == {"train": 11, "gallery": 3, "query": 2}
    assert len(notes) == 1
    # Converted, it is a ShiTuRecDataset that still converts as an ImageFolder (label.txt names its folders).
    assert host.detect_format(root, convertible_only=True) == "ImageFolder"
    assert host.dataset_format("imagefolder").validate(root) == []
    write_image(root / "elderberry" / "new.jpg")
    name, written, _ = convert_dataset(root, host=host)
    assert (root / "label.txt").read_text() == "apple\nbanana\ncherry\ndate\nelderberry\n"
    assert sum(written.counts.values()) == 17
    assert (root / "label.txt.bak").read_text() == "apple\nbanana\ncherry\ndate\n"
