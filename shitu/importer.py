"""``shitu import-weights``: PaddleClas/PaddleX weights into a shitu model bundle.

Accepted inputs: a training checkpoint ``.pdparams`` (a pickle, read with a restricted unpickler that
never runs code), or a Paddle inference model (``inference.json`` or ``inference.pdmodel`` with
``inference.pdiparams``, or the folder holding them), parsed without PaddlePaddle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError
from shitu.models.spec import ImportReport, resolve


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


def read_paddle_state(file: Path) -> tuple[dict[str, np.ndarray], str]:
    """The structured-name state of a Paddle weights file, and which kind of file it was."""
    if file.is_dir() or file.suffix in (".json", ".pdmodel", ".pdiparams"):
        from shitu.weights.paddle_inference import load_inference_model

        return load_inference_model(file).structured_state(), "inference"
    from shitu.weights.pdparams import load_pdparams

    return load_pdparams(file), "pdparams"


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
    from shitu.bundle import save_bundle
    from shitu.config import load_config
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
    state, kind = read_paddle_state(source)
    classes = num_classes or _head_classes(state) or 1
    # Some files need another form of the network (an exported PP-ShiTuV2_rec is re-parameterized).
    arch: dict[str, Any] = dict(resolve(spec.paddle_arch)(state)) if spec.paddle_arch else {}
    network = spec.build(classes, **arch)
    report = resolve(spec.paddle_importer)(network, state)
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
