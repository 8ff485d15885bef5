"""Where a recognizer's forward pass runs: shitu's JAX model, or its exported ONNX graph in ONNX Runtime or
OpenVINO. Preprocessing stays shitu's whatever the backend; only the call ``images → features`` changes.

- ``jax`` (default): the jitted, bucketed :class:`~shitu.models.inference.Embedder`. ``bf16`` runs the
  BatchNorm-folded model's dense and 1×1 convolutions as bf16 products with float32 accumulation (activations
  stay float32; :func:`~shitu.models.layers.use_bf16_products`) where the CPU has a bf16 path (AVX-512 BF16 or
  AMX; any GPU).
- ``onnxruntime``: an ONNX Runtime CPU session with ``intra_op_num_threads`` = the cores this process may
  use; fp32, or ``int8``.
- ``openvino``: an OpenVINO CPU compiled model, ``INFERENCE_PRECISION_HINT`` f32 or bf16 (bf16 only where
  OpenVINO reports the CPU can).
- ``int8`` (``onnxruntime`` and ``openvino``): the exported graph quantized after training, its activation
  ranges calibrated on images the caller names (``calibration``; see :mod:`shitu.export.quantize`). On a CPU
  with AVX-512 VNNI OpenVINO runs it fastest (PP-ShiTuV2_rec at 224 px: about 1.7x OpenVINO bf16; ONNX
  Runtime's int8 is slower than its fp32 there; benchmarks/RESULTS.md).
- ``auto``: times each available backend that supports the precision on one batch and keeps the fastest; the
  choice is remembered per model, size, precision, CPU and thread count in ``cache_dir()/backends.json``.

The ONNX graph is exported once per model (parameter checksum) and input size into
``shitu.runtime.cache_dir()/exported/`` (int8: also per calibration set hash); OpenVINO keeps its compiled
blobs per graph content and precision in ``cache_dir()/openvino``. So a second process neither re-exports nor
recompiles.

Commands choose a backend for everything they load with :func:`inference_backend` (a context); the API
passes ``backend=``/``precision=`` to :func:`shitu.embed.predict.create_model` or ``resolve_model``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError

BACKENDS = ("jax", "onnxruntime", "openvino", "auto")
PRECISIONS = ("fp32", "bf16", "int8")
#: Images per timed call when ``auto`` measures the backends.
AUTO_BATCH = 8
CHOICES_FILE = "backends.json"


@dataclass(frozen=True)
class BackendChoice:
    """The backend and precision a recognizer embeds with, and why (for ``auto``: what was measured)."""

    backend: str = "jax"
    precision: str = "fp32"
    note: str = ""

    def describe(self) -> str:
        return f"{self.backend} {self.precision}" + (f" ({self.note})" if self.note else "")

    def to_json(self) -> dict[str, str]:
        return {"backend": self.backend, "precision": self.precision, "note": self.note}


Forward = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------- what is available


def cpu_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def jax_bf16_available() -> tuple[bool, str]:
    """Whether JAX has a fast bfloat16 path here, and why not: on CPU it needs AVX-512 BF16 or AMX."""
    import jax

    if jax.default_backend() != "cpu":
        return True, ""
    flags = _cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return True, ""
    return False, "this CPU has neither AVX-512 BF16 nor AMX, so JAX would emulate bf16 (slower than fp32)"


def import_openvino() -> Any:
    """``import openvino``, without its usage telemetry (ImportError where it is not installed).

    Importing openvino loads its model converter, which sends a usage event through the ``openvino_telemetry``
    package: a forked process that contacts an analytics server. In a JAX process that fork is unsafe (JAX is
    multithreaded; Python warns that it may deadlock), and shitu makes no network calls its user did not ask
    for. OpenVINO falls back to its own no-op stub when ``openvino_telemetry`` cannot be imported, so it is
    hidden while openvino loads (only in this process; nothing on disk changes)."""
    import sys

    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    missing = object()
    before = sys.modules.get("openvino_telemetry", missing)
    if before is missing:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # makes its import an ImportError
    try:
        import openvino

        return openvino
    finally:
        if before is missing:
            sys.modules.pop("openvino_telemetry", None)


def installed(backend: str) -> bool:
    """Whether ``backend``'s runtime can be imported (jax always can)."""
    if backend == "jax":
        return True
    load = {"onnxruntime": lambda: __import__("onnxruntime"), "openvino": import_openvino}[backend]
    try:
        load()
        return True
    except ImportError:
        return False


