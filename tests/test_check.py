"""shitu check: PaddleX's outputs on real photos, and every kind of problem located by file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import tree_digest, write_image

from shitu.data.check import check_dataset

PADDLEX_FIELDS = ["done_flag", "check_pass", "attributes", "analysis", "dataset_path", "show_type", "dataset_type"]


def test_demo_dataset_passes_and_writes_paddlex_outputs(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("check", "--demo", "--output", out, "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc == json.loads((out / "check_dataset_result.json").read_text())
    for key in PADDLEX_FIELDS:
        assert key in doc
    assert doc["check_pass"] is True and doc["done_flag"] is True
    assert doc["dataset_type"] == "ShiTuRecDataset" and doc["show_type"] == "image"
    attrs = doc["attributes"]
    assert (attrs["train_samples"], attrs["gallery_samples"], attrs["query_samples"]) == (120, 40, 60)
    for split in ("train", "gallery", "query"):
        paths = attrs[f"{split}_sample_paths"]
        assert len(paths) == 10
        for rel in paths:
            assert rel.startswith("check_dataset/demo_img/")
            assert (out / rel).stat().st_size > 1000
    assert doc["analysis"]["histogram"] == "check_dataset/histogram.png"
    assert (out / "check_dataset/histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["analysis"]["num_classes"] == {"train": 20, "gallery": 20, "query": 20}
    assert doc["errors"] == [] and doc["warnings"] == []


def test_demo_samples_have_label_drawn(tmp_path):
    from PIL import Image

    from shitu.data.demo import demo_dataset_path

    result = check_dataset(demo_dataset_path(), output=tmp_path, sample_num=3)
    rel = result.sample_paths["train"][0]
    sample = Image.open(tmp_path / rel).convert("RGB")
    source_entry = next(e for e in result.entries["train"] if Path(e.sample.path).stem == Path(rel).stem)
    original = Image.open(result.root / source_entry.sample.path).convert("RGB")
    assert sample.size == original.size
    red, green, blue = sample.getpixel((4, 4))  # inside the red label box
    assert red > 200 and green < 80 and blue < 80


def test_broken_copy_lists_all_four_problems_and_changes_nothing(cli, demo_copy, tmp_path):
    train = demo_copy / "train.txt"
    lines = train.read_text().splitlines()
    victim = lines[0].split(" ")[0]
    data = (demo_copy / victim).read_bytes()
    (demo_copy / victim).write_bytes(data[: len(data) // 2])  # truncated JPEG
    missing = lines[1].split(" ")[0]
    (demo_copy / missing).unlink()
    lines[2] = lines[2].replace(" ", "\t")  # malformed: no space separator
    lines[3] = "../outside.jpg 3"
    train.write_text("\n".join(lines) + "\n")
    before = tree_digest(demo_copy)

    result = cli("check", demo_copy, "--output", tmp_path / "out")
    assert result.code == 1
    assert tree_digest(demo_copy) == before
    shown = f"{demo_copy}/train.txt"
    assert f"{shown}:1: {victim}: cannot decode: truncated image" in result.stderr
    assert f"{shown}:2: image not found: {missing}" in result.stderr
    assert f"{shown}:3: malformed line" in result.stderr
    assert f"{shown}:4: image path '../outside.jpg' leaves the dataset root" in result.stderr
    doc = json.loads((tmp_path / "out/check_dataset_result.json").read_text())
    assert doc["check_pass"] is False and doc["done_flag"] is False
    assert doc["err_type"] == "CheckFailedError"
    located = {(e["line"], e["code"]) for e in doc["errors"]}
    assert located == {(1, "bad-image"), (2, "missing-image"), (3, "malformed-line"), (4, "path-outside-root")}


def test_json_mode_keeps_stdout_clean_on_failure(cli, tiny_dataset, tmp_path):
    root = tiny_dataset()
    (root / "query.txt").write_text("images/c0/img3.jpg x\n")
    result = cli("check", root, "--output", tmp_path / "o", "--json")
    assert result.code == 1
    doc = result.json()  # the whole of stdout is one JSON document
    assert doc["errors"][0]["code"] == "non-integer-label"
    assert doc["errors"][0]["line"] == 1


def _issues(root: Path, **kwargs):
    result = check_dataset(root, output=None, **kwargs)
    return {(i.severity, i.code, Path(i.file).name, i.line) for i in result.issues}, result


def test_each_kind_of_problem_is_located(tiny_dataset, tmp_path):
    root = tiny_dataset(classes=3, per_class=4)
    outside = write_image(tmp_path / "elsewhere.jpg")
    os.symlink(outside, root / "images/escape.jpg")
    (root / "images/empty.jpg").write_bytes(b"")
    write_image(root / "images/really_png.jpg", fmt="PNG")
    (root / "train.txt").write_text(
        "images/c0/img0.jpg 0\n"
        "images/c0/img0.jpg 0\n"  # 2 duplicate
        "/etc/passwd 1\n"  # 3 absolute
        "images/escape.jpg 1\n"  # 4 symlink out of the root
        "images/empty.jpg 1\n"  # 5 zero bytes
        "images/really_png.jpg 2\n"  # 6 wrong extension (warning)
        "images/c1/img0.jpg 1.5\n"  # 7 non-integer label
        "\n"  # 8 blank line
        "images/c2/img0.jpg 2 \n"  # 9 trailing space
    )
    (root / "query.txt").write_text("images/c0/img3.jpg 0\nimages/c0/img2.jpg 0\nimages/c1/img3.jpg 7\n")
    found, result = _issues(root)
    assert ("warning", "duplicate-line", "train.txt", 2) in found
    assert ("error", "path-outside-root", "train.txt", 3) in found
    assert ("error", "path-outside-root", "train.txt", 4) in found
    assert ("error", "bad-image", "train.txt", 5) in found
    assert ("warning", "image-warning", "train.txt", 6) in found
    assert ("error", "non-integer-label", "train.txt", 7) in found
    assert ("warning", "blank-line", "train.txt", 8) in found
    assert ("error", "malformed-line", "train.txt", 9) in found
    assert ("warning", "query-in-gallery", "query.txt", 2) in found
    assert ("warning", "query-class-not-in-gallery", "query.txt", 3) in found
    assert ("warning", "single-image-class", "train.txt", 1) in found  # class 0 has one valid line
    assert not result.check_pass
    empty = next(i for i in result.issues if i.line == 5)
    assert "empty file (0 bytes)" in empty.message


def test_missing_list_file_is_an_error(tiny_dataset):
    root = tiny_dataset()
    (root / "gallery.txt").unlink()
    found, result = _issues(root)
    assert ("error", "missing-list", "gallery.txt", None) in found
    assert not result.check_pass


def test_decompression_bomb_refused_by_pixel_limit(tiny_dataset):
    root = tiny_dataset()
    write_image(root / "images/c0/img0.jpg", size=(400, 300))
    found, result = _issues(root, max_image_pixels=100_000)
    assert ("error", "bad-image", "train.txt", 1) in found
    message = next(i.message for i in result.errors if i.line == 1 and Path(i.file).name == "train.txt")
    assert "120000 pixels, over the limit of 100000" in message


def test_crlf_bom_and_spaces_in_paths_are_accepted(tiny_dataset):
    root = tiny_dataset()
    write_image(root / "images/with space/ä b.jpg")
    (root / "train.txt").write_bytes(
        b"\xef\xbb\xbfimages/c0/img0.jpg 0\r\nimages/c0/img1.jpg 0\r\nimages/with space/\xc3\xa4 b.jpg 1\r\n"
        b"images/c1/img0.jpg 1\r\n"
    )
    _found, result = _issues(root)
    assert result.check_pass, [str(i) for i in result.errors]
    assert [e.sample.path for e in result.entries["train"]][2] == "images/with space/ä b.jpg"


def test_invalid_utf8_line_is_located(tiny_dataset):
    root = tiny_dataset()
    (root / "gallery.txt").write_bytes(b"images/c0/img2.jpg 0\nimages/\xff.jpg 1\n")
    found, _ = _issues(root)
    assert ("error", "encoding", "gallery.txt", 2) in found


def test_same_basename_samples_do_not_overwrite_each_other(tiny_dataset, tmp_path):
    root = tiny_dataset(classes=2, per_class=4)
    write_image(root / "images/a/same.jpg", color=(255, 255, 0))
    write_image(root / "images/b/same.jpg", color=(0, 0, 255))
    (root / "train.txt").write_text("images/a/same.jpg 0\nimages/b/same.jpg 1\n")
    result = check_dataset(root, output=tmp_path / "o", sample_num=10)
    names = sorted(Path(p).name for p in result.sample_paths["train"])
    assert names == ["same.jpg", "same_1.jpg"]


def test_rerun_replaces_previous_outputs(tiny_dataset, tmp_path):
    root = tiny_dataset()
    out = tmp_path / "o"
    check_dataset(root, output=out)
    stale = out / "check_dataset/demo_img/stale.jpg"
    stale.write_bytes(b"old")
    check_dataset(root, output=out)
    assert not stale.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_not_a_dataset_is_one_line_error(cli, tmp_path):
    result = cli("check", tmp_path / "nope")
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: dataset folder does not exist"]
    assert result.stdout == ""


def test_paddlex_images_folder_root_detection(tiny_dataset, tmp_path):
    root = tiny_dataset()
    nested = tmp_path / "wrapper"
    nested.mkdir()
    root.rename(nested / "inner")
    result = check_dataset(nested, output=None)
    assert result.root == nested / "inner"
    assert result.check_pass


def test_line_numbers_are_printed_verbatim(cli, tiny_dataset, tmp_path):
    root = tiny_dataset()
    lines = [f"images/c0/img{i % 2}.jpg 0" for i in range(99)]
    (root / "train.txt").write_text("\n".join(lines) + "\nbroken\n")
    result = cli("check", root, "--output", tmp_path / "o")
    assert result.code == 1
    assert f"{root}/train.txt:100: malformed line" in result.stderr  # rich would turn ':100:' into an emoji
