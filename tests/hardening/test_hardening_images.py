"""Broken and hostile images in ``shitu check`` (issue 7): each one either works or is a clear error located
at its list line, and one bad image never stops the others being checked."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hardening_support import never_called
from PIL import Image

from shitu.data.check import check_dataset
from shitu.data.images import inspect_image, inspect_images

GOOD = {"images/good/a.jpg": 0, "images/good/b.png": 1, "images/good/c.jpg": 2}


def _noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1}[mode]
    array = np.random.default_rng(7).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(), mode)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims width × height RGB pixels (30 GB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bomb() -> bytes:
    """A real JPEG with its frame header (SOF0) rewritten to claim 65500 × 65500 pixels."""
    data = bytearray(_encoded(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def gif_bomb() -> bytes:
    data = bytearray(_encoded(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen size
    descriptor = data.index(b"\x2c")
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", 65535, 65535)  # the image's own size
    return bytes(data)


def exif_rotated(orientation: int) -> bytes:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = orientation
    return _encoded(image, "JPEG", exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    return _encoded(Image.fromarray((np.arange(1024, dtype=np.uint16) * 60).reshape(32, 32)), "PNG")


def palette_with_transparency() -> bytes:
    image = Image.new("P", (32, 32))
    image.putpalette([i % 256 for i in range(768)])
    return _encoded(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), (80 * i, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def garbage_exif() -> bytes:
    data = _encoded(Image.new("RGB", (16, 16)), "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 40) + b"Exif\0\0" + bytes(range(40))
    return data[:2] + app1 + data[2:]


# name → (bytes or a maker of the path, expected: "ok" or "error", a fragment of the warning or error)
Maker = bytes | Callable[[Path], None]
CASES: dict[str, tuple[Maker, str, str | None]] = {
    "zero.jpg": (b"", "error", "empty file (0 bytes)"),
    "truncated.jpg": (_encoded(_noise((64, 64)), "JPEG")[:700], "error", "truncated"),
    "truncated.png": (_encoded(_noise((64, 64)), "PNG")[:3000], "error", "truncated"),
    "text.jpg": (b"this is not an image\n" * 10, "error", "not an image Pillow can decode"),
    "png_named.jpg": (_encoded(Image.new("RGB", (16, 16)), "PNG"), "ok", "file is PNG but its extension is .jpg"),
    "no_extension": (_encoded(Image.new("RGB", (16, 16)), "JPEG"), "ok", "its extension is missing"),
    "cmyk.jpg": (_encoded(Image.new("CMYK", (32, 32), (1, 2, 3, 4)), "JPEG"), "ok", None),
    "sixteen_bit.png": (sixteen_bit_png(), "ok", None),
    "palette.png": (palette_with_transparency(), "ok", None),
    "rgba.png": (_encoded(Image.new("RGBA", (32, 32), (1, 2, 3, 4)), "PNG"), "ok", None),
    "grey_alpha.png": (_encoded(Image.new("LA", (32, 32)), "PNG"), "ok", None),
    "grey.jpg": (_encoded(Image.new("L", (32, 32), 5), "JPEG"), "ok", None),
    "bilevel.png": (_encoded(Image.new("1", (32, 32)), "PNG"), "ok", None),
    "float.tif": (_encoded(Image.new("F", (32, 32)), "TIFF"), "ok", None),
    "rotated.jpg": (exif_rotated(6), "ok", None),
    "bad_orientation.jpg": (exif_rotated(99), "ok", None),
    "garbage_exif.jpg": (garbage_exif(), "ok", None),
    "animated.gif": (animated_gif(), "ok", "animated GIF with 3 frames"),
    "one_pixel.png": (_encoded(Image.new("RGB", (1, 1)), "PNG"), "ok", "very small image (1x1)"),
    "bomb.png": (png_bomb(), "error", "over the limit"),
    "bomb.jpg": (jpeg_bomb(), "error", "over the limit"),
    "bomb.gif": (gif_bomb(), "error", "over the limit"),
    "fifo.jpg": (lambda path: os.mkfifo(path), "error", "not a regular file"),
    "folder.jpg": (lambda path: path.mkdir(), "error", "is a folder"),
    "loop.jpg": (lambda path: os.symlink(path.name, path), "error", "loop of symbolic links"),
    "x" * 300 + ".jpg": (b"", "error", "File name too long"),
}


def make(folder: Path, name: str) -> Path:
    path = folder / name
    maker = CASES[name][0]
    if callable(maker):
        maker(path)
    else:
        with contextlib.suppress(OSError):  # a name the filesystem refuses: the list still names it
            path.write_bytes(maker)
    return path


@pytest.fixture
def hostile_dataset(tmp_path: Path) -> Path:
    """Good images, then every case of CASES, one per line of train.txt (line = 4 + index)."""
    root = tmp_path / "hostile"
    (root / "images" / "bad").mkdir(parents=True)
    for relative, label in GOOD.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (60 * label, 90, 30)).save(path)
    for name in CASES:
        make(root / "images" / "bad", name)
    lines = [f"{relative} {label}" for relative, label in GOOD.items()]
    lines += [f"images/bad/{name} {index % 3}" for index, name in enumerate(CASES)]
    (root / "train.txt").write_text("".join(f"{line}\n" for line in lines))
    (root / "gallery.txt").write_text("images/good/a.jpg 0\nimages/good/b.png 1\nimages/good/c.jpg 2\n")
    (root / "query.txt").write_text("images/good/c.jpg 2\n")
    return root


def _line_of(name: str) -> int:
    return len(GOOD) + list(CASES).index(name) + 1


def test_every_hostile_image_is_reported_on_its_line_and_the_good_ones_are_checked(hostile_dataset, tmp_path):
    started = time.monotonic()
    result = check_dataset(hostile_dataset, output=tmp_path / "out", sample_num=100)
    elapsed = time.monotonic() - started
    train = str(hostile_dataset / "train.txt")
    for name, (_, expected, fragment) in CASES.items():
        at_line = [i for i in result.issues if i.file == train and i.line == _line_of(name)]
        errors = [i for i in at_line if i.severity == "error"]
        if expected == "error":
            assert len(errors) == 1, (name, at_line)
            assert fragment in errors[0].message, (name, errors[0].message)
            assert f"images/bad/{name}" in errors[0].message
        else:
            assert errors == [], (name, errors)
            assert f"images/bad/{name}" in result.images, name
            if fragment is not None:
                assert any(fragment in i.message for i in at_line), (name, at_line)
    for relative in GOOD:  # the bad ones never stopped the good ones
        assert relative in result.images
    assert len(result.images) == len(GOOD) + sum(expected == "ok" for _, expected, _ in CASES.values())
    assert elapsed < 60  # nothing decoded the bombs or waited on the pipe
    doc = json.loads((tmp_path / "out" / "check_dataset_result.json").read_text())
    assert doc["check_pass"] is False
    assert len(doc["errors"]) == sum(expected == "error" for _, expected, _ in CASES.values())
    assert len(doc["attributes"]["train_sample_paths"]) == len(GOOD) + sum(e == "ok" for _, e, _ in CASES.values())


def test_the_sample_of_an_exif_rotated_image_is_drawn_upright(hostile_dataset, tmp_path):
    (hostile_dataset / "train.txt").write_text("images/bad/rotated.jpg 0\n")
    result = check_dataset(hostile_dataset, output=tmp_path / "out")
    assert result.images["images/bad/rotated.jpg"].width == 40  # as stored
    with Image.open(tmp_path / "out" / result.sample_paths["train"][0]) as sample:
        assert sample.size == (20, 40)  # as shown: orientation 6 turns it a quarter


def test_cli_check_of_hostile_images_lists_each_problem_without_a_traceback(cli, hostile_dataset, tmp_path):
    result = cli("check", hostile_dataset, "--json", "--output", tmp_path / "out")
    assert result.code == 1
    doc = json.loads(result.stdout)
    errors = {e["line"]: e["message"] for e in doc["errors"] if e["file"].endswith("train.txt")}
    for name, (_, expected, fragment) in CASES.items():
        if expected == "error":
            assert fragment in errors[_line_of(name)]
    lines = result.stderr.splitlines()
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), result.stderr
    assert sum(line.startswith("error: ") for line in lines) == len(doc["errors"])
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["bomb.png", "bomb.jpg", "bomb.gif"])
def test_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch, name):
    from PIL import ImageFile

    path = make(tmp_path, name)
    assert path.stat().st_size < 1000
    monkeypatch.setattr(ImageFile.ImageFile, "load", never_called("the header is over the pixel limit"))
    started = time.monotonic()
    (report,) = inspect_images([path])  # as check runs it: shitu's limit, Pillow's own switched off
    assert time.monotonic() - started < 1
    assert report.error is not None and "over the limit of 89478485" in report.error
    assert report.width * report.height > 89478485
    assert "decompression bomb" in str(inspect_image(path).error)  # alone, Pillow's own limit refuses it


def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    pipe = make(tmp_path, "fifo.jpg")
    reports = []
    worker = threading.Thread(target=lambda: reports.append(inspect_image(pipe)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock the reader before failing, so no thread is left hanging
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("inspect_image blocked on a named pipe")
    assert "not a regular file" in reports[0].error


def test_large_image_within_the_limit_is_decoded(tmp_path):
    path = tmp_path / "large.jpg"
    Image.new("RGB", (8000, 8000), (10, 20, 30)).save(path, quality=50)
    report = inspect_image(path)
    assert report.ok and (report.width, report.height) == (8000, 8000) and report.warnings == ()


def test_a_sample_that_cannot_be_drawn_is_a_warning_not_a_failure(hostile_dataset, tmp_path, monkeypatch):
    """The image changed after it was decoded (or is too large to redraw): the check still completes."""
    import shitu.data.report as report

    real = report.draw_labelled_sample

    def flaky(source: Path, label: str, target: Path) -> None:
        if source.name == "b.png":
            raise OSError("image file is truncated")
        real(source, label, target)

    monkeypatch.setattr(report, "draw_labelled_sample", flaky)
    (hostile_dataset / "train.txt").write_text("".join(f"{r} {label}\n" for r, label in GOOD.items()))
    result = check_dataset(hostile_dataset, output=tmp_path / "out")
    assert result.check_pass
    (warning,) = [i for i in result.issues if i.code == "sample-not-drawn" and i.file.endswith("train.txt")]
    assert warning.line == 2 and "images/good/b.png: no sample picture drawn (OSError" in warning.message
    assert len(result.sample_paths["train"]) == 2
    assert json.loads((tmp_path / "out" / "check_dataset_result.json").read_text())["check_pass"] is True
