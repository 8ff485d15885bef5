"""One input resolver for every command: the same folder gives the same images to ``shitu predict``,
``shitu index add``, ``shitu search`` and ``create_model(...).predict``, and every file left out is named."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shitu.data.inputs import SkippedFileWarning, image_suffixes, resolve, resolve_inputs, sniff_image

SIZE = 32


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Images in formats beyond JPEG/PNG (.pgm, .tif, .webp), a nested one, a PNG without a suffix, a
    broken .jpg, a text file and a hidden image."""
    root = tmp_path_factory.mktemp("mixed")
    _picture(0).convert("L").save(root / "grey.pgm")
    _picture(1).save(root / "scan.tif")
    _picture(2).save(root / "photo.webp")
    (root / "nested" / "deeper").mkdir(parents=True)
    _picture(3).save(root / "nested" / "deeper" / "inner.png")
    _picture(4).save(root / "nested" / "no_suffix", format="PNG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("a text file\n")
    _picture(5).save(root / ".hidden.png")
    return root


IMAGES = ["grey.pgm", "nested/deeper/inner.png", "nested/no_suffix", "photo.webp", "scan.tif"]
SKIPPED = {".hidden.png": "hidden file", "notes.txt": "not an image Pillow can open"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """PP-ShiTuV2_rec at width 0.25 (random weights, seed 0), embedding at 32 px."""
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model("PP-ShiTuV2_rec")
    arch = {"scale": 0.25}
    path = tmp_path_factory.mktemp("bundle") / "rec"
    return save_bundle(path, spec=spec, model=spec.build(1, seed=0, **arch), num_classes=1, arch=arch,
                       extra={"input_size": SIZE})  # fmt: skip


def test_pillow_decides_what_an_image_is(folder):
    assert {".pgm", ".tif", ".tiff", ".webp", ".jpg", ".png", ".bmp"} <= image_suffixes()
    assert ".txt" not in image_suffixes() and ".pdf" not in image_suffixes()
    assert sniff_image(folder / "nested" / "no_suffix") == "PNG"
    assert sniff_image(folder / "notes.txt") is None and sniff_image(folder / "broken.jpg") is None

    resolved = resolve(folder)
    taken = [Path(p).relative_to(folder).as_posix() for p in resolved.paths]
    assert taken == sorted(["broken.jpg", *IMAGES])  # by suffix, decoding decides; else by the header
    assert resolved.problems == []
    assert resolved.skipped == [f"{folder / name}: skipped: {why}" for name, why in sorted(SKIPPED.items())]


def test_globs_and_skipped_files_in_the_api(folder):
    with pytest.warns(SkippedFileWarning, match="notes.txt: skipped"):
        by_glob = resolve_inputs([f"{folder}/*"])  # the nested folder is walked, the text file reported
    assert sorted(by_glob) == sorted(str(folder / p) for p in ["broken.jpg", *IMAGES])
    skipped: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFileWarning)
        assert resolve_inputs(["-"], stdin=io.StringIO(f"{folder}\n"), skipped=skipped) == sorted(by_glob)
    assert len(skipped) == 2


def test_a_folder_gives_the_same_images_to_every_command(cli, folder, bundle, tmp_path):
    from shitu.embed.predict import create_model

    images = {str(folder / name) for name in IMAGES}
    broken = str(folder / "broken.jpg")

    predicted = cli("predict", "--model-dir", bundle, "--json", folder)
    assert predicted.code == 1  # the broken .jpg
    assert {row["input_path"] for row in predicted.json_lines()} == images

    seed = tmp_path / "seed"  # an index to add to and search in: one image, through `index build`
    seed.mkdir()
    _picture(9).save(seed / "g.png")
    (seed / "gallery.txt").write_text("g.png 0\n")
    index = tmp_path / "index"
    built = cli("index", "build", "--model-dir", bundle, "--gallery", seed / "gallery.txt", "--output", index)
    assert built.code == 0, built.stderr

    added = cli("index", "add", "--index", index, "--label", "1", folder, "--json")
    assert added.code == 1
    assert {item["path"] for item in added.json()["added"]} == images
    assert [line for line in added.json()["failures"] if broken in line] == added.json()["failures"]

    searched = cli("search", "--index", index, folder, "-k", "1", "--json")
    assert searched.code == 1
    assert {row["input"] for row in searched.json_lines()} == images

    with pytest.warns(SkippedFileWarning) as caught:
        failed: list = []
        results = list(create_model(bundle).predict(folder, on_failure=failed.append))
    assert {r["input_path"] for r in results} == images and [f.source for f in failed] == [broken]
    assert sorted(str(w.message) for w in caught) == [f"{folder / n}: skipped: {w}" for n, w in sorted(SKIPPED.items())]

    for result in (predicted, added, searched):  # every file left out is named on stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and broken in errors[0], result.stderr
        for name, why in SKIPPED.items():
            assert f"warning: {folder / name}: skipped: {why}" in result.stderr


def test_skipped_and_refused_files_in_a_folder_are_each_named(tmp_path):
    root = tmp_path / "in"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "x.png").write_bytes(b"")
    _picture(0).save(root / "ok.png")
    os.mkfifo(root / "pipe.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    (root / "elsewhere").symlink_to(tmp_path)
    resolved = resolve(root)
    assert resolved.paths == [str(root / "ok.png")]
    assert resolved.skipped == [
        f"{root / '.git'}: skipped: hidden folder",
        f"{root / 'elsewhere'}: skipped: a link to a folder (not followed)",
    ]
    assert [line.split(": ", 1)[0] for line in resolved.problems] == [str(root / "loop.jpg"), str(root / "pipe.jpg")]
    assert "not a regular file" in resolved.problems[1]
    assert resolve(root, urls=False).paths == resolved.paths
    assert resolve(["https://example.invalid/a.jpg"], urls=False).problems == [
        "https://example.invalid/a.jpg: a URL is not accepted here: download the image first"
    ]
