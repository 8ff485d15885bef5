"""Paths (issue 7): ``..``, absolute paths, links leaving the dataset, spaces and non-ASCII names, duplicate
names. No file outside the dataset (or the output folder) is ever opened as data or written: every file
opened or written in-process is recorded through ``sys.addaudithook`` and a sentinel outside is watched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import tree_digest, write_image
from hardening_support import FileAccess, assert_located, watch_files

from shitu.data.check import check_dataset
from shitu.data.convert import convert_dataset
from shitu.data.formats import SPLITS, SplitOptions
from shitu.data.split import split_dataset
from shitu.errors import ShituError
from shitu.fileio import JOURNAL_NAME, recover


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files outside every dataset: a valid image (the sentinel), a folder of images, a list, a label.txt and
    a LabelMe annotation, each of which a hostile dataset tries to make shitu read."""
    folder = tmp_path / "outside"
    write_image(folder / "sentinel.jpg")
    write_image(folder / "dir" / "x.jpg")
    (folder / "list.txt").write_text("images/a.jpg 0\n")
    (folder / "label.txt").write_text("cat\ndog\n")
    (folder / "ann.json").write_text(json.dumps({"imagePath": "a.jpg", "flags": {"cat": True}}))
    (folder / "journal.json").write_text(json.dumps({"rename": {".train.txt.x.new": "train.txt"}}))
    return folder


def assert_untouched(access: FileAccess, outside: Path, before: dict[str, str], *allowed: Path) -> None:
    assert access.read_under(outside) == [], "a file outside the dataset was opened"
    assert access.writes_outside(*allowed) == [], "something was written outside the dataset and output"
    assert tree_digest(outside) == before


def _ignore_caches(access: FileAccess) -> None:
    """Python bytecode and matplotlib's font cache are written by the interpreter, not as data."""
    access.writes[:] = [(e, p) for e, p in access.writes if "__pycache__" not in p.parts and "matplotlib" not in str(p)]


# -- check: a ShiTuRecDataset whose lists try every way out ------------------------------------------------

TRAIN_LINES = [
    ("images/a.jpg 0", None),
    ("../outside/sentinel.jpg 0", "leaves the dataset root through '..'"),
    ("{sentinel} 0", "absolute image path"),
    ("images/link.jpg 0", "resolves outside the dataset root"),
    ("images/linkdir/x.jpg 0", "resolves outside the dataset root"),
    ("images/../../outside/sentinel.jpg 0", "leaves the dataset root through '..'"),
    ("..\\outside\\sentinel.jpg 0", "leaves the dataset root through '..'"),
    ("images/relative_link.jpg 0", "resolves outside the dataset root"),
    ("images/a b/ü 名 x.jpg 1", None),
    ("images/x/dup.jpg 1", None),
    ("images/y/dup.jpg 2", None),
    ("./images/../images/a.jpg 0", "leaves the dataset root through '..'"),
    ("~/sentinel.jpg 0", "image not found"),
    ("images/hop.jpg 2", "resolves outside the dataset root"),  # a link to a link out
]


@pytest.fixture
def escaping_dataset(tmp_path: Path, outside: Path) -> Path:
    root = tmp_path / "ds"
    for relative in ("images/a.jpg", "images/a b/ü 名 x.jpg", "images/x/dup.jpg", "images/y/dup.jpg"):
        write_image(root / relative, color=(len(relative) * 9 % 256, 50, 50))
    os.symlink(outside / "sentinel.jpg", root / "images" / "link.jpg")
    os.symlink(outside / "dir", root / "images" / "linkdir")
    os.symlink("../../outside/sentinel.jpg", root / "images" / "relative_link.jpg")
    os.symlink("link.jpg", root / "images" / "hop.jpg")
    lines = [text.replace("{sentinel}", str(outside / "sentinel.jpg")) for text, _ in TRAIN_LINES]
    (root / "train.txt").write_text("".join(f"{line}\n" for line in lines))
    os.symlink(outside / "list.txt", root / "gallery.txt")  # a list file that is a link out
    (root / "query.txt").write_text("images/a.jpg 0\nimages/x/dup.jpg 1\n")
    return root


