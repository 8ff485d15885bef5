"""Model bundles: a folder that ``eval``, ``predict`` and ``train --pretrained`` accept.

Layout::

    BUNDLE/
      shitu_model.json   which model, class count, architecture options, form, versions
      config.yaml        the config the model was made with
      params/            an Orbax checkpoint of the model's parameters and BatchNorm statistics

This is the only module that imports Orbax for bundles. RNG state is never saved. A bundle is written in
a temporary sibling folder and renamed into place, so a crash never leaves half a bundle.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shitu.errors import ShituError
from shitu.fileio import atomic_directory, atomic_write_json, atomic_write_text

INFO_FILE = "shitu_model.json"
CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
FORMAT = "shitu-model-bundle"
FORMAT_VERSION = 1


@dataclass
class BundleInfo:
    """The contents of ``shitu_model.json``."""

    model: str
    num_classes: int
    arch: dict[str, Any] = field(default_factory=dict)
    embedding_size: int = 512
    input_size: int = 224
    shitu_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}


@dataclass
class LoadedBundle:
    """A bundle read back: its spec, the model (in eval mode), the info and the config."""

    path: Path
    spec: Any
    model: Any
    info: BundleInfo
    config: Any


def _nnx_filters() -> tuple[Any, Any]:
    from flax import nnx

    return nnx.Not(nnx.RngState), nnx.RngState


def save_bundle(
    path: str | os.PathLike[str],
    *,
    spec: Any,
    model: Any,
    num_classes: int,
    config: Any | None = None,
    arch: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (built from ``spec`` with ``num_classes`` and ``arch``) as a bundle at ``path``.

    An existing bundle at ``path`` is replaced only once the new one is complete.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from shitu import __version__

    target = Path(path).absolute()
    if target.exists() and not (target / INFO_FILE).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise ShituError("exists and is not a shitu model bundle; refusing to replace it", path=target)
    info = BundleInfo(
        model=spec.name,
        num_classes=int(num_classes),
        arch=dict(arch or {}),
        embedding_size=spec.embedding_size,
        input_size=spec.input_size,
        shitu_version=__version__,
        extra=dict(extra or {}),
    )
    keep, _ = _nnx_filters()
    state = nnx.state(model, keep)
    with atomic_directory(target) as staging:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging.absolute() / PARAMS_DIR, state)
        checkpointer.wait_until_finished()
        checkpointer.close()
        if config is not None:
            atomic_write_text(staging / CONFIG_FILE, config.to_yaml())
        atomic_write_json(staging / INFO_FILE, info.to_json())
    return target


def read_bundle_info(path: str | os.PathLike[str]) -> BundleInfo:
    """Read and validate ``shitu_model.json``; a clear ShituError for anything that is not a bundle."""
    folder = Path(path)
    file = folder / INFO_FILE
    if not folder.is_dir():
        raise ShituError("model bundle folder does not exist", path=folder)
    if not file.is_file():
        raise ShituError(f"not a shitu model bundle (no {INFO_FILE})", path=folder)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShituError(f"unreadable bundle description: {exc}", path=file) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ShituError("not a shitu model bundle description", path=file)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ShituError(f"bundle format version {doc.get('format_version')!r} is not supported", path=file)
    try:
        info = BundleInfo(
            model=str(doc["model"]),
            num_classes=int(doc["num_classes"]),
            arch=dict(doc.get("arch") or {}),
            embedding_size=int(doc.get("embedding_size", 512)),
            input_size=int(doc.get("input_size", 224)),
            shitu_version=str(doc.get("shitu_version", "")),
            extra=dict(doc.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ShituError(f"invalid bundle description: {exc}", path=file) from None
    if info.num_classes < 1:
        raise ShituError("invalid bundle description: num_classes must be at least 1", path=file)
    return info


def load_bundle(path: str | os.PathLike[str], *, host: Any | None = None) -> LoadedBundle:
    """Rebuild the model of the bundle at ``path`` and restore its parameters; the model is in eval mode."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from shitu.config import load_config
    from shitu.plugins import get_host

    folder = Path(path).absolute()
    info = read_bundle_info(folder)
    spec = (host or get_host()).model(info.model)
    config_file = folder / CONFIG_FILE
    config = load_config(config_file) if config_file.is_file() else load_config(spec.config)
    params_dir = folder / PARAMS_DIR
    if not params_dir.is_dir():
        raise ShituError(f"bundle has no {PARAMS_DIR}/ checkpoint", path=folder)
    keep, rng_filter = _nnx_filters()
    abstract = nnx.eval_shape(lambda: spec.build(info.num_classes, **info.arch))
    graphdef, abstract_state, _ = nnx.split(abstract, keep, ...)
    try:
        checkpointer = ocp.StandardCheckpointer()
        restored = checkpointer.restore(params_dir, abstract_state)
        checkpointer.close()
    except Exception as exc:  # Orbax raises many types for truncated or foreign files
        message = " ".join(str(exc).split())[:300]
        raise ShituError(
            f"cannot restore the checkpoint (corrupt, truncated or another model): {message}", path=params_dir
        ) from None
    rng_state = nnx.state(spec.build(info.num_classes, **info.arch), rng_filter)
    model = nnx.merge(graphdef, restored, rng_state)
    model.eval()
    return LoadedBundle(path=folder, spec=spec, model=model, info=info, config=config)
