"""A recognizer's forward pass (images → unit-length features) written out as ONNX or serialized StableHLO.

An export folder holds the model file, ``preprocess.json`` (what turns an image into the model's input) and
``model.json`` (what the model is, where it came from, how it was exported and checked). The graph takes
preprocessed float32 NHWC images ``[batch, S, S, 3]`` named ``images`` and returns float32 L2-normalised
``features`` ``[batch, D]``; the batch is symbolic (any size) unless a fixed one is asked for.

- ONNX: converted by jax2onnx from the model's *export form* (``model.inference_form(export=True)`` where the
  model has one: BatchNorm folded, depthwise convolutions as one grouped ``Conv``), then tidied by ONNX
  Runtime's basic graph optimizations (constant folding, and cancelling the NHWC↔NCHW ``Transpose`` pairs the
  converter puts around every convolution), saved as standard ONNX operators only.
- StableHLO: :func:`jax.export.export` of the folded form with the weights as constants, serialized;
  :func:`jax.export.deserialize` reads it back and ``.call(images)`` runs it, without shitu's model code.

This module imports neither JAX nor the converters at import time.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError

FORMATS = ("onnx", "stablehlo")
#: Precisions an export folder's model can have (int8: ONNX only, see :mod:`shitu.export.quantize`).
EXPORT_PRECISIONS = ("fp32", "int8")
EXPORT_FORMAT = "shitu-exported-model"
EXPORT_FORMAT_VERSION = 1
MODEL_FILE = "model.json"
PREPROCESS_FILE = "preprocess.json"
MODEL_FILES = {"onnx": "model.onnx", "stablehlo": "model.stablehlo"}
INPUT_NAME = "images"
OUTPUT_NAME = "features"
#: ONNX opset written (jax2onnx's default; ONNX Runtime ≥ 1.20 and OpenVINO 2025+ read it).
ONNX_OPSET = 23
#: The largest feature difference to the JAX model an export may show on its check batch.
VERIFY_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """What :func:`export_recognizer` wrote: the folder, its model file and the ``model.json`` document."""

    path: Path
    format: str
    model_file: Path
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "model_file": str(self.model_file), "seconds": round(self.seconds, 3)} | {
            k: v for k, v in self.info.items() if k not in ("format", "format_version")
        }


def inference_form(model: Any, *, export: bool = False) -> Any:
    """The model as inference runs it: ``model.inference_form(export=export)`` where the model defines one
    (an eval-only copy, e.g. BatchNorm folded), else ``model`` itself in eval mode."""
    make = getattr(model, "inference_form", None)
    if callable(make):
        return make(export=export)
    model.eval()
    return model


def features_function(model: Any, *, export: bool = False) -> Callable[[Any], Any]:
    """A pure function ``images [B, S, S, 3] → unit features [B, D]`` over the inference form's weights."""
    from flax import nnx

    from shitu.models.inference import l2_normalize

    graphdef, state = nnx.split(inference_form(model, export=export))

    def features(images: Any) -> Any:
        return l2_normalize(nnx.merge(graphdef, state)(images))

    return features


def model_checksum(recognizer: Any) -> str:
    """The CRC-32 of the recognizer's parameters: its bundle's recorded one, else computed (as a bundle does)."""
    bundle = getattr(recognizer, "bundle", None)
    if bundle is not None and getattr(bundle.info, "params_crc32", ""):
        return str(bundle.info.params_crc32)
    from flax import nnx

    from shitu.models.bundle import params_checksum

    return params_checksum(nnx.state(recognizer.model, nnx.Not(nnx.RngState)))


def preprocess_document(recognizer: Any) -> dict[str, Any]:
    """``preprocess.json``: how an image becomes the model's input (shitu's ``eval_preprocess``)."""
    spec = recognizer.spec
    return {
        "input_size": [recognizer.input_size, recognizer.input_size],
        "resize": {"mode": "stretch", "interpolation": str(spec.resize_interpolation)},
        "scale": 1.0 / 255.0,
        "mean": [float(v) for v in spec.mean],
        "std": [float(v) for v in spec.std],
        "formula": "(pixel / 255 - mean) / std, per channel",
        "channel_order": "RGB",
        "layout": "NHWC",
        "dtype": "float32",
    }


def converter_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return package


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ShituError(f"{module} is not installed ({exc})", hint=f"pip install 'shitu[{extra}]'") from None


def check_batch(batch: int | None) -> None:
    if batch is not None and batch < 1:
        raise ShituError(f"the batch size must be at least 1 (or dynamic), got {batch}")