def _require(backend: str) -> None:
    if not installed(backend):
        extra = "onnx" if backend == "onnxruntime" else "openvino"
        raise ShituError(f"the {backend} backend is not installed", hint=f"pip install 'shitu[{extra}]'")


def _openvino_bf16_available() -> tuple[bool, str]:
    ov = import_openvino()

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" in capabilities:
        return True, ""
    return False, "OpenVINO reports no bf16 support on this CPU (it would run f32)"


def check_choice(backend: str, precision: str) -> None:
    """A ShituError for a backend or precision name that does not exist."""
    if backend not in BACKENDS:
        raise ShituError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ShituError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


# ------------------------------------------------------------------------------------------- exported graphs


def _tools_tag() -> str:
    """A short hash of what makes the exported graphs besides the weights: shitu's version (its export and
    quantization code), the export format, and the converter's and the quantizer's versions. Part of the cache
    key, so that an upgrade exports and quantizes again instead of running a graph the old code made."""
    import hashlib

    from shitu import __version__
    from shitu.export.convert import EXPORT_FORMAT_VERSION, converter_version

    tools = [__version__, str(EXPORT_FORMAT_VERSION), converter_version("jax2onnx"), converter_version("onnxruntime")]
    return hashlib.sha256("\n".join(tools).encode()).hexdigest()[:8]


def _cache_key(recognizer: Any) -> str:
    from shitu.export.convert import model_checksum

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", recognizer.name)
    return f"{name}-{model_checksum(recognizer)}-{recognizer.input_size}px-t{_tools_tag()}"


def exported_onnx(recognizer: Any, calibration: Any = None) -> Path:
    """The recognizer's ONNX graph (dynamic batch) in ``cache_dir()/exported``, exported on first use; with a
    ``calibration`` set (:class:`~shitu.export.quantize.CalibrationSet`) its int8 form calibrated on it."""
    from shitu.export.convert import MODEL_FILE, MODEL_FILES, export_recognizer
    from shitu.runtime import cache_dir

    key = _cache_key(recognizer) + (f"-int8-{calibration.short_hash}" if calibration is not None else "")
    folder = cache_dir() / "exported" / key
    model_file = folder / MODEL_FILES["onnx"]
    if not ((folder / MODEL_FILE).is_file() and model_file.is_file()):
        try:
            export_recognizer(
                recognizer,
                folder,
                format="onnx",
                precision="int8" if calibration is not None else "fp32",
                calibration=calibration,
            )
        except OSError as exc:
            raise ShituError(
                f"cannot write the exported model to the cache: {exc.strerror or exc}",
                path=folder,
                hint="set SHITU_CACHE_DIR to a writable folder",
            ) from None
    return model_file


class OnnxRuntimeForward:
    """``images → features`` through an ONNX Runtime CPU session (all cores this process may use)."""

    def __init__(self, model_file: Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: images})[0], np.float32)


