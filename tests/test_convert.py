"""shitu convert --from LabelMe: PaddleX's rule (flags → lines, 50/30/20 in order), safely, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tree_digest, write_image

from shitu.data.convert import convert_dataset
from shitu.data.formats import SPLITS, Sample, SplitOptions
from shitu.data.lists import format_lines
from shitu.data.split import split_samples
from shitu.errors import ShituError

LABELS = b"cat\r\ndog\r\nbird\r\n\r\n"  # CRLF and a trailing blank line: must survive untouched

# Written in this (unsorted) order on purpose: the conversion reads them sorted by file name.
ANNOTATIONS = {
    "e.json": {"imagePath": "../images/e.jpg", "flags": {"cat": True}},
    "a.json": {"imagePath": "../images/a.jpg", "flags": {"cat": True, "dog": False}},
    "c.json": {"imagePath": "..\\images\\y.jpg", "flags": {"bird": True}},  # Windows separators
    "b.json": {"imagePath": "b.jpg", "flags": {"dog": True, "bird": True}},  # plain file name, two classes
    "d.json": {"imagePath": "../images/d.jpg", "flags": {"cat": False, "dog": False}},  # no class: skipped
}
# Sorted a, b, c, d, e → 5 lines; train round(2.5) = 2, gallery round(1.5) = 2, query the rest (1).
EXPECTED = {
    "train": "images/a.jpg 0\nimages/b.jpg 1\n",
    "gallery": "images/b.jpg 2\nimages/y.jpg 2\n",
    "query": "images/e.jpg 0\n",
}
SAMPLES = [
    Sample("images/a.jpg", 0),
    Sample("images/b.jpg", 1),
    Sample("images/b.jpg", 2),
    Sample("images/y.jpg", 2),
    Sample("images/e.jpg", 0),
]


def write_annotation(root: Path, name: str, document: object) -> Path:
    path = root / "annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) if not isinstance(document, str) else document)
    return path


@pytest.fixture
def labelme(tmp_path: Path) -> Path:
    root = tmp_path / "labelme"
    for name in ("a", "b", "d", "e", "y"):
        write_image(root / "images" / f"{name}.jpg", size=(8, 8))
    (root / "label.txt").write_bytes(LABELS)
    for name, document in ANNOTATIONS.items():
        write_annotation(root, name, {"version": "5.4.1", "shapes": [], "imageData": None, **document})
    return root


def lists_of(root: Path) -> dict[str, str]:
    return {split: (root / f"{split}.txt").read_text() for split in SPLITS}


def test_convert_follows_paddlex_rule(cli, labelme):
    result = cli("convert", labelme, "--from", "LabelMe")
    assert result.code == 0, result.stderr
    assert lists_of(labelme) == EXPECTED
    assert (labelme / "label.txt").read_bytes() == LABELS  # the class list is the source: never rewritten
    assert not (labelme / "label.txt.bak").exists()
    assert f"warning: {labelme}/annotations/d.json: no flag set, image skipped" in result.stderr
    assert f"Converted {labelme} from LabelMe to ShiTuRecDataset: train 2, gallery 2, query 1" in result.stderr
    assert not [p.name for p in labelme.iterdir() if p.name.startswith(".")]  # no journal or temp file left


def test_existing_lists_are_backed_up_and_rerun_changes_nothing(cli, labelme):
    (labelme / "train.txt").write_bytes(b"old train\r\n")
    (labelme / "gallery.txt").write_bytes(b"images/a.jpg 0\n")
    result = cli("convert", labelme, "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["source_format"] == "LabelMe"
    assert doc["backups"] == [str(labelme / "train.txt.bak"), str(labelme / "gallery.txt.bak")]
    assert doc["counts"] == {"train": 2, "gallery": 2, "query": 1}
    assert doc["notes"] == [f"{labelme}/annotations/d.json: no flag set, image skipped"]
    assert (labelme / "train.txt.bak").read_bytes() == b"old train\r\n"
    assert (labelme / "gallery.txt.bak").read_bytes() == b"images/a.jpg 0\n"
    assert not (labelme / "query.txt.bak").exists()
    assert lists_of(labelme) == EXPECTED

    before = tree_digest(labelme)
    again = cli("convert", labelme)
    assert again.code == 0, again.stderr
    assert tree_digest(labelme) == before
    assert "nothing changed" in again.stderr


@pytest.mark.parametrize("spelling", [None, "LabelMe", "labelme", "LABELME"])
def test_detection_and_case_insensitive_names(cli, labelme, spelling):
    args = [] if spelling is None else ["--from", spelling]
    result = cli("convert", labelme, *args, "--json")
    assert result.code == 0, result.stderr
    assert result.json()["source_format"] == "LabelMe"
    assert lists_of(labelme) == EXPECTED


def test_split_options_use_the_shared_seeded_split(cli, labelme, tmp_path):
    result = cli("convert", labelme, "--train", "40", "--gallery", "40", "--query", "20", "--seed", "5")
    assert result.code == 0, result.stderr
    expected = split_samples(SAMPLES, SplitOptions(40, 40, 20, seed=5))
    for split in SPLITS:
        assert (labelme / f"{split}.txt").read_bytes() == format_lines(expected[split])
    assert (labelme / "label.txt").read_bytes() == LABELS


def test_split_options_must_come_together(cli, labelme):
    before = tree_digest(labelme)
    partial = cli("convert", labelme, "--train", "50", "--gallery", "50")
    assert partial.stderr.splitlines() == ["error: give all three of --train, --gallery and --query, or none"]
    seed_only = cli("convert", labelme, "--seed", "3")
    assert seed_only.stderr.splitlines() == [
        "error: --seed and --by need --train, --gallery and --query (the format's own split has neither)"
    ]
    bad_sum = cli("convert", labelme, "--train", "50", "--gallery", "30", "--query", "30")
    assert bad_sum.stderr.splitlines() == ["error: percentages must sum to 100, got 50 + 30 + 30 = 110"]
    assert {partial.code, seed_only.code, bad_sum.code} == {1}
    assert tree_digest(labelme) == before


def _unknown_label(root: Path) -> tuple[str, str]:
    write_annotation(root, "f.json", {"imagePath": "../images/a.jpg", "flags": {"fish": True}})
    return f"{root}/annotations/f.json", "unknown label 'fish': it is not in label.txt"


def _invalid_json(root: Path) -> tuple[str, str]:
    write_annotation(root, "f.json", '{\n  "imagePath": "../images/a.jpg",\n  "flags": {"cat": true,}\n}\n')
    return f"{root}/annotations/f.json:3", "invalid JSON: Expecting property name enclosed in double quotes"


def _missing_image(root: Path) -> tuple[str, str]:
    write_annotation(root, "f.json", {"imagePath": "../images/gone.jpg", "flags": {"cat": True}})
    return (
        f"{root}/annotations/f.json",
        "image '../images/gone.jpg' not found (looked beside the JSON file and in images/)",
    )


def _missing_label_file(root: Path) -> tuple[str, str]:
    (root / "label.txt").unlink()
    return f"{root}/label.txt", "label.txt is missing (line i must name class i)"


def _string_flag(root: Path) -> tuple[str, str]:
    write_annotation(root, "f.json", {"imagePath": "../images/a.jpg", "flags": {"cat": "false"}})
    return f"{root}/annotations/f.json", "flag 'cat' is 'false', expected true or false"


def _blank_label_line(root: Path) -> tuple[str, str]:
    (root / "label.txt").write_text("cat\n\ndog\nbird\n")
    return f"{root}/label.txt:2", "blank line (every line names one class)"


def _duplicate_label(root: Path) -> tuple[str, str]:
    (root / "label.txt").write_text("cat\ndog\nbird\ncat\n")
    return f"{root}/label.txt:4", "class 'cat' is already on line 1"


def _not_an_object(root: Path) -> tuple[str, str]:
    write_annotation(root, "f.json", "[1, 2]")
    return f"{root}/annotations/f.json", "not a LabelMe annotation (top level is not an object)"


def _image_outside(root: Path) -> tuple[str, str]:
    write_image(root.parent / "outside" / "z.jpg", size=(8, 8))
    write_annotation(root, "f.json", {"imagePath": "../../outside/z.jpg", "flags": {"cat": True}})
    return (
        f"{root}/annotations/f.json",
        "image '../../outside/z.jpg' not found (looked beside the JSON file and in images/)",
    )


BROKEN = {
    "unknown-label": _unknown_label,
    "invalid-json": _invalid_json,
    "missing-image": _missing_image,
    "missing-label-file": _missing_label_file,
    "string-flag": _string_flag,
    "blank-label-line": _blank_label_line,
    "duplicate-label": _duplicate_label,
    "not-an-object": _not_an_object,
    "image-outside": _image_outside,
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("named", [True, False])
def test_each_problem_is_one_located_line_and_changes_nothing(cli, labelme, case, named):
    (labelme / "query.txt").write_text("images/a.jpg 0\n")
    where, message = BROKEN[case](labelme)
    before = tree_digest(labelme)
    args = ["--from", "LabelMe"] if named else []
    result = cli("convert", labelme, *args)
    assert result.code == 1
    assert result.stderr.splitlines() == [f"error: {where}: {message}"]
    assert result.stdout == ""
    assert tree_digest(labelme) == before


def test_several_problems_are_counted(cli, labelme):
    _unknown_label(labelme)
    write_annotation(labelme, "g.json", {"imagePath": "../images/gone.jpg", "flags": {"cat": True}})
    result = cli("convert", labelme)
    assert result.stderr.splitlines() == [
        f"error: {labelme}/annotations/f.json: unknown label 'fish': it is not in label.txt (and 1 more)"
    ]


def test_unknown_format_suggests(cli, labelme):
    before = tree_digest(labelme)
    close = cli("convert", labelme, "--from", "LabelMee")
    assert close.code == 1
    assert close.stderr.splitlines() == ["error: unknown dataset format 'LabelMee' (did you mean 'LabelMe'?)"]
    far = cli("convert", labelme, "--from", "nosuchformat")
    assert far.code == 1
    [line] = far.stderr.splitlines()
    assert line.startswith("error: unknown dataset format 'nosuchformat' (known: ")
    assert "LabelMe" in line and "ShiTuRecDataset" in line
    assert tree_digest(labelme) == before


def test_shiturec_dataset_is_refused(cli, labelme, tiny_dataset):
    before = tree_digest(labelme)
    named = cli("convert", labelme, "--from", "ShiTuRecDataset")
    assert named.code == 1
    assert named.stderr.splitlines() == [
        f"error: {labelme}: ShiTuRecDataset is shitu's own format and needs no conversion "
        "(use 'shitu split' to divide it again)"
    ]
    assert tree_digest(labelme) == before

    native = tiny_dataset()
    before = tree_digest(native)
    detected = cli("convert", native)
    assert detected.code == 1
    assert detected.stderr.splitlines() == [
        f"error: {native}: this folder is already a ShiTuRecDataset: there is nothing to convert "
        "(use 'shitu split' to divide it again)"
    ]
    assert tree_digest(native) == before


def test_unknown_layout_and_missing_folder(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("convert", empty)
    assert result.code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {empty}: cannot tell which format this folder is (name it with --from (")
    assert "LabelMe" in line
    missing = cli("convert", tmp_path / "nope", "--from", "LabelMe")
    assert missing.stderr.splitlines() == [f"error: {tmp_path / 'nope'}: dataset folder does not exist"]


def test_too_few_lines_for_three_lists(cli, tmp_path):
    root = tmp_path / "one"
    write_image(root / "images/a.jpg", size=(8, 8))
    (root / "label.txt").write_text("cat\n")
    write_annotation(root, "a.json", {"imagePath": "../images/a.jpg", "flags": {"cat": True}})
    result = cli("convert", root)
    assert result.code == 1
    assert result.stderr.splitlines() == [
        f"error: {root}: the LabelMe converter produced an empty train list (1 image lines in all are too few)"
    ]
    assert not (root / "train.txt").exists()


def test_hidden_files_and_other_files_in_annotations_are_ignored(cli, labelme):
    (labelme / "annotations" / "._a.json").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (labelme / "annotations" / "notes.txt").write_text("not an annotation")
    (labelme / "annotations" / "sub.json").mkdir()
    result = cli("convert", labelme)
    assert result.code == 0, result.stderr
    assert lists_of(labelme) == EXPECTED


def test_image_in_a_subfolder_and_links_inside_the_root(cli, labelme):
    write_image(labelme / "images/sub/s.jpg", size=(8, 8))
    write_annotation(labelme, "f.json", {"imagePath": "../images/sub/s.jpg", "flags": {"dog": True}})
    (labelme / "images/link.jpg").symlink_to(labelme / "images/a.jpg")
    write_annotation(labelme, "g.json", {"imagePath": "link.jpg", "flags": {"bird": True}})
    assert cli("convert", labelme).code == 0
    lines = [line for split in SPLITS for line in (labelme / f"{split}.txt").read_text().splitlines()]
    assert lines[-2:] == ["images/sub/s.jpg 1", "images/link.jpg 2"]  # the link is listed as written


def test_library_convert(labelme):
    name, written, notes = convert_dataset(labelme)
    assert name == "LabelMe"
    assert written.counts == {"train": 2, "gallery": 2, "query": 1}
    assert written.backups == []
    assert notes == [f"{labelme}/annotations/d.json: no flag set, image skipped"]
    with pytest.raises(ShituError, match="percentages must sum to 100"):
        convert_dataset(labelme, options=SplitOptions(50, 30, 30))


def test_bundled_demo_is_refused(cli, labelme, monkeypatch):
    import shitu.data.demo

    monkeypatch.setattr(shitu.data.demo, "demo_dataset_path", lambda: labelme)
    before = tree_digest(labelme)
    result = cli("convert", labelme)
    assert result.code == 1
    assert "the bundled demo dataset is read-only" in result.stderr
    assert tree_digest(labelme) == before
