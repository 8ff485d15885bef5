"""Exporting a recognizer (ONNX, StableHLO) and running its forward pass on another backend.

- :func:`export_model` / :func:`shitu.export.convert.export_recognizer`: write an export folder (see
  :mod:`shitu.export.convert`);
- :mod:`shitu.export.backends`: ``jax`` / ``onnxruntime`` / ``openvino`` / ``auto`` and ``fp32`` / ``bf16`` /
  ``int8`` behind one forward call of the recognizer;
- :mod:`shitu.export.quantize`: int8 post-training quantization calibrated on the user's images.

Importing this package loads neither JAX nor the ONNX tools.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shitu.export.convert import ExportResult

__all__ = ["export_model"]


def export_model(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    format: str = "onnx",
    batch: int | None = None,
    input_size: int | None = None,
    verify: bool = True,
    precision: str = "fp32",
    calibration: Any = None,
) -> ExportResult:
    """Export ``model`` (a bundle folder or a registered name, see :func:`shitu.embed.resolve.resolve_model`)
    as ``format`` into the folder ``output``; ``batch`` None exports a symbolic batch dimension; ``precision``
    ``int8`` quantizes the ONNX graph on the ``calibration`` images (files, folders, list files). See
    :func:`shitu.export.convert.export_recognizer`."""
    from shitu.embed.resolve import resolve_model
    from shitu.errors import ShituError
    from shitu.export.convert import FORMATS, check_batch, check_precision, export_recognizer

    if format not in FORMATS:  # before the model is loaded
        raise ShituError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    check_batch(batch)
    calibration = check_precision(format, precision, calibration)  # resolved before the model is loaded
    recognizer = resolve_model(model, input_size=input_size, backend="jax", precision="fp32")
    return export_recognizer(
        recognizer, output, format=format, batch=batch, verify=verify, precision=precision, calibration=calibration
    )