def test_check_never_opens_a_file_outside_the_dataset(escaping_dataset, outside, tmp_path):
    before = tree_digest(outside)
    dataset_before = tree_digest(escaping_dataset)
    out = tmp_path / "out"
    with watch_files() as access:
        result = check_dataset(escaping_dataset, output=out, sample_num=20)
    _ignore_caches(access)
    assert_untouched(access, outside, before, out)
    assert tree_digest(escaping_dataset) == dataset_before  # check never writes into the dataset
    train = str(escaping_dataset / "train.txt")
    for number, (_, problem) in enumerate(TRAIN_LINES, start=1):
        errors = [i for i in result.errors if i.file == train and i.line == number]
        if problem is None:
            assert errors == [], (number, errors)
        else:
            assert len(errors) == 1 and problem in errors[0].message, (number, errors)
    (gallery,) = [i for i in result.errors if i.file.endswith("gallery.txt")]
    assert gallery.code == "path-outside-root" and "list file 'gallery.txt' resolves outside" in gallery.message
    assert set(result.images) == {"images/a.jpg", "images/a b/ü 名 x.jpg", "images/x/dup.jpg", "images/y/dup.jpg"}
    pictures = sorted(Path(p).name for p in result.sample_paths["train"])
    assert pictures == ["a.jpg", "dup.jpg", "dup_1.jpg", "ü 名 x.jpg"]  # same names never overwrite each other
    opened = {p.resolve() for p in access.reads}
    assert (escaping_dataset / "images" / "a b" / "ü 名 x.jpg").resolve() in opened


def test_cli_check_reports_the_escapes_and_opens_nothing_outside(cli, escaping_dataset, outside, tmp_path):
    before = tree_digest(outside)
    with watch_files() as access:
        result = cli("check", escaping_dataset, "--output", tmp_path / "out", "--json")
    _ignore_caches(access)
    assert result.code == 1
    assert_untouched(access, outside, before, tmp_path / "out")
    assert "Traceback" not in result.stderr
    lines = [f"{escaping_dataset}/train.txt:{n}:" for n, (_, problem) in enumerate(TRAIN_LINES, 1) if problem]
    for located in lines:
        assert located in result.stderr


# -- split and convert: refuse before anything outside is read or anything is written ----------------------


def _dataset(root: Path) -> Path:
    for c in range(3):
        for i in range(3):
            write_image(root / f"images/c{c}/{i}.jpg", size=(8, 8))
    lines = [f"images/c{c}/{i}.jpg {c}" for c in range(3) for i in range(3)]
    (root / "train.txt").write_text("".join(f"{line}\n" for line in lines[:5]))
    (root / "gallery.txt").write_text("".join(f"{line}\n" for line in lines[5:7]))
    (root / "query.txt").write_text("".join(f"{line}\n" for line in lines[7:]))
    return root


def _link_gallery(root: Path, outside: Path) -> str:
    (root / "gallery.txt").unlink()
    os.symlink(outside / "list.txt", root / "gallery.txt")
    return "list file 'gallery.txt' resolves outside the dataset root"


def _escaping_line(root: Path, outside: Path) -> str:
    (root / "query.txt").write_text(f"{outside / 'sentinel.jpg'} 0\n")
    return "absolute image path"


def _dotdot_line(root: Path, outside: Path) -> str:
    (root / "query.txt").write_text("images/../../outside/sentinel.jpg 0\n")
    return "leaves the dataset root through '..'"


SPLIT_CASES = {"linked-list": _link_gallery, "absolute-line": _escaping_line, "dotdot-line": _dotdot_line}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_split_refuses_escapes_before_reading_or_writing(tmp_path, outside, case):
    root = _dataset(tmp_path / "ds")
    message = SPLIT_CASES[case](root, outside)
    before, dataset_before = tree_digest(outside), tree_digest(root)
    with watch_files() as access, pytest.raises(ShituError) as info:
        split_dataset(root, SplitOptions(50, 25, 25))
    assert message in str(info.value)
    assert_located(info.value)
    assert_untouched(access, outside, before)
    assert tree_digest(root) == dataset_before


def test_backup_and_journal_links_out_are_never_followed(tmp_path, outside):
    """A dataset holding ``train.txt.bak`` and a journal that are links out: split neither reads nor replaces
    what they point to, and keeps the old lists under a new backup name."""
    root = _dataset(tmp_path / "ds")
    old = (root / "train.txt").read_bytes()
    (outside / "list.txt").write_bytes(old)  # same content: a followed link would count as the backup
    os.symlink(outside / "list.txt", root / "train.txt.bak")
    os.symlink(outside / "journal.json", root / JOURNAL_NAME)
    before = tree_digest(outside)
    with watch_files() as access:
        written = split_dataset(root, SplitOptions(50, 25, 25, seed=3))
    assert_untouched(access, outside, before, root)
    assert (root / "train.txt.bak").is_symlink()
    assert (root / "train.txt.bak.1").read_bytes() == old
    assert root / "train.txt.bak.1" in written.backups
    assert not (root / JOURNAL_NAME).exists()


