"""``shitu import-weights``: PaddleClas/PaddleX weights into a shitu model bundle.

Accepted inputs: a training checkpoint ``.pdparams`` (a pickle, read with a restricted unpickler that
never runs code), or a Paddle inference model (``inference.json`` or ``inference.pdmodel`` with
``inference.pdiparams``, or the folder holding them), parsed without PaddlePaddle.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError
from shitu.models.spec import ImportReport, ModelSpec, resolve


@dataclass
class ImportResult:
    bundle: Path
    model: str
    num_classes: int
    source: str
    report: ImportReport

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "model": self.model,
            "num_classes": self.num_classes,
            "source": self.source,
            **self.report.to_json(),
        }


def _head_classes(state: dict[str, np.ndarray]) -> int | None:
    """The class count of a training head in ``state`` (``head.*`` weight [512, C]), if it has one."""
    for key, value in state.items():
        if key.startswith("head.") and key.endswith("weight") and getattr(value, "ndim", 0) == 2:
            return int(value.shape[1])
    return None


def read_paddle_state(file: Path, spec: ModelSpec | None = None) -> tuple[dict[str, np.ndarray], str]:
    """The structured-name state of a Paddle weights file, and which kind of file it was. An inference
    model's parameters are named by ``spec``'s ``paddle_structure`` (see :mod:`shitu.weights.structure`)."""
    if file.is_dir() or file.suffix in (".json", ".pdmodel", ".pdiparams"):
        from shitu.weights.paddle_inference import load_inference_model

        return load_inference_model(file).structured_state(spec), "inference"
    from shitu.weights.pdparams import load_pdparams

    return load_pdparams(file), "pdparams"


def import_paddle_state(
    spec: ModelSpec, model: Any, state: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None
) -> ImportReport:
    """Load a Paddle state (structured names) into ``model`` in place with ``spec``'s importer, as Paddle's
    ``set_dict`` (keys of another shape skipped and reported), refusing what would be cast silently.

    A parameter is floating point, so an array of another kind (integers, booleans, complex numbers...)
    that the importer read is a ShituError naming the key (and ``source``, the file it came from); the
    model is then half loaded and must be discarded. Keys the importer skipped or did not use are not
    checked (a file may carry other entries).
    """
    if spec.paddle_importer is None:
        raise ShituError(f"model {spec.name} has no Paddle weight importer", path=source)
    with warnings.catch_warnings():  # a complex array is refused below, with its key: no warning first
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        report = resolve(spec.paddle_importer)(model, state)
    # Checked after the import because only the importer knows which keys it reads (derived ones included);
    # nnx parameters take any numeric array and cast it, so this is the only place the kind can be refused.
    ignored = set(report.unused) | {key for key, _, _ in report.skipped}
    for key, value in state.items():
        kind = getattr(getattr(value, "dtype", None), "kind", None)
        if key not in ignored and kind is not None and kind != "f":
            raise ShituError(
                f"Paddle weights {key!r} are an array of {value.dtype}, not floating point: refusing to cast "
                "them into a float parameter",
                path=source,
                hint="the file is damaged or not a PaddleClas checkpoint",
            )
    return report


def import_weights(
    model: str,
    file: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Import Paddle weights for ``model`` from ``file`` and write a bundle at ``output``.

    The class count is the file's head's unless ``num_classes`` is given (a head of another size is then
    skipped, as Paddle's set_dict does); a file without a head gives a 1-class placeholder head.
    """
    from shitu.config import load_config
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model(model)
    source = Path(file)
    if not source.exists():
        raise ShituError("weights file does not exist", path=source)
    target = Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ShituError("output folder is not empty", path=target, hint="use --overwrite to replace it")
    if spec.paddle_importer is None:
        raise ShituError(f"model {spec.name} has no Paddle weight importer")
    state, kind = read_paddle_state(source, spec)
    classes = num_classes or _head_classes(state) or 1
    # Some files need another form of the network (an exported PP-ShiTuV2_rec is re-parameterized).
    arch: dict[str, Any] = dict(resolve(spec.paddle_arch)(state)) if spec.paddle_arch else {}
    network = spec.build(classes, **arch)
    report = import_paddle_state(spec, network, state, source=source)
    network.eval()
    bundle = save_bundle(
        target,
        spec=spec,
        model=network,
        num_classes=classes,
        config=load_config(spec.config),
        arch=arch,
        extra={"imported_from": str(source.resolve()), "import_kind": kind},
    )
    return ImportResult(bundle=bundle, model=spec.name, num_classes=classes, source=kind, report=report)
