"""Opening and fully decoding images, in parallel, to find broken ones before training does.

Pillow does the decoding and releases the GIL while it does, so a thread pool uses every core without
the cost of worker processes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shitu.data.lists import file_problem

#: Pillow's own default decompression-bomb limit (about 89 megapixels).
DEFAULT_MAX_PIXELS = 89_478_485
#: Images smaller than this on either side are reported (they can hardly be recognised).
MIN_SIDE = 8

_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "PNG": {".png"},
    "BMP": {".bmp"},
    "GIF": {".gif"},
    "TIFF": {".tif", ".tiff"},
    "WEBP": {".webp"},
}


@dataclass(frozen=True)
class ImageReport:
    """The outcome of decoding one image: its size and format, or the error, plus any warnings."""

    path: Path
    width: int = 0
    height: int = 0
    format: str | None = None
    mode: str | None = None
    error: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def inspect_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageReport:
    """Open and fully decode ``path``; never raises for a bad file (the report carries the error)."""
    from PIL import Image, UnidentifiedImageError

    notes: list[str] = []
    problem = file_problem(path)  # before opening: a named pipe would block, a device would be read
    if problem is not None:
        return ImageReport(path, error=problem)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return ImageReport(
                    path,
                    width,
                    height,
                    image.format,
                    image.mode,
                    error=f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                    "(a possible decompression bomb; raise CheckDataset.max_image_pixels if it is genuine)",
                )
            image.load()
            fmt, mode = image.format, image.mode
            if getattr(image, "n_frames", 1) > 1:
                notes.append(f"animated {fmt} with {image.n_frames} frames: only the first is used")
    except FileNotFoundError:
        return ImageReport(path, error="image file not found")
    except IsADirectoryError:
        return ImageReport(path, error="is a folder, not an image file")
    except PermissionError:
        return ImageReport(path, error="permission denied")
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        reason = "empty file (0 bytes)" if size == 0 else "not an image Pillow can decode"
        return ImageReport(path, error=reason)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageReport(path, error=f"refused as a possible decompression bomb: {exc}")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower():
            message = f"truncated image ({message})"
        return ImageReport(path, error=f"cannot decode: {message}")
    suffix = path.suffix.lower()
    expected = _EXTENSIONS.get(fmt or "")
    if expected is not None and suffix not in expected:
        notes.append(f"file is {fmt} but its extension is {suffix or 'missing'}")
    if min(width, height) < MIN_SIDE:
        notes.append(f"very small image ({width}x{height})")
    return ImageReport(path, width, height, fmt, mode, warnings=tuple(notes))


def inspect_images(
    paths: Sequence[Path],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> list[ImageReport]:
    """Decode every image of ``paths`` in parallel; reports come back in the order of ``paths``.

    ``workers`` 0 means one thread per CPU. ``on_progress(n)`` is called as each image finishes.
    """
    from PIL import Image

    workers = workers or min(32, (os.cpu_count() or 1) + 1)
    previous_limit = Image.MAX_IMAGE_PIXELS
    # inspect_image checks the header's size against our limit before decoding; Pillow's own check
    # (a warning at its limit, an error at twice) would only get in the way of a limit set higher.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                reports = []
                for report in pool.map(lambda p: inspect_image(p, max_pixels), paths):
                    reports.append(report)
                    if on_progress is not None:
                        on_progress(1)
                return reports
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