class OpenVinoForward:
    """``images → features`` through an OpenVINO CPU compiled model, ``precision`` ``fp32`` or ``bf16`` (an
    int8 QDQ graph runs its quantized operators in int8 either way)."""

    def __init__(self, model_file: Path, *, precision: str = "fp32", threads: int | None = None) -> None:
        ov = import_openvino()

        from shitu.hub.download import file_sha256
        from shitu.runtime import cache_dir

        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads or cpu_threads(),
            # An int8 graph keeps f32 for its few unquantized operators: the bf16 hint measured no faster there.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        }
        # OpenVINO keys its compiled blobs by the model file's path and the config, not by the file's content
        # (a graph rewritten at the same path got the old blob back): one blob folder per content hash.
        blobs = cache_dir() / "openvino" / file_sha256(model_file)[:16]
        with contextlib.suppress(OSError):  # a read-only cache: compile every time instead
            blobs.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(blobs)
        self.compiled = core.compile_model(str(model_file), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        result = self.request.infer({0: images})
        return np.array(result[self.compiled.output(0)], np.float32)  # a copy: the request reuses its buffer


def _jax_forward(recognizer: Any, precision: str) -> Forward:
    if precision == "fp32":
        return recognizer.embedder
    import jax.numpy as jnp

    from shitu.models.inference import Embedder
    from shitu.models.layers import use_bf16_products

    if callable(getattr(recognizer.model, "inference_form", None)):
        # bf16 products, f32 accumulation and activations on the model's own copy: 1.3x fp32 at 224 px
        # (batch 1 and 32), where bf16 activations everywhere ran at 0.65-0.75x (XLA:CPU upcast its bf16 dots).
        return Embedder(use_bf16_products(recognizer.model.inference_form()))
    return Embedder(recognizer.model, compute_dtype=jnp.bfloat16, inference_form=True)


def _refusal(backend: str, precision: str) -> str | None:
    """Why ``backend`` cannot run ``precision`` here (None: it can)."""
    if precision == "fp32":
        return None
    if precision == "int8":
        if backend == "jax":
            return "int8 runs the exported graph only"
        return None
    if backend == "onnxruntime":
        return "ONNX Runtime's CPU provider runs shitu's graphs in fp32 only (and int8, calibrated)"
    ok, why = jax_bf16_available() if backend == "jax" else _openvino_bf16_available()
    return None if ok else why


def make_forward(
    recognizer: Any, backend: str, precision: str, calibration: Any = None
) -> tuple[Forward, BackendChoice]:
    """The forward call of ``recognizer`` on ``backend`` in ``precision``, and what was chosen.

    A ShituError when the backend is not installed or cannot run the precision on this machine (with what
    to do instead); ``auto`` picks by measuring (see the module docstring). ``calibration``: the images
    ``int8`` is calibrated on (required there, refused otherwise; see
    :func:`shitu.export.quantize.calibration_set`)."""
    check_choice(backend, precision)
    calibration = _calibration(precision, calibration)
    if backend == "auto":
        return _auto(recognizer, precision, calibration)
    _require(backend)
    refusal = _refusal(backend, precision)
    if refusal is not None:
        raise ShituError(
            f"--backend {backend} --precision {precision}: {refusal}",
            hint="use --precision fp32, or --backend auto to pick one that can",
        )
    if backend == "jax":
        return _jax_forward(recognizer, precision), BackendChoice("jax", precision)
    model_file = exported_onnx(recognizer, calibration)
    note = calibration.describe() if calibration is not None else ""
    if backend == "onnxruntime":
        return OnnxRuntimeForward(model_file), BackendChoice(backend, precision, note)
    return OpenVinoForward(model_file, precision=precision), BackendChoice(backend, precision, note)


def _calibration(precision: str, calibration: Any) -> Any:
    """The resolved calibration set for ``int8`` (a ShituError saying what to pass when there is none);
    None for the other precisions (a ShituError when images were given anyway)."""
    if precision != "int8":
        if calibration is not None:
            raise ShituError("calibration images are used with --precision int8 only")
        return None
    from shitu.export.quantize import calibration_set

    return calibration_set(calibration)


def _time_forward(forward: Forward, images: np.ndarray) -> float:
    """Seconds of the faster of two calls, after one warm-up call (compilation)."""
    forward(images)
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        forward(images)
        best = min(best, time.perf_counter() - started)
    return best


def _auto(recognizer: Any, precision: str, calibration: Any = None) -> tuple[Forward, BackendChoice]:
    from shitu.fileio import atomic_write_json
    from shitu.runtime import cache_dir

    candidates = [b for b in BACKENDS[:-1] if installed(b) and _refusal(b, precision) is None]
    if not candidates:
        raise ShituError(f"no installed backend runs {precision} on this machine", hint="use --precision fp32")
    quantized = f"-{calibration.short_hash}" if calibration is not None else ""
    key = f"{_cache_key(recognizer)}|{precision}{quantized}|{_cpu_model()}|{cpu_threads()} threads"
    file = cache_dir() / CHOICES_FILE
    try:
        remembered = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(remembered, dict):
            remembered = {}
    except (OSError, ValueError):
        remembered = {}
    known = remembered.get(key)
    if isinstance(known, dict) and known.get("backend") in candidates:
        forward, _ = make_forward(recognizer, known["backend"], precision, calibration)
        return forward, BackendChoice(known["backend"], precision, f"auto, measured earlier: {known.get('note', '')}")
    images = np.random.default_rng(0).normal(size=(AUTO_BATCH, recognizer.input_size, recognizer.input_size, 3))
    images = images.astype(np.float32)
    timings: dict[str, float] = {}
    forwards: dict[str, Forward] = {}
    for backend in candidates:
        forward, _ = make_forward(recognizer, backend, precision, calibration)
        timings[backend] = _time_forward(forward, images)
        forwards[backend] = forward
    best = min(timings, key=lambda b: timings[b])
    measured = ", ".join(f"{b} {1000 * t:.0f} ms" for b, t in sorted(timings.items(), key=lambda item: item[1]))
    note = f"{AUTO_BATCH} images: {measured}"
    remembered[key] = {"backend": best, "note": note}
    with contextlib.suppress(OSError):  # not remembering is only slower next time
        atomic_write_json(file, remembered)
    return forwards[best], BackendChoice(best, precision, f"auto, measured {note}")


# ----------------------------------------------------------------------------------- the commands' selection


@dataclass(frozen=True)
class _Selection:
    backend: str
    precision: str
    report: Callable[[BackendChoice], None] | None
    calibration: Any = None


_selection: ContextVar[_Selection | None] = ContextVar("shitu_inference_backend", default=None)


@contextlib.contextmanager
def inference_backend(
    backend: str = "jax",
    precision: str = "fp32",
    *,
    report: Callable[[BackendChoice], None] | None = None,
    calibration: Any = None,
) -> Iterator[None]:
    """While inside, every recognizer that :func:`shitu.embed.resolve.resolve_model` loads without an explicit
    backend embeds with ``backend`` in ``precision``; ``report`` is called with each choice made.
    ``calibration``: the images ``int8`` is calibrated on (resolved and hashed once, here)."""
    check_choice(backend, precision)
    calibration = _calibration(precision, calibration)
    token = _selection.set(_Selection(backend, precision, report, calibration))
    try:
        yield
    finally:
        _selection.reset(token)


def apply_backend(
    recognizer: Any, backend: str | None = None, precision: str | None = None, calibration: Any = None
) -> None:
    """Put ``recognizer`` on ``backend``/``precision`` (each defaults to :func:`inference_backend`'s
    selection, else ``jax``/``fp32``; ``calibration`` to the selection's when its precision is used); the
    default JAX fp32 path is left as it is."""
    selection = _selection.get()
    chosen_backend = backend or (selection.backend if selection else "jax")
    chosen_precision = precision or (selection.precision if selection else "fp32")
    if calibration is None and selection is not None and chosen_precision == selection.precision:
        calibration = selection.calibration
    if (chosen_backend, chosen_precision) == ("jax", "fp32") and selection is None:
        return
    choice = recognizer.use_backend(chosen_backend, chosen_precision, calibration)
    if selection is not None and selection.report is not None:
        selection.report(choice)
