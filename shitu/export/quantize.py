"""Post-training int8 quantization of an exported ONNX graph, calibrated on the user's own images.

ONNX Runtime's :func:`onnxruntime.quantization.quantize_static` writes a QDQ graph (QuantizeLinear /
DequantizeLinear pairs around each quantized operator; int8 weights per output channel, int8 activations with
ranges measured by MinMax calibration). ONNX Runtime runs it with its int8 kernels, OpenVINO reads the same
file as an int8 model. The calibration images go through shitu's own preprocessing
(:meth:`~shitu.embed.recognizer.Recognizer.preprocess`), so the measured ranges are those of real inputs.

The calibration set is identified by a SHA-256 over the chosen images' bytes (in order), so an exported or
cached int8 graph is redone when the images change. More than :data:`DEFAULT_CALIBRATION_LIMIT` images are
sampled (seeded, so the same inputs choose the same sample).

This module imports neither JAX nor ONNX Runtime at import time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError

#: The most calibration images used; more are sampled down to this many.
DEFAULT_CALIBRATION_LIMIT = 300
#: The seed of that sample.
CALIBRATION_SEED = 0
#: Preprocessed images per calibration batch.
CALIBRATION_BATCH = 16
MISSING_CALIBRATION = (
    "--precision int8 needs calibration images: pass --calibration PATH (images, folders or list files, "
    "e.g. the gallery)"
)


@dataclass(frozen=True)
class CalibrationSet:
    """The images int8 ranges are measured on (paths or URLs, in order) and their content hash."""

    paths: tuple[str, ...]
    sha256: str
    found: int  # how many images the inputs named before sampling

    @property
    def short_hash(self) -> str:
        return self.sha256[:16]

    def describe(self) -> str:
        sampled = f", sampled from {self.found}" if self.found > len(self.paths) else ""
        return f"calibrated on {len(self.paths)} images{sampled}, sha256 {self.short_hash}"

    def to_json(self) -> dict[str, Any]:
        return {"images": len(self.paths), "found": self.found, "sha256": self.sha256}


def _content_hash(paths: Sequence[str]) -> str:
    from shitu.data.inputs import is_url

    digest = hashlib.sha256()
    for path in paths:
        if is_url(path):
            digest.update(b"url:" + path.encode())
            continue
        one = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    one.update(chunk)
        except OSError as exc:
            raise ShituError(f"cannot read calibration image: {exc.strerror or exc}", path=Path(path)) from None
        digest.update(one.digest())
    return digest.hexdigest()


def calibration_set(
    sources: CalibrationSet | str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None,
    *,
    limit: int = DEFAULT_CALIBRATION_LIMIT,
    seed: int = CALIBRATION_SEED,
) -> CalibrationSet:
    """The calibration images ``sources`` name (files, folders, list files, patterns: see
    :func:`shitu.data.inputs.resolve`), at most ``limit`` of them (a seeded sample, kept in input order).
    A ShituError when there are none, or an input is missing or unreadable."""
    from shitu.data.inputs import resolve_inputs

    if isinstance(sources, CalibrationSet):
        return sources
    if sources is None:
        raise ShituError(MISSING_CALIBRATION)
    if limit < 1:
        raise ShituError(f"the calibration image limit must be at least 1, got {limit}")
    paths = resolve_inputs(sources, skipped=[])
    if not paths:
        raise ShituError(MISSING_CALIBRATION)
    found = len(paths)
    if found > limit:
        chosen = np.sort(np.random.default_rng(seed).choice(found, size=limit, replace=False))
        paths = [paths[int(i)] for i in chosen]
    return CalibrationSet(tuple(paths), _content_hash(paths), found)


def preprocessed_batches(recognizer: Any, calibration: CalibrationSet, batch: int | None = None) -> list[np.ndarray]:
    """The calibration images preprocessed by ``recognizer``, in batches of ``batch`` (default
    :data:`CALIBRATION_BATCH`); with a fixed ``batch`` the last one is filled up from the first images."""
    images = np.stack([recognizer.preprocess(path) for path in calibration.paths]).astype(np.float32)
    size = batch or CALIBRATION_BATCH
    batches = [images[i : i + size] for i in range(0, len(images), size)]
    if batch is not None and len(batches[-1]) < batch:  # a fixed-batch graph takes only full batches
        batches[-1] = np.resize(np.concatenate([batches[-1], images]), (batch, *images.shape[1:]))
    return batches


def quantize_onnx(fp32_file: Path, int8_file: Path, batches: Sequence[np.ndarray], *, input_name: str) -> None:
    """Write the int8 QDQ form of the ONNX graph ``fp32_file`` to ``int8_file``, activation ranges measured
    on ``batches`` (preprocessed float32 NHWC)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(({input_name: b} for b in self.remaining), None)

    # The quantizer logs a warning on the root logger suggesting its pre-processing (shape inference and
    # graph optimization), which the export has already done.
    root_log = logging.getLogger()
    level = root_log.level
    root_log.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(fp32_file),
            str(int8_file),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # the quantizer raises many types for graphs it cannot handle
        message = " ".join(str(exc).split())[:300]
        raise ShituError(f"int8 quantization failed: {type(exc).__name__}: {message}") from None
    finally:
        root_log.setLevel(level)
