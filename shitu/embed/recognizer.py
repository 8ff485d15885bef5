"""A model ready to embed images: spec + network (eval mode) + preprocessing + the bucketed jit entry point.

This is what ``eval``, ``predict``, ``index`` and training's per-epoch evaluation use to turn images into
unit-length features. Decoding and preprocessing run in a thread pool (Pillow and OpenCV release the GIL),
one batch ahead of the model.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.data.images import DEFAULT_MAX_PIXELS
from shitu.errors import ShituError


@dataclass
class EmbedFailure:
    """An input that could not be embedded, and why (one line)."""

    index: int
    source: str
    message: str


@dataclass
class EmbeddedBatch:
    """One batch of :meth:`Recognizer.iter_loaded`: the good inputs' positions, sources, features (and
    decoded images when asked for), and the inputs of the batch that failed."""

    indices: list[int]
    sources: list[Any]
    features: np.ndarray  # float32 [len(indices), embedding_size], unit rows
    failures: list[EmbedFailure]
    images: list[np.ndarray] | None = None  # RGB uint8 [H, W, 3] per good input, with keep_images


@dataclass
class Embedded:
    """Features of the inputs that worked, in input order, with their positions; failures apart."""

    features: np.ndarray  # float32 [n_ok, embedding_size], unit rows
    indices: list[int] = field(default_factory=list)  # position of each row in the input sequence
    failures: list[EmbedFailure] = field(default_factory=list)


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class Recognizer:
    """Embeds images with ``model`` (an NNX recognition module) built from ``spec``.

    ``input_size`` overrides the spec's (a model trained at 128 px embeds at 128 px);
    ``bundle`` is the loaded bundle this came from, if any.
    """

    def __init__(
        self,
        spec: Any,
        model: Any,
        *,
        num_classes: int,
        input_size: int | None = None,
        bundle: Any | None = None,
        config: Any | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        from shitu.models.inference import Embedder

        self.spec = spec
        self.model = model
        self.num_classes = int(num_classes)
        self.input_size = int(input_size or spec.input_size)
        self.bundle = bundle
        self.config = config
        self.max_pixels = max_pixels
        # shitu's JAX forward on the model's inference form (BatchNorm folded: 1.3x faster in fp32, see
        # Embedder); training's evaluation swaps its weights with set_state.
        self.embedder = Embedder(model, inference_form=True)
        self.forward: Callable[[np.ndarray], np.ndarray] = self.embedder  # what embed_arrays calls
        self.backend: Any = None  # the BackendChoice of use_backend; None: JAX fp32

    def use_backend(self, backend: str = "jax", precision: str = "fp32", calibration: Any = None) -> Any:
        """Embed with ``backend`` (``jax``, ``onnxruntime``, ``openvino`` or ``auto``) in ``precision``
        (``fp32``, ``bf16``, or ``int8`` calibrated on the ``calibration`` images) from now on; preprocessing
        is unchanged. Returns the :class:`~shitu.export.backends.BackendChoice` made; a ShituError when it
        cannot run here."""
        from shitu.export.backends import make_forward

        self.forward, self.backend = make_forward(self, backend, precision, calibration)
        return self.backend

    @property
    def name(self) -> str:
        return str(self.spec.name)

    @property
    def embedding_size(self) -> int:
        return int(self.spec.embedding_size)

    def describe(self) -> dict[str, Any]:
        """What identifies the features this recognizer makes (an index built with one must match it)."""
        return {
            "model": self.name,
            "embedding_size": self.embedding_size,
            "input_size": self.input_size,
            "bundle": str(self.bundle.path) if self.bundle is not None else None,
        }

    def preprocess(self, source: Any) -> np.ndarray:
        """Decode and preprocess one input into float32 [S, S, 3]; a ShituError if it cannot be read."""
        return self.load(source)[1]

    def load(self, source: Any) -> tuple[np.ndarray, np.ndarray]:
        """Decode one input: ``(RGB uint8 image [H, W, 3], preprocessed float32 [S, S, 3])``."""
        from shitu.data.transforms import eval_preprocess, read_image

        image = read_image(source, max_pixels=self.max_pixels)
        array = eval_preprocess(
            image,
            size=self.input_size,
            mean=self.spec.mean,
            std=self.spec.std,
            interpolation=self.spec.resize_interpolation,
        )
        return image, array

    def embed_arrays(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [N, S, S, 3] → float32 [N, D] unit rows."""
        return self.forward(images)

    def iter_loaded(
        self,
        sources: Iterable[Any],
        *,
        batch_size: int = 32,
        workers: int | None = None,
        keep_images: bool = False,
    ) -> Iterator[EmbeddedBatch]:
        """Embed ``sources`` batch by batch, lazily: one :class:`EmbeddedBatch` per ``batch_size`` inputs.

        ``sources`` may be any iterable (a generator is read only as far as needed: the inputs of the next
        batch are taken and decoded in a thread pool while the model runs on the current one). Inputs that
        cannot be read are reported as failures and skipped; the others still run. With ``keep_images`` each
        batch also carries the decoded RGB images of its good inputs.
        """
        if batch_size < 1:
            raise ShituError(f"batch size must be at least 1, got {batch_size}")
        workers = workers or _default_workers()

        def load(item: tuple[int, Any]) -> tuple[int, Any, np.ndarray | None, np.ndarray | None, str | None]:
            index, source = item
            try:
                image, array = self.load(source)
                return index, source, image if keep_images else None, array, None
            except ShituError as exc:
                return index, source, None, None, str(exc)
            except Exception as exc:  # an input we cannot even describe must not stop the others
                return index, source, None, None, f"{_describe(source)}: {type(exc).__name__}: {exc}"

        chunks = iter_chunks(enumerate(sources), batch_size)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Iterator[Any]] = deque()
            first = next(chunks, None)
            if first is not None:
                pending.append(pool.map(load, first))
            while pending:
                current = pending.popleft()
                following = next(chunks, None)
                if following is not None:  # decode the next batch while this one runs
                    pending.append(pool.map(load, following))
                loaded = list(current)
                good = [row for row in loaded if row[4] is None]
                failures = [EmbedFailure(i, _describe(src), err) for i, src, _, _, err in loaded if err is not None]
                if good:
                    features = self.embed_arrays(np.stack([row[3] for row in good]))
                else:
                    features = np.zeros((0, self.embedding_size), np.float32)
                yield EmbeddedBatch(
                    indices=[row[0] for row in good],
                    sources=[row[1] for row in good],
                    features=features,
                    failures=failures,
                    images=[row[2] for row in good] if keep_images else None,
                )

    def iter_batches(
        self,
        sources: Iterable[Any],
        *,
        batch_size: int = 32,
        workers: int | None = None,
    ) -> Iterator[tuple[list[int], np.ndarray, list[EmbedFailure]]]:
        """Yield ``(indices, features, failures)`` per batch of ``sources``, in order (see :meth:`iter_loaded`).

        Inputs that cannot be read are reported as failures and skipped; the others still run.
        """
        for batch in self.iter_loaded(sources, batch_size=batch_size, workers=workers):
            yield batch.indices, batch.features, batch.failures

    def embed(
        self,
        sources: Iterable[Any],
        *,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> Embedded:
        """Embed every input; unreadable ones are collected in ``failures`` instead of raising."""
        rows: list[np.ndarray] = []
        indices: list[int] = []
        failures: list[EmbedFailure] = []
        for batch_indices, features, batch_failures in self.iter_batches(sources, batch_size=batch_size):
            rows.append(features)
            indices.extend(batch_indices)
            failures.extend(batch_failures)
            if progress is not None:
                progress(len(batch_indices) + len(batch_failures))
        matrix = np.concatenate(rows) if rows else np.zeros((0, self.embedding_size), np.float32)
        return Embedded(features=matrix.astype(np.float32, copy=False), indices=indices, failures=failures)


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, np.ndarray):
        return f"<array {list(source.shape)}>"
    return f"<{type(source).__name__}>"


