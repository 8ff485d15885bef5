"""Features of images, PaddleX style: ``create_model(name).predict(inputs)`` yields one result per image::

    from shitu import create_model

    model = create_model("PP-ShiTuV2_rec")            # or a bundle folder; index=INDEX_DIR to search too
    for res in model.predict(["a.jpg", "photos/"], batch_size=8):
        res.print()                                    # {'res': {'input_path': ..., 'feature': array(...)}}
        res.save_to_json("output/")                    # output/a_res.json
        res.save_to_img("output/")                     # output/a_res.jpg (the image, and its matches)

What differs from PaddleX, on purpose:

- a model *name* loads the bundle installed at ``shitu.runtime.cache_dir()/models/NAME`` when there is one;
  otherwise the network gets random weights and a :class:`RandomWeightsWarning` is issued;
- inputs are resolved by :func:`resolve_inputs` (folders recursively, globs, list files, ``-`` for stdin,
  URLs), and an input that cannot be read raises a :class:`~shitu.errors.ShituError` naming it, unless
  ``on_failure`` is given (then it is reported there and the others still run);
- results of inputs without a path (arrays, PIL images) are saved as ``input_<position>_res.json``
  (PaddleX uses a timestamp and a random number);
- ``save_to_img`` exists (PaddleX's feature result has none): the input with its nearest gallery images
  when an index is attached, else the input with its feature norm.
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from shitu.data.inputs import LIST_SUFFIXES, SkippedFileWarning, is_image_name, resolve_inputs
from shitu.embed.resolve import RandomWeightsWarning, installed_bundle
from shitu.errors import ShituError

__all__ = [
    "DEFAULT_TOPK",
    "LIST_SUFFIXES",
    "FeatureResult",
    "Predictor",
    "RandomWeightsWarning",
    "SkippedFileWarning",
    "UniqueNames",
    "create_model",
    "installed_bundle",
    "open_index_for",
    "resolve_inputs",
    "write_feature_matrix",
]

#: How many nearest gallery items a result carries when an index is attached (``topk``).
DEFAULT_TOPK = 5


def _is_url(text: str) -> bool:
    from shitu.data.inputs import is_url

    return is_url(text)


# -- results ------------------------------------------------------------------------------------------


def _hit_to_json(hit: Any) -> dict[str, Any]:
    if hasattr(hit, "to_json"):
        return dict(hit.to_json())
    return {"key": int(hit.key), "label": int(hit.label), "path": str(hit.path), "score": float(hit.score)}


def _format_data(value: Any) -> Any:
    """JSON-ready copy of ``value`` (numpy arrays and scalars to lists and numbers, paths to strings), as
    PaddleX's ``_format_data``."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, dict):
        return {k: _format_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_format_data(v) for v in value]
    if hasattr(value, "score") and hasattr(value, "path"):  # a search hit
        return _hit_to_json(value)
    return value


