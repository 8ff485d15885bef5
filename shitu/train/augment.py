"""Training augmentation operations, re-created on OpenCV and Pillow as PaddleClas' transforms compute them.

Every op takes an RGB uint8 image [H, W, 3] and, when random, a :class:`numpy.random.Generator` that all of its
draws come from (so an image's augmentation is fixed by the generator's seed). A model's train transform
(its recipe's ``train_transform``) composes them and ends with :func:`normalize_hwc`.

RandAugment (PaddleClas' TimmAutoAugment ``rand-…`` policies) is timm's ``auto_augment.py`` as PaddleClas
copies it (the same ops and magnitude mappings as current timm): each image gets ``n`` ops (default 2) drawn
uniformly *with* replacement from the policy's 15 ops; each op runs with probability 0.5 at magnitude
``N(m, mstd)`` limited to [0, 10]; signed ops (rotate, shear, translate, enhance) negate their argument with
probability 0.5. The ops are Pillow's ``ImageOps`` / ``ImageEnhance`` / ``Image.transform`` — the library
timm uses, so results match timm's ops on the same parameters (re-implemented here: timm is not a
dependency, and its ops draw from Python's global ``random``).

The draws happen in a fixed order per image, so a given generator state always yields the same output;
the order is ours (it does not reproduce Paddle's global-RNG streams, which no one can replay anyway).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from shitu.data.transforms import resize

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_MAX_LEVEL = 10.0


# -- geometric ops ----------------------------------------------------------------------------------


def random_hflip(image: np.ndarray, rng: np.random.Generator, prob: float = 0.5) -> np.ndarray:
    """Mirror left-right with probability ``prob`` (RandFlipImage, flip_code 1)."""
    import cv2

    if rng.random() < prob:
        return cv2.flip(image, 1)  # 30× faster than a reversed numpy view made contiguous
    return image


def pad_constant(image: np.ndarray, pad: int, value: int = 0) -> np.ndarray:
    """``pad`` pixels of ``value`` on every side (Pad with backend cv2, padding_mode constant)."""
    import cv2

    if pad <= 0:
        return image
    return cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(value, value, value))


def rand_crop_v2(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """PaddleClas' RandCropImageV2: a ``size``×``size`` window at a random offset, no resize.

    The offsets come from ``randint(0, H - size + 1)`` with the upper end *included* (PaddleClas' quirk), so
    the last offset leaves only ``size - 1`` rows (or columns) inside the image: the crop is then 1 px short.
    """
    height, width = image.shape[:2]
    if height + 1 < size or width + 1 < size:
        raise ValueError(f"crop size {size} is larger than the image ({height}x{width})")
    if height == size and width == size:
        return image
    top = int(rng.integers(0, height - size + 2))
    left = int(rng.integers(0, width - size + 2))
    return image[top : top + size, left : left + size]


def rand_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    interpolation: str = "bilinear",
) -> np.ndarray:
    """PaddleClas' RandCropImage: a random area fraction in ``scale`` with aspect ratio in ``ratio`` (drawn
    uniformly, not log-uniformly), clamped so that it fits, one try (no retries, unlike torchvision), then a
    resize to ``size``×``size`` (cv2)."""
    height, width = image.shape[:2]
    aspect = float(rng.uniform(ratio[0], ratio[1]))
    bound = min((width / height) / aspect, (height / width) * aspect)
    scale_max = min(scale[1], bound)
    scale_min = min(scale[0], bound)
    target_area = width * height * float(rng.uniform(scale_min, scale_max))
    crop_w = max(1, min(width, int(math.sqrt(target_area * aspect))))
    crop_h = max(1, min(height, int(math.sqrt(target_area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return resize(image[top : top + crop_h, left : left + crop_w], size, interpolation)


def _pil_resample(name: str) -> Any:
    from PIL import Image

    table = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {', '.join(table)}") from None


def rotate(
    image: np.ndarray, angle: float, interpolation: str = "bilinear", fill: int = 0, *, backend: str = "cv2"
) -> np.ndarray:
    """Rotate ``angle`` degrees counter-clockwise about the image centre, same size, corners filled with
    ``fill``: the semantics of ``paddle.vision.transforms.functional.rotate`` (Pillow's ``Image.rotate`` with
    expand False, centre (W/2, H/2) in pixel-corner coordinates).

    ``backend="cv2"`` (default) computes it with ``cv2.warpAffine`` about ((W-1)/2, (H-1)/2) in pixel-index
    coordinates (the same point), 2.5–3× faster than Pillow here; the interpolation kernels differ slightly
    (OpenCV's bilinear uses 1/32-px fixed-point weights, its bicubic a = -0.75 against Pillow's -0.5), by
    about one grey level on average (tests/test_train_data.py). ``backend="pil"`` is Paddle's exact call.
    """
    if backend == "pil":
        from PIL import Image

        rotated = Image.fromarray(np.ascontiguousarray(image)).rotate(
            angle, resample=_pil_resample(interpolation), expand=False, fillcolor=(fill, fill, fill)
        )
        return np.asarray(rotated)
    if backend != "cv2":
        raise ValueError(f"unknown rotation backend {backend!r}; choose cv2 or pil")
    import cv2

    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), float(angle), 1.0)
    return cv2.warpAffine(
        image,
        matrix,
        (width, height),
        flags=_interpolation_cv2(interpolation),
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill, fill, fill),
    )


def _interpolation_cv2(name: str) -> int:
    import cv2

    table = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {', '.join(table)}") from None


def random_rotation(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float,
    degrees: float = 90.0,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """With probability ``prob``, :func:`rotate` by an angle drawn from U(-degrees, degrees) (PaddleClas'
    RandomRotation around ``paddle.vision``'s)."""
    if rng.random() < prob:
        return rotate(image, float(rng.uniform(-degrees, degrees)), interpolation)
    return image


# -- RandAugment (TimmAutoAugment "rand-…") ------------------------------------------------------------


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed timm RandAugment string such as ``rand-m7-mstd0.5-inc1``."""

    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    prob: float = 0.5

    @property
    def op_names(self) -> tuple[str, ...]:
        return _INCREASING_OPS if self.increasing else _PLAIN_OPS


@lru_cache(maxsize=16)
def parse_rand_augment(config_str: str) -> RandAugmentConfig:
    """Parse timm's RandAugment config string: ``rand`` then dash-separated ``m<int>`` (magnitude),
    ``n<int>`` (ops per image), ``mstd<float>`` (magnitude noise), ``inc<0|1>`` (increasing ops).
    Weighted op choice (``w``) is not supported."""
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ValueError(f"not a RandAugment policy: {config_str!r} (expected 'rand-…')")
    values: dict[str, Any] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if match is None:
            continue
        key, value = match.groups()
        if key == "m":
            values["magnitude"] = float(int(value))
        elif key == "n":
            values["num_ops"] = int(value)
        elif key == "mstd":
            values["magnitude_std"] = float(value)
        elif key == "inc":
            values["increasing"] = bool(int(value))
        else:
            raise ValueError(f"unsupported RandAugment section {part!r} in {config_str!r}")
    return RandAugmentConfig(**values)


def _negate(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


# Level → argument mappings (timm's, for magnitude level in [0, 10]).
def _rotate_arg(level: float, rng: np.random.Generator) -> float:
    return _negate(level / _MAX_LEVEL * 30.0, rng)


def _enhance_arg(level: float, rng: np.random.Generator) -> float:
    return level / _MAX_LEVEL * 1.8 + 0.1


def _enhance_increasing_arg(level: float, rng: np.random.Generator) -> float:
    return max(0.1, 1.0 + _negate(level / _MAX_LEVEL * 0.9, rng))


def _shear_arg(level: float, rng: np.random.Generator) -> float:
    return _negate(level / _MAX_LEVEL * 0.3, rng)


def _translate_rel_arg(level: float, rng: np.random.Generator) -> float:
    return _negate(level / _MAX_LEVEL * 0.45, rng)


def _posterize_arg(level: float, rng: np.random.Generator) -> int:
    return int(level / _MAX_LEVEL * 4)


def _posterize_increasing_arg(level: float, rng: np.random.Generator) -> int:
    return 4 - int(level / _MAX_LEVEL * 4)


def _solarize_arg(level: float, rng: np.random.Generator) -> int:
    return int(level / _MAX_LEVEL * 256)


def _solarize_increasing_arg(level: float, rng: np.random.Generator) -> int:
    return 256 - int(level / _MAX_LEVEL * 256)


def _solarize_add_arg(level: float, rng: np.random.Generator) -> int:
    return int(level / _MAX_LEVEL * 110)


def _affine(img: Any, matrix: tuple[float, ...], ctx: _OpContext) -> Any:
    from PIL import Image

    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=ctx.resample, fillcolor=ctx.fill)


@dataclass(frozen=True)
class _OpContext:
    resample: Any
    fill: tuple[int, int, int]


def _op_auto_contrast(img: Any, arg: Any, ctx: _OpContext) -> Any:
    from PIL import ImageOps

    return ImageOps.autocontrast(img)


def _op_equalize(img: Any, arg: Any, ctx: _OpContext) -> Any:
    from PIL import ImageOps

    return ImageOps.equalize(img)


def _op_invert(img: Any, arg: Any, ctx: _OpContext) -> Any:
    from PIL import ImageOps

    return ImageOps.invert(img)


def _op_rotate(img: Any, degrees: float, ctx: _OpContext) -> Any:
    return img.rotate(degrees, resample=ctx.resample, fillcolor=ctx.fill)


def _op_posterize(img: Any, bits: int, ctx: _OpContext) -> Any:
    from PIL import ImageOps

    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _op_solarize(img: Any, threshold: int, ctx: _OpContext) -> Any:
    from PIL import ImageOps

    return ImageOps.solarize(img, threshold)


def _op_solarize_add(img: Any, add: int, ctx: _OpContext) -> Any:
    # timm: add ``add`` (saturating at 255) to every value below 128; one lookup table per band.
    values = np.arange(256)
    table = np.where(values < 128, np.minimum(255, values + add), values).tolist()
    return img.point(table * len(img.getbands()))


def _enhancer(name: str) -> Callable[[Any, float, _OpContext], Any]:
    def apply(img: Any, factor: float, ctx: _OpContext) -> Any:
        from PIL import ImageEnhance

        return getattr(ImageEnhance, name)(img).enhance(factor)

    apply.__name__ = f"_op_{name.lower()}"
    return apply


def _op_shear_x(img: Any, factor: float, ctx: _OpContext) -> Any:
    return _affine(img, (1, factor, 0, 0, 1, 0), ctx)


def _op_shear_y(img: Any, factor: float, ctx: _OpContext) -> Any:
    return _affine(img, (1, 0, 0, factor, 1, 0), ctx)


def _op_translate_x_rel(img: Any, pct: float, ctx: _OpContext) -> Any:
    return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), ctx)


def _op_translate_y_rel(img: Any, pct: float, ctx: _OpContext) -> Any:
    return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), ctx)


_OpFn = Callable[[Any, Any, _OpContext], Any]
_ArgFn = Callable[[float, np.random.Generator], Any]

#: name → (op, level-to-argument mapping or None for ops without a magnitude).
_OPS: dict[str, tuple[_OpFn, _ArgFn | None]] = {
    "AutoContrast": (_op_auto_contrast, None),
    "Equalize": (_op_equalize, None),
    "Invert": (_op_invert, None),
    "Rotate": (_op_rotate, _rotate_arg),
    "Posterize": (_op_posterize, _posterize_arg),
    "PosterizeIncreasing": (_op_posterize, _posterize_increasing_arg),
    "Solarize": (_op_solarize, _solarize_arg),
    "SolarizeIncreasing": (_op_solarize, _solarize_increasing_arg),
    "SolarizeAdd": (_op_solarize_add, _solarize_add_arg),
    "Color": (_enhancer("Color"), _enhance_arg),
    "ColorIncreasing": (_enhancer("Color"), _enhance_increasing_arg),
    "Contrast": (_enhancer("Contrast"), _enhance_arg),
    "ContrastIncreasing": (_enhancer("Contrast"), _enhance_increasing_arg),
    "Brightness": (_enhancer("Brightness"), _enhance_arg),
    "BrightnessIncreasing": (_enhancer("Brightness"), _enhance_increasing_arg),
    "Sharpness": (_enhancer("Sharpness"), _enhance_arg),
    "SharpnessIncreasing": (_enhancer("Sharpness"), _enhance_increasing_arg),
    "ShearX": (_op_shear_x, _shear_arg),
    "ShearY": (_op_shear_y, _shear_arg),
    "TranslateXRel": (_op_translate_x_rel, _translate_rel_arg),
    "TranslateYRel": (_op_translate_y_rel, _translate_rel_arg),
}

_PLAIN_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def apply_rand_augment_op(image: Any, name: str, magnitude: float, rng: np.random.Generator, ctx: _OpContext) -> Any:
    """One RandAugment op at ``magnitude`` (level in [0, 10]) on a PIL image (sign draws from ``rng``)."""
    op, to_arg = _OPS[name]
    return op(image, to_arg(magnitude, rng) if to_arg is not None else None, ctx)


def rand_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    config: RandAugmentConfig,
    *,
    interpolation: str = "bicubic",
    fill: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """timm's RandAugment on an RGB uint8 array: ``config.num_ops`` ops drawn uniformly with replacement,
    each applied with probability ``config.prob`` at magnitude ``N(m, mstd)`` limited to [0, 10]."""
    from PIL import Image

    if fill is None:
        fill = tuple(min(255, round(255 * x)) for x in _IMAGENET_MEAN)  # type: ignore[assignment]
    ctx = _OpContext(resample=_pil_resample(interpolation), fill=fill)  # type: ignore[arg-type]
    names = config.op_names
    chosen = rng.integers(0, len(names), size=config.num_ops)
    img = Image.fromarray(np.ascontiguousarray(image))
    for index in chosen:
        if config.prob < 1.0 and rng.random() > config.prob:
            continue
        magnitude = config.magnitude
        if config.magnitude_std > 0:
            magnitude = float(rng.normal(magnitude, config.magnitude_std))
        magnitude = min(_MAX_LEVEL, max(0.0, magnitude))
        img = apply_rand_augment_op(img, names[int(index)], magnitude, rng, ctx)
    return np.asarray(img)


# -- normalisation ------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _full_mean_std(
    height: int, width: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    full = (height, width, 3)
    return (
        np.broadcast_to(np.asarray(mean, np.float32), full).copy(),
        np.broadcast_to(np.asarray(std, np.float32), full).copy(),
    )


def normalize_hwc(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(image * float32(1/255) - mean) / std`` in float32 HWC, bit for bit what
    :func:`shitu.data.transforms.normalize` computes, about 5× faster: numpy broadcasting over a last axis
    of length 3 runs a 3-element inner loop, so the mean and std are expanded to the image's shape once."""
    full_mean, full_std = _full_mean_std(image.shape[0], image.shape[1], tuple(mean), tuple(std))
    out = image.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    out -= full_mean
    out /= full_std
    return out
