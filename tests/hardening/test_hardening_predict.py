"""Broken and hostile images in ``shitu predict`` (see docs/RELIABILITY.md): each input works or is one
``error:`` line on stderr naming it, the good ones still produce their features, and the exit code says that
some failed. The images are those of ``shitu check``'s test (tests/hardening/test_hardening_images.py)."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_hardening_images import CASES, make

from shitu.embed.predict import resolve_inputs

SIZE = 32
GOOD = ["good_a.jpg", "good_b.png"]
# What predict decides differently from check: a folder named .jpg given by name is a folder (without images).
FRAGMENT = {"folder.jpg": "no images in this folder", "loop.jpg": "Too many levels of symbolic links"}
OK = [name for name, (_, expected, _) in CASES.items() if expected == "ok"]
FAILING = [name for name, (_, expected, _) in CASES.items() if expected == "error"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """PP-ShiTuV2_rec at width 0.25 (random weights, seed 0), embedding at 32 px."""
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model("PP-ShiTuV2_rec")
    folder = tmp_path_factory.mktemp("bundle") / "rec"
    arch = {"scale": 0.25}
    model = spec.build(1, seed=0, **arch)
    return save_bundle(folder, spec=spec, model=model, num_classes=1, arch=arch, extra={"input_size": SIZE})


def _stripes(size: tuple[int, int]) -> Image.Image:
    """An image whose features change when it is turned: red left half, blue right half, a green corner."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:, : size[0] // 2] = (220, 20, 20)
    array[:, size[0] // 2 :] = (20, 20, 220)
    array[: size[1] // 4, : size[0] // 4] = (20, 220, 20)
    return Image.fromarray(array)


def _exif_oriented(image: Image.Image, orientation: int) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture
def hostile(tmp_path) -> Path:
    """Every case of CASES, two good images, and one picture three ways: stored sideways with EXIF
    orientation 6, the same pixels without EXIF, and turned upright by hand (all PNG: no JPEG loss)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in CASES:
        make(folder, name)
    Image.new("RGB", (24, 24), (60, 90, 30)).save(folder / GOOD[0])
    _stripes((30, 20)).save(folder / GOOD[1])
    stored = _stripes((40, 24))
    (folder / "exif6.png").write_bytes(_exif_oriented(stored, 6))
    stored.save(folder / "stored.png")
    stored.transpose(Image.Transpose.ROTATE_270).save(folder / "upright.png")  # what orientation 6 shows
    return folder


@pytest.fixture
def pipe_watchdog(hostile):
    """If a reader blocks on the named pipe, open it for writing after 60 s so the test fails instead of
    hanging; the test then asserts this never had to happen."""
    fired = threading.Event()
    done = threading.Event()

    def unblock() -> None:
        if not done.wait(60):
            fired.set()
            os.close(os.open(hostile / "fifo.jpg", os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    yield fired
    done.set()


@pytest.fixture
def bombs_never_decoded(monkeypatch):
    """Pillow's decoding spied on: what it is asked to decode above 10**8 pixels is recorded (and refused)."""
    from PIL import ImageFile

    decoded: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self):
        if self.size[0] * self.size[1] > 10**8:
            decoded.append(self.size)
            raise AssertionError("a decompression bomb was decoded")
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded


def test_hostile_images_each_work_or_are_one_error_and_the_good_ones_are_embedded(
    cli, bundle, hostile, pipe_watchdog, bombs_never_decoded
):
    names = [*FAILING[:3], *GOOD[:1], *OK, *FAILING[3:], *GOOD[1:], "exif6.png", "stored.png", "upright.png"]
    started = time.monotonic()
    result = cli("predict", "--model-dir", bundle, "--json", "-b", "4", *(hostile / name for name in names))
    elapsed = time.monotonic() - started
    assert not pipe_watchdog.is_set(), "predict blocked on a named pipe"
    assert bombs_never_decoded == []
    assert result.code == 1, result.stderr  # some failed

    # every readable input has its feature, in input order: unit length, finite
    embedded = [name for name in names if name not in FAILING]
    rows = result.json_lines()
    assert [Path(row["input_path"]).name for row in rows] == embedded
    features = {Path(row["input_path"]).name: np.asarray(row["feature"], np.float32) for row in rows}
    for name, feature in features.items():
        assert feature.shape == (512,) and np.isfinite(feature).all(), name
        assert np.linalg.norm(feature) == pytest.approx(1.0, abs=1e-4), name

    # every unreadable one is exactly one error line naming it; nothing else goes wrong
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == len(FAILING), errors
    for name in FAILING:
        (line,) = [line for line in errors if str(hostile / name) in line]
        fragment = FRAGMENT.get(name, CASES[name][2])
        if name.startswith("bomb"):
            fragment = "decompression bomb"  # Pillow refuses it from the header when opening
        elif name in ("zero.jpg", "text.jpg"):
            fragment = "not an image file"
        assert fragment in line, (name, line)
    assert f"{len(embedded)} of " in result.stderr or len(embedded) == len(rows)

    # an EXIF-rotated image is embedded as it is shown (upright), not as it is stored
    upright, stored = features["upright.png"], features["stored.png"]
    assert np.abs(features["exif6.png"] - upright).max() < 1e-5
    assert np.abs(upright - stored).max() > 1e-3  # the test can tell the two apart
    assert elapsed < 120


def test_folders_and_lists_of_hostile_files_are_resolved_without_opening_them(hostile, pipe_watchdog):
    """A folder holding the pipe and the link loop, and a list naming them (and a folder, a 300-character
    name): each is one problem naming it (the list's at its line); the regular files are all taken.
    Nothing is opened to find this out."""
    in_folder: list[str] = []
    paths = resolve_inputs(hostile, problems=in_folder)
    names = [Path(path).name for path in paths]
    assert "fifo.jpg" not in names and "loop.jpg" not in names
    assert {"good_a.jpg", "cmyk.jpg", "exif6.png", "zero.jpg"} <= set(names)  # decoding decides about those
    assert len(in_folder) == 2, in_folder
    assert any(str(hostile / "fifo.jpg") in p and "not a regular file" in p for p in in_folder)
    assert any(str(hostile / "loop.jpg") in p and "symbolic links" in p for p in in_folder)

    listing = hostile / "list.txt"
    listing.write_text("fifo.jpg\nloop.jpg\nfolder.jpg\ngood_a.jpg\n" + "x" * 300 + ".jpg\n")
    in_list: list[str] = []
    assert [Path(p).name for p in resolve_inputs(listing, problems=in_list)] == ["good_a.jpg"]
    assert not pipe_watchdog.is_set()
    assert len(in_list) == 4, in_list
    assert f"{listing}:1:" in in_list[0] and "not a regular file" in in_list[0]
    assert f"{listing}:2:" in in_list[1] and "symbolic links" in in_list[1]
    assert str(hostile / "folder.jpg") in in_list[2] and "no images in this folder" in in_list[2]
    assert f"{listing}:5:" in in_list[3] and "too long" in in_list[3]
    assert all("\n" not in p for p in in_list + in_folder)