def load_recognizer(
    model: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    seed: int = 0,
    host: Any | None = None,
) -> Recognizer:
    """The recognizer of a bundle folder, or of a registered model name with freshly initialised (random)
    weights, as given: no lookup of installed bundles and no warning. To turn a model reference into a
    recognizer, use :func:`shitu.embed.resolve.resolve_model`, which calls this.

    What is a path is decided by :func:`shitu.embed.resolve.is_path_reference`.
    """
    from shitu.embed.resolve import is_path_reference
    from shitu.plugins import get_host

    if is_path_reference(model):
        from shitu.models.bundle import load_bundle

        bundle = load_bundle(Path(model), host=host)
        size = input_size or int(bundle.info.extra.get("input_size") or bundle.info.input_size)
        return Recognizer(
            bundle.spec,
            bundle.model,
            num_classes=bundle.info.num_classes,
            input_size=size,
            bundle=bundle,
            config=bundle.config,
        )
    spec = (host or get_host()).model(str(model))
    from shitu.config import load_config

    config = load_config(spec.config)
    classes = int(num_classes or config.get("Train.num_classes") or 1)
    network = spec.build(classes, seed=seed)
    network.eval()
    return Recognizer(spec, network, num_classes=classes, input_size=input_size, config=config)


def iter_chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
