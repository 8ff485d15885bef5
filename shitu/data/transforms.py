"""Reading images and the evaluation / inference preprocessing of PaddleX's recognizers.

Decoding is Pillow's (it honours the decompression-bomb limit, EXIF orientation, and turns CMYK, 16-bit,
palette, alpha and greyscale images into RGB); resizing is OpenCV's ``INTER_LINEAR`` / ``INTER_CUBIC``, the
same library and kernels PaddleX resizes with, so features match PaddleX's to float rounding.
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

#: What an image input may be: a path, raw encoded bytes, a PIL image or an RGB uint8 array [H, W, 3].
ImageInput = Any


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
    """A PIL image, EXIF-rotated, as an RGB uint8 array [H, W, 3] (16-bit is scaled down, alpha dropped)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def read_image(source: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` into an RGB uint8 array [H, W, 3]; a ShituError naming the file if it cannot be."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return _check_array(source)
    if isinstance(source, Image.Image):
        return pil_to_rgb(source)
    label: Path | None = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        opener: Any = io.BytesIO(bytes(source))
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
