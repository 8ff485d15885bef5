"""Decoding to RGB (orientation, colour modes, bit depths, URLs) and PaddleX's eval preprocessing."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from shitu.data.transforms import eval_preprocess, normalize, read_image, resize
from shitu.errors import ShituError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _reference(image: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """PaddleClas' eval transform written out: cv2.resize to size×size, then
    (x * float32(1/255) - mean) / std in float32 (its NormalizeImage)."""
    resized = cv2.resize(image, (size, size), interpolation=interpolation)
    mean = np.array(MEAN, np.float32).reshape(1, 1, 3)
    std = np.array(STD, np.float32).reshape(1, 1, 3)
    return (resized.astype(np.float32) * np.float32(1.0 / 255.0) - mean) / std


@pytest.mark.parametrize("shape", [(37, 53), (200, 150), (48, 48)])
def test_eval_preprocess_equals_cv2_resize_and_normalize_exactly(shape):
    image = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ours = eval_preprocess(image, size=48, mean=MEAN, std=STD)
    assert ours.dtype == np.float32 and ours.shape == (48, 48, 3)
    np.testing.assert_array_equal(ours, _reference(image, 48))
    cubic = eval_preprocess(image, size=48, mean=MEAN, std=STD, interpolation="bicubic")
    np.testing.assert_array_equal(cubic, _reference(image, 48, cv2.INTER_CUBIC))


def test_normalize_agrees_with_paddlex_alpha_beta_form():
    """PaddleX 3 computes x * (scale/std) + (-mean/std): the same up to float rounding (~1e-6)."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    alpha = np.array([(1 / 255) / s for s in STD], np.float32)
    beta = np.array([-m / s for m, s in zip(MEAN, STD, strict=True)], np.float32)
    paddlex = values.astype(np.float32) * alpha + beta
    np.testing.assert_allclose(normalize(values, MEAN, STD), paddlex, rtol=0, atol=2e-6)


def test_resize_keeps_a_right_sized_image_and_takes_width_height():
    image = np.zeros((10, 20, 3), np.uint8)
    assert resize(image, (20, 10)) is image
    assert resize(image, (7, 5)).shape == (5, 7, 3)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path):
    # 20 wide, 10 tall: red left half, blue right half; orientation 6 = shown turned 90° clockwise
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)
    pixels[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif, quality=100)
    decoded = read_image(path)
    assert decoded.shape == (20, 10, 3)  # now tall
    top, bottom = decoded[2, 5].astype(int), decoded[17, 5].astype(int)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    decoded = read_image(path)
    assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8
    np.testing.assert_allclose(decoded[8, 8].astype(int), (255, 0, 0), atol=8)


def test_16_bit_greyscale_and_rgb_are_scaled_to_8_bits(tmp_path):
    grey = np.array([[0, 257 * 100, 65535, 40000]], np.uint16)
    path = _save(Image.fromarray(grey), tmp_path / "grey16.png")
    assert Image.open(path).mode.startswith("I")
    decoded = read_image(path)
    expected = np.rint(grey.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))
    np.testing.assert_allclose(decoded[..., 0].astype(int), cv2.imread(str(path))[..., 0].astype(int), atol=1)

    rgb16 = np.zeros((3, 4, 3), np.uint16)
    rgb16[..., 2] = 65535  # OpenCV writes BGR: red is channel 2
    rgb16[..., 1] = 32768
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), rgb16)
    np.testing.assert_array_equal(read_image(path)[0, 0], (255, 128, 0))


def test_palette_alpha_and_greyscale_decode_to_rgb(tmp_path):
    palette = Image.new("P", (6, 4))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    palette.paste(1, (0, 0, 3, 4))
    decoded = read_image(_save(palette, tmp_path / "palette.png"))
    np.testing.assert_array_equal(decoded[0, 0], (10, 200, 30))
    np.testing.assert_array_equal(decoded[0, 5], (0, 0, 0))

    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent: the colour is kept, alpha dropped (as cv2.imread)
    rgba[0, 0] = (200, 100, 50, 255)
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "alpha.png")
    decoded = read_image(path)
    np.testing.assert_array_equal(decoded, rgba[..., :3])
    np.testing.assert_array_equal(decoded, cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1])

    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    for mode, image in (("L", Image.fromarray(grey)), ("LA", Image.fromarray(grey).convert("LA"))):
        decoded = read_image(_save(image, tmp_path / f"{mode}.png"))
        assert decoded.shape == (4, 5, 3), mode
        np.testing.assert_array_equal(decoded, np.repeat(grey[..., None], 3, axis=2))


def test_arrays_and_pil_images_are_taken_as_rgb():
    grey = np.full((3, 4), 7, np.uint8)
    np.testing.assert_array_equal(read_image(grey), np.full((3, 4, 3), 7, np.uint8))
    unit = np.full((2, 2, 3), 0.5, np.float32)
    np.testing.assert_array_equal(read_image(unit), np.full((2, 2, 3), 128, np.uint8))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 9
    assert read_image(rgba).shape == (2, 2, 3) and read_image(rgba)[0, 0, 0] == 9
    assert read_image(Image.new("L", (5, 2), 3)).shape == (2, 5, 3)
    with pytest.raises(ShituError, match="must be"):
        read_image(np.zeros((2, 2, 2), np.uint8))


def test_unreadable_files_raise_one_line_naming_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    cases = [(tmp_path / "missing.jpg", "not found"), (broken, "not an image"), (tmp_path, "directory")]
    for path, words in cases:
        with pytest.raises(ShituError) as caught:
            read_image(path)
        message = str(caught.value)
        assert str(path) in message and words in message and "\n" not in message


@pytest.fixture
def http_folder(tmp_path):
    """A local HTTP server of tmp_path (no internet needed); yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_urls_are_fetched_and_failures_are_one_line(tmp_path, http_folder):
    pixels = np.random.default_rng(1).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "remote.png")
    np.testing.assert_array_equal(read_image(f"{http_folder}/remote.png"), pixels)
    with pytest.raises(ShituError, match="HTTP 404") as caught:
        read_image(f"{http_folder}/absent.png")
    assert f"{http_folder}/absent.png" in str(caught.value)
    # a port nobody listens on: refused at once, one line naming the URL
    with pytest.raises(ShituError, match="cannot fetch") as caught:
        read_image("http://127.0.0.1:9/x.jpg")
    assert "http://127.0.0.1:9/x.jpg" in str(caught.value) and "\n" not in str(caught.value)