def _check_images(size: int, count: int, seed: int = 0) -> np.ndarray:
    """A deterministic batch of normalised-looking inputs for the export check."""
    return np.random.default_rng(seed).normal(0.0, 1.0, (count, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ ONNX


def write_onnx(model: Any, path: Path, *, input_size: int, batch: int | None = None, name: str = "shitu") -> None:
    """Convert ``model``'s export form to ONNX at ``path`` (see the module docstring)."""
    to_onnx = _need("jax2onnx", "onnx").to_onnx
    ort = _need("onnxruntime", "onnx")
    features = features_function(model, export=True)
    spec = [(batch if batch is not None else "batch", input_size, input_size, 3)]
    # jax2onnx's IR serializer logs a warning per untyped shape constant; they are harmless.
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the converter's use of flax's older API
            proto = to_onnx(
                features,
                spec,
                model_name=name,
                opset=ONNX_OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
            )
    except Exception as exc:  # the converter raises many types for what it cannot express
        raise ShituError(f"ONNX conversion failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    finally:
        serde_log.setLevel(level)
    raw = path.with_name(path.name + ".raw")
    raw.write_bytes(proto.SerializeToString())
    try:
        # ONNX Runtime's basic level only rewrites into standard ONNX operators (unlike the extended and
        # layout levels, which write runtime-specific fused ops), so the saved graph stays portable.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3
        ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    finally:
        raw.unlink(missing_ok=True)


def run_onnx(path: Path, images: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """Run an exported ONNX model on ``images`` with ONNX Runtime (for checks)."""
    ort = _need("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {INPUT_NAME: images})[0])


# ------------------------------------------------------------------------------------------------- StableHLO


def write_stablehlo(model: Any, path: Path, *, input_size: int, batch: int | None = None) -> None:
    """Serialize the folded form's forward pass with :func:`jax.export.export` to ``path``."""
    import jax
    import jax.numpy as jnp

    features = features_function(model, export=False)
    (size,) = jax.export.symbolic_shape("batch") if batch is None else (batch,)
    shape = jax.ShapeDtypeStruct((size, input_size, input_size, 3), jnp.float32)
    try:
        exported = jax.export.export(jax.jit(features))(shape)
    except Exception as exc:
        raise ShituError(f"StableHLO export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    path.write_bytes(bytes(exported.serialize()))


def run_stablehlo(path: Path, images: np.ndarray) -> np.ndarray:
    """Deserialize an exported StableHLO model and run it on ``images``."""
    import jax

    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return np.asarray(exported.call(images))


# ---------------------------------------------------------------------------------------------------- folder


def export_recognizer(
    recognizer: Any,
    output: str | os.PathLike[str],
    *,
    format: str = "onnx",
    batch: int | None = None,
    verify: bool = True,
    precision: str = "fp32",
    calibration: Any = None,
) -> ExportResult:
    """Write ``recognizer``'s model as ``format`` (``onnx`` or ``stablehlo``) into the folder ``output``, with
    ``preprocess.json`` and ``model.json``. ``batch``: a fixed batch size, or None for any (symbolic).

    With ``verify`` the written model is run on a small random batch and compared with shitu's own JAX
    features; a difference above :data:`VERIFY_TOLERANCE` is a ShituError and nothing is written. The folder
    appears complete or not at all (an existing one is replaced only when the new one is done).

    ``precision`` ``int8`` (ONNX only) quantizes the checked fp32 graph, its ranges measured on
    ``calibration`` (a :class:`~shitu.export.quantize.CalibrationSet` or the inputs naming the images, see
    :func:`~shitu.export.quantize.calibration_set`); ``model.json`` then records the calibration set's size
    and hash and the int8 features' cosine to shitu's on the calibration images.
    """
    from shitu import __version__
    from shitu.fileio import atomic_directory, atomic_write_json

    if format not in FORMATS:
        raise ShituError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    check_batch(batch)
    calibration_images = check_precision(format, precision, calibration)
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise ShituError("exists and is not a folder", path=target)
    if target.is_dir() and any(target.iterdir()) and not (target / MODEL_FILE).is_file():
        raise ShituError("exists, is not empty and is not an exported model; refusing to replace it", path=target)
    started = time.perf_counter()
    size = recognizer.input_size
    file_name = MODEL_FILES[format]
    with atomic_directory(target) as staging:
        model_path = staging / file_name
        if format == "onnx":
            write_onnx(recognizer.model, model_path, input_size=size, batch=batch, name=recognizer.name)
            converter = converter_version("jax2onnx")
        else:
            write_stablehlo(recognizer.model, model_path, input_size=size, batch=batch)
            import jax

            converter = f"jax.export {jax.__version__}"
        info: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "model": recognizer.name,
            "embedding_size": recognizer.embedding_size,
            "input_size": size,
            "source": {
                "bundle": str(recognizer.bundle.path) if recognizer.bundle is not None else None,
                "params_crc32": model_checksum(recognizer),
            },
            "export": {
                "format": format,
                "file": file_name,
                "batch": batch if batch is not None else "dynamic",
                "converter": converter,
                **({"opset": ONNX_OPSET} if format == "onnx" else {}),
                "input": {"name": INPUT_NAME, "shape": ["batch", size, size, 3], "dtype": "float32"},
                "output": {"name": OUTPUT_NAME, "shape": ["batch", recognizer.embedding_size], "unit_rows": True},
            },
            "shitu_version": __version__,
        }
        if verify:
            images = _check_images(size, batch or 2)
            expected = recognizer.embedder(images)  # shitu's JAX forward, whatever backend is in use
            got = run_onnx(model_path, images) if format == "onnx" else run_stablehlo(model_path, images)
            diff = float(np.max(np.abs(got - expected)))
            if not diff <= VERIFY_TOLERANCE:
                raise ShituError(f"the exported {format} model differs from shitu's features by {diff:.3g}")
            info["verified"] = {"max_abs_diff": diff, "batch": len(images), "against": "shitu jax fp32"}
        if calibration_images is not None:
            info["precision"] = "int8"
            info["export"]["quantization"] = quantize_export(recognizer, model_path, calibration_images, batch)
        else:
            info["precision"] = "fp32"
        atomic_write_json(staging / PREPROCESS_FILE, preprocess_document(recognizer))
        atomic_write_json(staging / MODEL_FILE, info)
    return ExportResult(
        path=target,
        format=format,
        model_file=target / file_name,
        info=info,
        seconds=time.perf_counter() - started,
    )


def check_precision(format: str, precision: str, calibration: Any) -> Any:
    """The calibration set an export in ``precision`` uses (None for fp32); a ShituError for an unknown
    precision, int8 in another format than ONNX, or int8 without calibration images."""
    if precision not in EXPORT_PRECISIONS:
        raise ShituError(f"unknown export precision {precision!r}; choose one of {', '.join(EXPORT_PRECISIONS)}")
    if precision == "fp32":
        if calibration is not None:
            raise ShituError("calibration images are used with --precision int8 only")
        return None
    if format != "onnx":
        raise ShituError(f"--precision int8 exports ONNX only, not {format}")
    from shitu.export.quantize import calibration_set

    return calibration_set(calibration)


def quantize_export(recognizer: Any, model_path: Path, calibration: Any, batch: int | None) -> dict[str, Any]:
    """Replace the fp32 ONNX graph at ``model_path`` by its int8 QDQ form calibrated on ``calibration`` (see
    :mod:`shitu.export.quantize`); the ``quantization`` entry of ``model.json``."""
    from shitu.export.quantize import preprocessed_batches, quantize_onnx

    batches = preprocessed_batches(recognizer, calibration, batch)
    fp32_path = model_path.with_name(model_path.stem + ".fp32.onnx")
    model_path.replace(fp32_path)
    try:
        quantize_onnx(fp32_path, model_path, batches, input_name=INPUT_NAME)
    finally:
        fp32_path.unlink(missing_ok=True)
    images = batches[0]
    expected = recognizer.embedder(images)
    got = run_onnx(model_path, images)
    cosine = float(np.min(np.sum(got * expected, axis=1)))
    return {
        "method": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": "int8 per channel",
        "activations": "int8",
        "calibrate_method": "MinMax",
        "calibration": calibration.to_json(),
        "min_cosine_to_fp32": cosine,
        "cosine_images": len(images),
        "quantizer": converter_version("onnxruntime"),
    }


def read_export_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``model.json`` of an export folder, checked; a ShituError naming the file otherwise."""
    file = Path(folder) / MODEL_FILE
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShituError(f"not an exported shitu model (no {MODEL_FILE})", path=Path(folder)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShituError(f"unreadable export description: {exc}", path=file) from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ShituError("not an exported shitu model description", path=file)
    if doc.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ShituError(f"export format version {doc.get('format_version')!r} is not supported", path=file)
    return doc