def test_spaces_non_ascii_and_duplicate_names_split_and_read_back(tmp_path):
    root = tmp_path / "ds"
    names = ["images/a b/ü 名.jpg", "images/x/dup.jpg", "images/y/dup.jpg", "images/  lead.jpg", "images/Ω.jpg"]
    for name in names:
        write_image(root / name, size=(8, 8))
    lines = [f"{name} {i % 2}" for i, name in enumerate(names)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    split_dataset(root, SplitOptions(40, 40, 20, seed=1))
    result = check_dataset(root, output=None)
    assert not result.errors
    listed = sorted(e.sample.path for split in SPLITS for e in result.entries[split])
    assert listed == sorted(names)


# LabelMe: each case plants one escape in an otherwise valid folder; convert refuses it.
def _labelme(root: Path) -> Path:
    for name in ("a", "b", "c", "d"):
        write_image(root / "images" / f"{name}.jpg", size=(8, 8))
    (root / "label.txt").write_text("cat\ndog\n")
    (root / "annotations").mkdir()
    for name, flag in (("a", "cat"), ("b", "dog"), ("c", "cat"), ("d", "dog")):
        (root / "annotations" / f"{name}.json").write_text(
            json.dumps({"imagePath": f"../images/{name}.jpg", "flags": {flag: True}})
        )
    return root


def _annotate(root: Path, image_path: str) -> None:
    (root / "annotations" / "z.json").write_text(json.dumps({"imagePath": image_path, "flags": {"dog": True}}))


LABELME_CASES = {
    "dotdot-image": lambda root, out: _annotate(root, "../../outside/sentinel.jpg"),
    "absolute-image": lambda root, out: _annotate(root, str(out / "sentinel.jpg")),
    "linked-image": lambda root, out: (
        os.symlink(out / "sentinel.jpg", root / "images" / "z.jpg"),
        _annotate(root, "../images/z.jpg"),
    ),
    "linked-image-folder": lambda root, out: (
        os.symlink(out / "dir", root / "images" / "sub"),
        _annotate(root, "../images/sub/x.jpg"),
    ),
    "linked-annotation": lambda root, out: os.symlink(out / "ann.json", root / "annotations" / "z.json"),
    "linked-label-file": lambda root, out: (
        (root / "label.txt").unlink(),
        os.symlink(out / "label.txt", root / "label.txt"),
    ),
    "linked-list-to-replace": lambda root, out: os.symlink(out / "list.txt", root / "train.txt"),
}
LABELME_MESSAGES = {
    "dotdot-image": "not found",
    "absolute-image": "not found",
    "linked-image": "not found",
    "linked-image-folder": "not found",
    "linked-annotation": "resolves outside the dataset root",
    "linked-label-file": "resolves outside the dataset root",
    "linked-list-to-replace": "train.txt is a symbolic link out of the dataset",
}


@pytest.mark.parametrize("case", sorted(LABELME_CASES))
def test_convert_refuses_every_escape_and_writes_nothing(tmp_path, outside, case):
    root = _labelme(tmp_path / "labelme")
    LABELME_CASES[case](root, outside)
    before, dataset_before = tree_digest(outside), tree_digest(root)
    with watch_files() as access, pytest.raises(ShituError) as info:
        convert_dataset(root, source_format="LabelMe")
    assert LABELME_MESSAGES[case] in str(info.value)
    assert_located(info.value)
    assert Path(info.value.path).is_relative_to(root)
    assert_untouched(access, outside, before)
    assert tree_digest(root) == dataset_before
    assert not recover(root)


def test_convert_with_spaces_and_non_ascii_names_writes_only_inside(tmp_path, outside):
    root = _labelme(tmp_path / "labelme")
    write_image(root / "images" / "ü 名 b.jpg", size=(8, 8))
    _annotate(root, "../images/ü 名 b.jpg")
    before = tree_digest(outside)
    with watch_files() as access:
        _, written, _ = convert_dataset(root, source_format="LabelMe")
    assert_untouched(access, outside, before, root)
    assert sum(written.counts.values()) == 5
    lists = "".join((root / f"{split}.txt").read_text(encoding="utf-8") for split in SPLITS)
    assert "images/ü 名 b.jpg 1\n" in lists


def test_the_watch_sees_reads_and_writes(tmp_path, outside):
    """The audit hook behind these tests records what Pillow opens and what shitu's atomic writes touch."""
    from PIL import Image

    from shitu.fileio import atomic_write_text

    with watch_files() as access:
        with Image.open(outside / "sentinel.jpg") as image:
            image.load()
        atomic_write_text(tmp_path / "written.txt", "x")
    assert access.read_under(outside) == [outside / "sentinel.jpg"]
    assert ("os.rename", tmp_path / "written.txt") in access.writes
    assert access.writes_outside(tmp_path) == []
    assert access.writes_outside(outside) != []