class FeatureResult(dict):
    """The result of one image, as PaddleX's ``IdentityResult``: a dict with ``input_path`` (str, or None for
    arrays and PIL images), ``page_index`` (always None), ``input_img`` (the decoded RGB uint8 image
    [H, W, 3]) and ``feature`` (float32 [embedding_size], unit length); plus ``hits`` (the nearest gallery
    items, best first) when the model has an index attached.

    ``index`` is the position of the input among the resolved inputs of the ``predict`` call.
    """

    def __init__(self, data: dict[str, Any], *, index: int | None = None) -> None:
        super().__init__(data)
        self.index = index

    # -- views ----------------------------------------------------------------------------------------
    def _public(self) -> dict[str, Any]:
        data = {key: value for key, value in self.items() if key != "input_img"}
        return copy.deepcopy(data)

    @property
    def str(self) -> dict[str, Any]:
        """``{"res": {...}}`` without ``input_img`` (the feature stays a numpy array)."""
        return {"res": self._public()}

    @property
    def json(self) -> dict[str, Any]:
        """``{"res": {"input_path", "page_index", "feature": [floats], ...}}``, JSON-serialisable."""
        return {"res": _format_data(self._public())}

    def to_str(self, json_format: bool = False, indent: int = 4, ensure_ascii: bool = False) -> str:
        """What :meth:`print` prints."""
        if json_format:
            return json.dumps(self.json, indent=indent, ensure_ascii=ensure_ascii)
        return repr(self.str)

    def print(
        self, json_format: bool = False, indent: int = 4, ensure_ascii: bool = False, *, file: IO[str] | None = None
    ) -> None:
        """Print the result as PaddleX does: ``{'res': {...}}`` (numpy repr), or a JSON string with
        ``json_format=True``; to ``file`` (default stdout; PaddleX logs it)."""
        print(self.to_str(json_format, indent, ensure_ascii), file=file if file is not None else sys.stdout)

    def _input_name(self) -> str | None:
        """The input's file name (a URL's last part, without its query), or None without a path."""
        path = self.get("input_path")
        if path is None:
            return None
        text = os.fspath(path)
        if _is_url(text):
            text = text.split("?")[0].split("#")[0].rstrip("/")
        return Path(text).name

    @property
    def input_stem(self) -> str:
        """The name results are saved under: the input file's stem (of the URL's last part for a URL),
        ``input_<index>`` for an input without a path."""
        name = self._input_name()
        if name is None:
            return f"input_{self.index if self.index is not None else 0}"
        return Path(name).stem or "input"

    def json_path(self, save_path: str | os.PathLike[str]) -> Path:
        """Where :meth:`save_to_json` writes for ``save_path`` (PaddleX's rule): the path itself when it ends
        in ``.json``, else ``save_path/<input stem>_res.json``."""
        target = Path(save_path)
        if target.suffix.lower() == ".json":
            return target
        return target / f"{self.input_stem}_res.json"

    def save_to_json(self, save_path: str | os.PathLike[str], indent: int = 4, ensure_ascii: bool = False) -> Path:
        """Write ``{"input_path", "page_index", "feature": [floats]}`` (and ``hits`` with an index) to
        :meth:`json_path` atomically, creating folders; returns the file written."""
        from shitu.fileio import atomic_write_text

        target = self.json_path(save_path)
        atomic_write_text(target, json.dumps(self.json["res"], indent=indent, ensure_ascii=ensure_ascii) + "\n")
        return target

    # -- picture --------------------------------------------------------------------------------------
    @property
    def img(self) -> dict[str, Any]:
        """``{"res": PIL image}``: the input with its nearest gallery images beside it (with an index), or
        with its feature norm."""
        return {"res": render_result(self)}

    def img_path(self, save_path: str | os.PathLike[str]) -> Path:
        """Where :meth:`save_to_img` writes: the path itself when it names an image file (by suffix), else
        ``save_path/<input stem>_res<input suffix or .png>`` (PaddleX's ``ImgMixin`` rule)."""
        target = Path(save_path)
        if is_image_name(target):
            return target
        name = self._input_name()
        suffix = Path(name).suffix if name is not None and is_image_name(name) else ".png"
        return target / f"{self.input_stem}_res{suffix.lower()}"

    def save_to_img(self, save_path: str | os.PathLike[str]) -> Path:
        """Draw :attr:`img` and write it to :meth:`img_path` atomically; returns the file written."""
        from PIL import Image

        from shitu.fileio import atomic_open

        target = self.img_path(save_path)
        picture = self.img["res"]
        fmt = Image.registered_extensions().get(target.suffix.lower(), "PNG")
        if fmt == "JPEG" and picture.mode != "RGB":
            picture = picture.convert("RGB")
        with atomic_open(target, "wb") as handle:
            picture.save(handle, format=fmt)
        return target


