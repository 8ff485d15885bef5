"""Reading images and the evaluation / inference preprocessing of PaddleX's recognizers.

Decoding is Pillow's (it honours the decompression-bomb limit, EXIF orientation, and turns CMYK, 16-bit,
palette, alpha and greyscale images into RGB); resizing is OpenCV's ``INTER_LINEAR`` / ``INTER_CUBIC``, the
same library and kernels PaddleX resizes with, so features match PaddleX's to float rounding.

Normalisation is PaddleClas' ``NormalizeImage``: ``(x * float32(1/255) - mean) / std`` in float32. PaddleX 3's
predictor computes the same thing as ``x * (scale/std) + (-mean/std)``, and ``x / 255`` instead of
``x * (1/255)`` differs in the last bit for about half of the 256 byte values: the three agree to ~1e-6, not
bit for bit.

An ``http://`` or ``https://`` string is fetched with :mod:`urllib` (timeout :data:`URL_TIMEOUT` seconds, at
most :data:`MAX_URL_BYTES` bytes) and decoded like a file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shitu.data.images import DEFAULT_MAX_PIXELS
from shitu.errors import ShituError

#: What an image input may be: a path, an http(s) URL, raw encoded bytes, a PIL image or an RGB uint8 array
#: [H, W, 3] (greyscale [H, W] and RGBA [H, W, 4] are accepted too).
ImageInput = Any

#: Seconds to wait for a URL to answer (connect and each read).
URL_TIMEOUT = 15.0
#: The largest download accepted for one image URL.
MAX_URL_BYTES = 64 * 1024 * 1024


def is_url(source: Any) -> bool:
    """Whether ``source`` is an ``http://`` or ``https://`` URL string."""
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


def fetch_url(url: str, *, timeout: float = URL_TIMEOUT, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """The body of ``url``; a one-line ShituError naming the URL if it cannot be fetched in ``timeout`` s."""
    import urllib.error
    import urllib.request

    from shitu import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"shitu/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise ShituError(f"cannot fetch: HTTP {exc.code} {exc.reason}", path=url) from None
    except urllib.error.URLError as exc:
        raise ShituError(f"cannot fetch: {exc.reason}", path=url) from None
    except TimeoutError:
        raise ShituError(f"cannot fetch: no answer within {timeout:g} s", path=url) from None
    except (OSError, ValueError) as exc:
        raise ShituError(f"cannot fetch: {exc}", path=url) from None
    if len(data) > max_bytes:
        raise ShituError(f"cannot fetch: larger than {max_bytes} bytes", path=url)
    return data


def _interpolation(name: str) -> int:
    import cv2

    table = {
        "bilinear": cv2.INTER_LINEAR,
        "bicubic": cv2.INTER_CUBIC,
        "nearest": cv2.INTER_NEAREST,
        "area": cv2.INTER_AREA,
        "lanczos": cv2.INTER_LANCZOS4,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {', '.join(table)}") from None


def pil_to_rgb(image: Any) -> np.ndarray:
    """A PIL image, EXIF-rotated, as an RGB uint8 array [H, W, 3].

    16-bit greyscale is scaled to 8 bits (``round(v * 255 / 65535)``; OpenCV's ``imread`` shifts by 8 bits,
    at most one level apart); 16-bit RGB is reduced by Pillow on opening. Alpha is dropped, not composited
    (as ``cv2.imread(IMREAD_COLOR)`` in PaddleX). Float ("F") images in [0, 1] are scaled by 255.
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image) or image
    if image.mode == "F":
        return _check_array(np.asarray(image, dtype=np.float32))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def read_image(source: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` into an RGB uint8 array [H, W, 3]; a ShituError naming the file if it cannot be.

    Arrays are taken as RGB (not OpenCV's BGR); float arrays with values in [0, 1] are scaled by 255.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return _check_array(source)
    if isinstance(source, Image.Image):
        return pil_to_rgb(source)
    label: Any = None
    if is_url(source):
        label = source
        opener: Any = io.BytesIO(fetch_url(source))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        opener = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        label = Path(source)
        opener = label
    else:
        raise ShituError(f"cannot read an image from a {type(source).__name__}")
    try:
        with Image.open(opener) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ShituError(
                    f"image has {width}x{height} pixels, above the limit of {max_pixels} (decompression bomb?)",
                    path=label,
                )
            image.load()
            return pil_to_rgb(image)
    except ShituError:
        raise
    except FileNotFoundError:
        raise ShituError("image file not found", path=label) from None
    except IsADirectoryError:
        raise ShituError("is a directory, not an image", path=label) from None
    except PermissionError:
        raise ShituError("permission denied", path=label) from None
    except UnidentifiedImageError:
        raise ShituError("not an image file (or an unsupported format)", path=label) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ShituError(f"cannot decode image: {exc}", path=label) from None


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ShituError(f"an image array must be [H, W, 3] RGB, got shape {list(array.shape)}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def resize(image: np.ndarray, size: int | tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """Resize to ``size`` (square, or (width, height)), ignoring the aspect ratio, as PaddleX's ResizeImage."""
    import cv2

    width, height = (size, size) if isinstance(size, int) else size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return cv2.resize(image, (int(width), int(height)), interpolation=_interpolation(interpolation))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(image / 255 - mean) / std`` in float32, HWC (PaddleX's NormalizeImage)."""
    scale = np.float32(1.0 / 255.0)
    mean_ = np.asarray(mean, np.float32)
    std_ = np.asarray(std, np.float32)
    return ((image.astype(np.float32) * scale - mean_) / std_).astype(np.float32, copy=False)


def eval_preprocess(
    image: np.ndarray,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
) -> np.ndarray:
    """The eval / inference transform: resize to size×size, normalise. Returns float32 [size, size, 3]."""
    return normalize(resize(image, size, interpolation), mean, std)