def render_result(result: FeatureResult, *, tile: int = 224, thumb: int = 160) -> Any:
    """A PIL picture of ``result``: the input (fitted in ``tile`` px) and, when it has hits, each nearest
    gallery image (fitted in ``thumb`` px) with its rank, label and score; else the feature norm.

    Drawn with Pillow (already a dependency) and its bundled font: no plotting library is needed for a
    row of thumbnails. A gallery image that cannot be read is drawn as a grey tile."""
    from PIL import Image, ImageDraw, ImageOps

    from shitu.data.transforms import read_image

    font = _font(13)
    caption = 40

    def fitted(image: Any, box: int) -> Any:  # scaled up or down to fit box×box, aspect kept
        return ImageOps.contain(image, (box, box), Image.Resampling.BILINEAR)

    query = fitted(Image.fromarray(np.asarray(result["input_img"], np.uint8)), tile)
    hits = list(result.get("hits") or [])
    pad = 8
    width = pad + tile + len(hits) * (thumb + 16) + pad
    canvas = Image.new("RGB", (width, pad + tile + caption), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(query, (pad + (tile - query.width) // 2, pad + (tile - query.height) // 2))
    feature = np.asarray(result["feature"], np.float32)
    name = Path(str(result.get("input_path"))).name if result.get("input_path") is not None else "input"
    draw.text((pad, pad + tile + 2), _shorten(name, 30), fill="black", font=font)
    if not hits:
        norm = f"feature norm {np.linalg.norm(feature):.4f} ({feature.size}-d)"
        draw.text((pad, pad + tile + 18), norm, fill="black", font=font)
    for rank, hit in enumerate(hits, start=1):
        left = pad + tile + 16 + (rank - 1) * (thumb + 16)
        top = pad + (tile - thumb) // 2
        try:
            image = fitted(Image.fromarray(read_image(hit.path)), thumb)
            canvas.paste(image, (left + (thumb - image.width) // 2, top + (thumb - image.height) // 2))
        except ShituError:
            draw.rectangle((left, top, left + thumb, top + thumb), fill=(200, 200, 200))
            draw.text((left + 4, top + 4), "unreadable", fill="black", font=font)
        colour = "darkgreen" if rank == 1 else "black"
        draw.text((left, top + thumb + 4), f"#{rank} label {hit.label}  {hit.score:.3f}", fill=colour, font=font)
        draw.text((left, top + thumb + 20), _shorten(Path(str(hit.path)).name, 22), fill="black", font=font)
    return canvas


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the predictor ------------------------------------------------------------------------------------


def _describe_source(source: Any) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return None


class Predictor:
    """A recognizer (and optionally a retrieval index) behind PaddleX's ``model.predict`` interface.

    ``index`` is anything with ``search(features [N, D], k) -> list[list[Hit]]`` (a
    :class:`shitu.index.RetrievalIndex`); each result then carries its ``topk`` nearest items as ``hits``,
    its ``label`` (None: "unknown") and the ``decision`` (see :mod:`shitu.index.decision`) made by
    ``decision`` (a DecisionRule or its JSON), else by the index's own rule (no thresholds without one).
    """

    def __init__(
        self, recognizer: Any, *, index: Any | None = None, topk: int = DEFAULT_TOPK, decision: Any | None = None
    ) -> None:
        if topk < 1:
            raise ShituError(f"topk must be at least 1, got {topk}")
        self.recognizer = recognizer
        self.index = index
        self.topk = int(topk)
        self.decision = decision

    def _rule(self, decision: Any | None, min_score: float | None, min_margin: float | None, vote: str | None) -> Any:
        from shitu.index.decision import resolve_rule

        base = decision if decision is not None else self.decision
        return resolve_rule(self.index, base, min_score=min_score, min_margin=min_margin, vote=vote)

    @property
    def model_name(self) -> str:
        return self.recognizer.name

    def describe(self) -> dict[str, Any]:
        """The recognizer's description (model, embedding size, input size, bundle)."""
        return self.recognizer.describe()

    @staticmethod
    def _sources(inputs: Any, unresolved: list[tuple[int, Any]]) -> Iterator[Any]:
        """The inputs with path strings resolved, lazily. An input that resolves to nothing is appended to
        ``unresolved`` as ``(position, EmbedFailure)``: position = how many inputs came before it."""
        from PIL import Image

        from shitu.embed.recognizer import EmbedFailure

        if isinstance(inputs, (str, os.PathLike, np.ndarray, Image.Image, bytes, bytearray)):
            inputs = [inputs]
        position = 0
        for item in inputs:
            if isinstance(item, (str, os.PathLike)):
                problems: list[str] = []
                for path in resolve_inputs([item], problems=problems):
                    yield path
                    position += 1
                unresolved.extend((position, EmbedFailure(-1, os.fspath(item), problem)) for problem in problems)
            else:
                yield item
                position += 1

    def predict(
        self,
        inputs: Any,
        batch_size: int = 1,
        *,
        topk: int | None = None,
        on_failure: Callable[[Any], None] | None = None,
        decision: Any | None = None,
        min_score: float | None = None,
        min_margin: float | None = None,
        vote: str | None = None,
    ) -> Iterator[FeatureResult]:
        """Yield one :class:`FeatureResult` per input image, in order, lazily (``batch_size`` at a time).

        ``inputs``: a path, folder, glob, list file, URL, RGB uint8 array, PIL image or encoded bytes, or an
        iterable of them (a generator is consumed only as results are taken, one batch ahead). Path strings
        are resolved with :func:`resolve_inputs` (a file it skips in a folder is a :class:`SkippedFileWarning`).
        An input that cannot be read (or resolves to nothing) raises a ShituError naming it, after the results
        of the inputs before it; with ``on_failure`` it is passed there instead, in input order, and the others
        still run (a
        :class:`shitu.embed.recognizer.EmbedFailure`; its ``index`` is -1 for an input that resolved to nothing).
        Features do not depend on ``batch_size``.

        With an index, ``decision`` (a DecisionRule or its JSON; default: the predictor's, else the index's)
        with ``min_score``/``min_margin``/``vote`` replacing its fields decides each result's ``label``.
        """
        k = self.topk if topk is None else int(topk)
        if self.index is not None and k < 1:
            raise ShituError(f"topk must be at least 1, got {k}")
        rule = self._rule(decision, min_score, min_margin, vote) if self.index is not None else None
        counts = getattr(self.index, "label_counts", None) if self.index is not None else None
        unresolved: list[tuple[int, Any]] = []

        def report(failure: Any) -> None:
            if on_failure is None:
                raise ShituError(failure.message)
            on_failure(failure)

        def report_unresolved(upto: int | None) -> None:
            """Failures of inputs that resolved to nothing before position ``upto`` (all when None)."""
            while unresolved and (upto is None or unresolved[0][0] <= upto):
                report(unresolved.pop(0)[1])

        batches = self.recognizer.iter_loaded(
            self._sources(inputs, unresolved), batch_size=batch_size, keep_images=True
        )
        for batch in batches:
            hits: list[Any] = [None] * len(batch.indices)
            if self.index is not None and len(batch.indices):
                hits = list(self.index.search(batch.features, k))
            rows: list[tuple[int, Any]] = [(f.index, f) for f in batch.failures]
            rows += [(index, row) for row, index in enumerate(batch.indices)]
            for index, item in sorted(rows, key=lambda pair: pair[0]):
                report_unresolved(index)
                if not isinstance(item, int):  # a failure
                    report(item)
                    continue
                data = {
                    "input_path": _describe_source(batch.sources[item]),
                    "page_index": None,
                    "input_img": batch.images[item],
                    "feature": np.asarray(batch.features[item], np.float32),
                }
                if self.index is not None:
                    data["hits"] = hits[item]
                    made = rule.decide(hits[item], counts)
                    data["label"] = made.label
                    data["decision"] = made.to_json()
                yield FeatureResult(data, index=index)
        report_unresolved(None)

    __call__ = predict


def open_index_for(index: Any, recognizer: Any) -> Any:
    """``index`` as a searchable object: an index folder is opened with :func:`shitu.index.open_index` and
    checked against ``recognizer`` (same model, embedding size and input size); an object with a
    ``search`` method is used as it is."""
    if hasattr(index, "search"):
        return index
    try:
        from shitu.index import open_index
    except ImportError as exc:  # the index package is optional at this level
        raise ShituError(f"retrieval indexes are not available: {exc}") from None
    return open_index(index, recognizer_info=recognizer.describe())


def create_model(
    model: str | os.PathLike[str],
    *,
    index: Any | None = None,
    input_size: int | None = None,
    topk: int = DEFAULT_TOPK,
    seed: int = 0,
    pretrained: bool = True,
    decision: Any | None = None,
    backend: str | None = None,
    precision: str | None = None,
    calibration: Any | None = None,
) -> Predictor:
    """A :class:`Predictor` for ``model``: a bundle folder, or a registered model name.

    A name loads the bundle installed at ``shitu.runtime.cache_dir()/models/NAME``; without one, the model's
    published weights (PaddleX's inference model for the built-in models) are downloaded, imported and
    installed there first. ``pretrained=False`` (or a model that publishes no weights) builds the network with
    random weights (``seed``) and issues a :class:`RandomWeightsWarning`.
    ``input_size`` overrides the size images are resized to (default: the bundle's, else the model's).
    ``index``: an index folder or an object with ``search`` (see :class:`Predictor`). ``decision``: the
    rule that answers "unknown" (a :class:`shitu.index.DecisionRule` or its JSON, e.g. ``{"min_score": 0.6}``;
    default: the index's own). ``backend`` (``jax`` default, ``onnxruntime``, ``openvino``, ``auto``) and
    ``precision`` (``fp32``, ``bf16``, ``int8`` calibrated on the ``calibration`` images): where the forward
    pass runs, see :mod:`shitu.export.backends`; the choice made is ``predictor.recognizer.backend``.
    """
    from shitu.embed.resolve import resolve_model

    recognizer = resolve_model(
        model,
        input_size=input_size,
        seed=seed,
        pretrained=pretrained,
        backend=backend,
        precision=precision,
        calibration=calibration,
    )
    searchable = open_index_for(index, recognizer) if index is not None else None
    return Predictor(recognizer, index=searchable, topk=topk, decision=decision)


# -- writing many results -----------------------------------------------------------------------------


class UniqueNames:
    """Makes result file names unique within one run: the first ``x_res.json`` keeps its name, later ones
    with the same name become ``x_2_res.json``, ``x_3_res.json``, ... (the number goes before ``_res``;
    names are compared case-insensitively, as some filesystems do). Files left by an earlier run are
    replaced, not avoided."""

    def __init__(self, marker: str = "_res") -> None:
        self.marker = marker
        self.used: set[str] = set()

    def __call__(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        head, marker, tail = target.name.rpartition(self.marker)
        if not marker:
            head, tail = target.stem, target.suffix
        candidate, number = target, 1
        while str(candidate).lower() in self.used:
            number += 1
            candidate = target.with_name(f"{head}_{number}{marker}{tail}")
        self.used.add(str(candidate).lower())
        return candidate


def write_feature_matrix(path: str | os.PathLike[str], features: np.ndarray, paths: Sequence[str | None]) -> Path:
    """Write ``features`` as one float32 ``.npy`` matrix at ``path`` and the input of each row, one per line,
    to ``<path>.paths.txt`` (both atomically; the list first, so a complete matrix always has its list).
    Returns the list file. Inputs without a path are written as ``<input N>``."""
    from shitu.fileio import atomic_open, atomic_write_text

    matrix = np.asarray(features, np.float32)
    if matrix.ndim != 2 or len(matrix) != len(paths):
        raise ValueError(f"{len(paths)} paths for a matrix of shape {list(matrix.shape)}")
    target = Path(path)
    listing = target.with_name(target.name + ".paths.txt")
    lines = []
    for number, entry in enumerate(paths):
        text = f"<input {number}>" if entry is None else str(entry)
        if "\n" in text or "\r" in text:
            raise ShituError("a path with a line break cannot be listed one per line", path=text.splitlines()[0])
        lines.append(text + "\n")
    atomic_write_text(listing, "".join(lines))
    buffer = io.BytesIO()
    np.save(buffer, matrix)
    with atomic_open(target, "wb") as handle:
        handle.write(buffer.getvalue())
    return listing
